"""Tests for fine_jax.eval.fast: the device protocols equal the reference's loops, ties included.

The protocols are defined on the similarity matrix the device tile program computes
(``fast.similarity_matrix``); the literal transcriptions of ``itm_eval`` below run on that same
matrix, materialised at these small sizes. With embeddings whose dot products are exact in float32
(small integers times a power of two), that matrix also equals NumPy's ``z_v @ z_t.T`` bit for bit.
"""
import json
import os
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest

from fine_jax.eval import fast
from fine_jax.eval import retrieval as R

from test_retrieval import make_catalogue, ref_full_ranks, ref_labels, ref_metrics, ref_tiny_ranks

KW = dict(block_rows=16, tile_cols=24)  # several blocks and tiles, positives across tile edges
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sum")


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(kind, img_product, dim=16, seed=0):
    """z_v, z_t for ``img_product``; ``kind`` picks the tie regime."""
    rng = np.random.default_rng(seed)
    n_txt = int(img_product.max()) + 1
    if kind == "exact":
        # Entries in {-2..2}/4: every dot product is exact in float32, whatever the summation
        # order, so scores tie massively and the device matrix is NumPy's.
        zt = rng.integers(-2, 3, size=(n_txt, dim)).astype(np.float32) / 4
        zv = np.clip(zt[img_product] + rng.integers(-1, 2, size=(len(img_product), dim)),
                     -2, 2).astype(np.float32) / 4
        return zv, zt
    zt = unit(rng.standard_normal((n_txt, dim)))
    zv = unit(zt[img_product] + 0.7 * rng.standard_normal((len(img_product), dim)))
    if kind == "duplicates":
        # Duplicate captions and duplicate images across products: exact ties with positives.
        for a, b in ((3, 7), (7, 11), (20, 21), (0, n_txt - 1)):
            zt[b] = zt[a]
        for a, b in ((0, 40), (5, 6), (10, 60), (len(zv) - 1, 30)):
            zv[b] = zv[a]
    return zv, zt


def catalogue(n_txt=45, seed=0, shuffle=False):
    rng = np.random.default_rng(seed)
    img_product = np.repeat(np.arange(n_txt), rng.integers(1, 6, size=n_txt))
    if shuffle:  # images not grouped by product
        img_product = rng.permutation(img_product)
    return img_product


def literal_full(sim, img_product):
    img2txt, txt2img = ref_labels(img_product)
    return ref_full_ranks(sim, np.ascontiguousarray(sim.T), img2txt, txt2img)


@pytest.mark.parametrize("kind", ["random", "duplicates", "exact"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_full_protocol_equals_literal_reference(kind, shuffle):
    img_product = catalogue(seed=1, shuffle=shuffle)
    zv, zt = embeddings(kind, img_product)
    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    chex.assert_shape(sim, (len(zv), len(zt)))
    if kind == "exact":
        np.testing.assert_array_equal(sim, zv @ zt.T)
    else:
        np.testing.assert_allclose(sim, zv @ zt.T, atol=1e-6)

    ranks = fast.full_ranks(zv, zt, img_product, **KW)
    ref_i, ref_t = literal_full(sim, img_product)
    np.testing.assert_array_equal(ranks.i2t, ref_i)
    np.testing.assert_array_equal(ranks.t2i, ref_t)
    if kind != "random":
        assert ranks.i2t_tied.any() and ranks.t2i_tied.any()

    got = fast.full_protocol(zv, zt, img_product, **KW)
    want = ref_metrics(ref_i, ref_t)
    for k, v in want.items():
        assert got[k] == v, k
    assert got == R.full_protocol(sim, img_product)  # tie counts too


def test_block_and_tile_sizes_do_not_change_exact_results():
    img_product = catalogue(n_txt=60, seed=2)
    zv, zt = embeddings("exact", img_product)
    base = R.full_protocol(zv @ zt.T, img_product)
    for block_rows, tile_cols in ((2, 1), (8, 7), (1024, 1024)):
        got = fast.full_protocol(zv, zt, img_product, block_rows=block_rows, tile_cols=tile_cols)
        assert got == base, (block_rows, tile_cols)


def test_fallback_recomputes_the_same_bits():
    # The tie fallback recomputes rows / columns in packed blocks / tiles; every value must be
    # the matrix's own, bit for bit (non-exact arithmetic, every row and column, many packs).
    img_product = catalogue(seed=4)
    zv, zt = embeddings("random", img_product, dim=40)
    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    ops = fast._operands(zv, zt, img_product, None, ("data",), KW["block_rows"], KW["tile_cols"])
    rows = dict(fast._fallback_rows(ops, np.arange(len(zv))[::-1]))
    cols = dict(fast._fallback_cols(ops, np.arange(len(zt))))
    assert len(rows) == len(zv) and len(cols) == len(zt)
    np.testing.assert_array_equal(np.stack([rows[i] for i in range(len(zv))]), sim)
    np.testing.assert_array_equal(np.stack([cols[t] for t in range(len(zt))], axis=1), sim)
    pos = fast._positives(ops, img_product)
    np.testing.assert_array_equal(pos, sim[np.arange(len(zv)), img_product])


def test_nan_rows_and_columns_follow_argsort():
    img_product = catalogue(seed=3)
    zv, zt = embeddings("random", img_product)
    zv[4, 2] = np.nan  # a whole image row of NaN
    zt[9, 0] = np.nan  # a whole text column of NaN
    zv[7, 1] = np.inf  # +-inf and NaN mixed
    zv[12] = 3e38  # overflows to +-inf
    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    assert np.isnan(sim).any() and np.isinf(sim[12]).any()
    ranks = fast.full_ranks(zv, zt, img_product, **KW)
    ref_i, ref_t = literal_full(sim, img_product)
    np.testing.assert_array_equal(ranks.i2t, ref_i)
    np.testing.assert_array_equal(ranks.t2i, ref_t)
    assert fast.full_protocol(zv, zt, img_product, **KW) == R.full_protocol(sim, img_product)


def test_products_without_images_and_padding():
    img_product = np.array([0, 0, 2, 2, 2, 4])  # products 1 and 3 have no image
    zv, zt = embeddings("exact", np.array([0, 0, 2, 2, 2, 4]), dim=8)
    zt = np.concatenate([zt, np.full((1, 8), 0.25, np.float32)])[[0, 5, 2, 5, 4]]
    ranks = fast.full_ranks(zv, zt, img_product, block_rows=4, tile_cols=3)
    assert ranks.t2i[1] == ranks.t2i[3] == 100000
    ref_i, ref_t = literal_full(zv @ zt.T, img_product)
    np.testing.assert_array_equal(ranks.i2t, ref_i)
    np.testing.assert_array_equal(ranks.t2i, ref_t)


@pytest.mark.parametrize("kind", ["duplicates", "exact"])
def test_sample100_equals_literal_reference(kind):
    img_product, img_sub, ids = make_catalogue([70, 30, 12, 5], seed=4, mixed=3)
    zv, zt = embeddings(kind, np.asarray(img_product), seed=5)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=40, n_neg=20)
    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    ref_i = tiny_ranks(sim, c["i2t"])
    ref_t = tiny_ranks(np.ascontiguousarray(sim.T), c["t2i"])
    got = fast.sample100_protocol(zv, zt, c, img_product=img_product, **KW)
    want = ref_metrics(ref_i, ref_t)
    for k in RECALLS:
        assert got[k] == want[k], k
    host = R.sample100_protocol(sim, c)
    assert {k: got[k] for k in host} == host
    if kind == "exact":
        assert got["i2t_tied"] > 0 and got["t2i_tied"] > 0


def tiny_ranks(scores, queries):
    """itm_eval's tiny branch, positive at the last position (``inds == 100`` for 101)."""
    tiny = np.zeros((len(queries), len(queries[0][1])))
    for i, (q, cand, _) in enumerate(queries):
        tiny[i] = scores[q][cand]
    ranks = np.zeros(len(tiny))
    for index, score in enumerate(tiny):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == tiny.shape[1] - 1)[0][0]
    return ranks


def test_sample100_reference_size_draw_matches_tiny_branch():
    # 101 candidates, the reference's own tiny loop (inds == 100), repeated candidates (B6).
    img_product, img_sub, ids = make_catalogue([150, 40, 30], seed=5)
    zv, zt = embeddings("exact", np.asarray(img_product), seed=6)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=60)
    sim = zv @ zt.T
    ri = ref_tiny_ranks(sim, np.array([q[0] for q in c["i2t"]]), np.array([q[1] for q in c["i2t"]]))
    rt = ref_tiny_ranks(np.ascontiguousarray(sim.T), np.array([q[0] for q in c["t2i"]]),
                        np.array([q[1] for q in c["t2i"]]))
    res = fast.evaluate(zv, zt, img_product, {"a": c}, **KW)
    np.testing.assert_array_equal(res.sample100_ranks["a"].i2t, ri)
    np.testing.assert_array_equal(res.sample100_ranks["a"].t2i, rt)
    si, st = res.sample100_scores["a"]
    chex.assert_shape((si, st), (60, 101))
    np.testing.assert_array_equal(si, np.stack([sim[q, cand] for q, cand, _ in c["i2t"]]))
    np.testing.assert_array_equal(st, np.stack([sim[cand, q] for q, cand, _ in c["t2i"]]))


def test_evaluate_shares_one_pass_across_sets():
    img_product, img_sub, ids = make_catalogue([60, 25, 8], seed=7)
    img_product = np.asarray(img_product)
    zv, zt = embeddings("duplicates", img_product, seed=8)
    sets = {f"s{seed}": R.sample100_candidates(img_product, img_sub, ids, seed=seed,
                                               n_queries=30, n_neg=15) for seed in (1, 2)}
    sets["short"] = {"n_images": len(zv), "n_products": len(zt),  # uneven list lengths
                     "i2t": [[0, [3, 2, 1, int(img_product[0])], int(img_product[0])],
                             [5, [int(img_product[5])], int(img_product[5])]],
                     "t2i": [[1, [9, 0, int(np.flatnonzero(img_product == 1)[0])],
                              int(np.flatnonzero(img_product == 1)[0])]]}
    res = fast.evaluate(zv, zt, img_product, sets, **KW)
    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    assert res.full == R.full_protocol(sim, img_product)
    for name, cands in sets.items():
        host = R.sample100_protocol(sim, cands)
        assert {k: res.sample100[name][k] for k in host} == host, name
    si, _ = res.sample100_scores["short"]
    assert np.isnan(si[1, 1:]).all() and not np.isnan(si[0]).any()


def test_topk_device_order_and_ties():
    img_product = catalogue(seed=9)
    zv, zt = embeddings("exact", img_product)
    for k in (1, 5, len(zt)):
        scores, idx = fast.topk_device(zv, zt, k, block_rows=16, tile_cols=8)
        chex.assert_shape((scores, idx), (len(zv), k))
        sim = zv @ zt.T
        want = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # descending, lower index first
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(scores, np.take_along_axis(sim, want, 1))
    with pytest.raises(ValueError):
        fast.topk_device(zv, zt, len(zt) + 1)


def test_topk_nan_last():
    zq = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    zg = np.array([[1.0, 0.0], [np.nan, 0.0], [0.5, 0.5], [1.0, 0.0]], np.float32)
    scores, idx = fast.topk_device(zq, zg, 4, tile_cols=2)
    assert idx[0].tolist() == [0, 3, 2, 1] and idx[1].tolist() == [2, 0, 3, 1]
    assert scores[0, -1] == -np.inf


def test_fashiongen_protocols_keys_values_and_saved_sets(tmp_path):
    img_product, img_sub, ids = make_catalogue([70, 30, 12, 5], seed=10, mixed=2)
    img_product = np.asarray(img_product)
    zv, zt = embeddings("duplicates", img_product, seed=11)
    path = tmp_path / "sample100_candidates.json"
    kw = dict(candidates_path=path, n_queries=25, n_neg=20, **KW)
    out = fast.fashiongen_protocols(zv, zt, img_product, img_sub, ids, **kw)
    clean_path = tmp_path / "sample100_clean_candidates.json"
    assert path.is_file() and clean_path.is_file()

    sim = fast.similarity_matrix(zv, zt, img_product, **KW)
    ref = R.load_candidates(path)
    clean = R.load_candidates(clean_path)
    assert ref == R.sample100_candidates(img_product, img_sub, ids, seed=66, n_queries=25,
                                         n_neg=20)
    assert clean["clean"] and clean["n_neg"] == 19
    for k, v in R.full_protocol(sim, img_product).items():
        assert out[f"full/{k}"] == v, k
    for k, v in R.sample100_protocol(sim, ref).items():
        assert out[f"sample100/{k}"] == v, k
    for k, v in R.sample100_protocol(sim, clean).items():
        assert out[f"sample100_clean/{k}"] == v, k
    runs = [R.sample100_protocol(sim, c) for c in R.sample100_draws(
        img_product, img_sub, ids, seeds=range(66, 71), n_queries=25, n_neg=20)]
    mean, std = R.mean_std(runs)
    for k in RECALLS:
        assert out[f"sample100_mean/{k}"] == pytest.approx(mean[k], abs=1e-12)
        assert out[f"sample100_std/{k}"] == pytest.approx(std[k], abs=1e-12)
    assert out["sample100_mean/n_draws"] == 5
    assert {k.split("/")[0] for k in out} == {
        "full", "sample100", "sample100_mean", "sample100_std", "sample100_clean"}
    json.dumps(out)

    # Reused while matching; redrawn (and overwritten) for another seed.
    stamp = path.stat().st_mtime_ns
    again = fast.fashiongen_protocols(zv, zt, img_product, img_sub, ids, **kw)
    assert again == out and path.stat().st_mtime_ns == stamp
    other = fast.fashiongen_protocols(zv, zt, img_product, img_sub, ids, seed=3, n_draws=1,
                                      **kw)
    assert R.load_candidates(path)["seed"] == 3
    assert np.isnan(other["sample100_std/sum"])
    assert other["sample100_mean/sum"] == other["sample100/sum"]


def test_retrieval_wrapper_delegates():
    img_product, img_sub, ids = make_catalogue([40, 20], seed=12)
    zv, zt = embeddings("random", np.asarray(img_product), seed=13)
    a = R.fashiongen_protocols(zv, zt, img_product, img_sub, ids, n_queries=10, n_neg=8,
                               n_draws=2, **KW)
    b = fast.fashiongen_protocols(zv, zt, img_product, img_sub, ids, n_queries=10, n_neg=8,
                                  n_draws=2, **KW)
    assert a == b


def test_input_validation():
    zv = np.ones((4, 3), np.float32)
    zt = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError):
        fast.full_protocol(zv, zt, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        fast.full_protocol(zv, np.ones((2, 4), np.float32), np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError):
        fast.full_protocol(zv, zt, np.array([0, 1, 1, 0]), mesh=fast.default_mesh(),
                           axis_names=("model",))
    with pytest.raises(ValueError):
        fast.sample100_protocol(zv, zt, {"n_images": 5, "n_products": 2, "i2t": [], "t2i": []})


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    from fine_jax.eval import fast, retrieval as R
    from test_eval_fast import KW, embeddings
    from test_retrieval import make_catalogue

    assert jax.device_count() == 8, jax.devices()
    img_product, img_sub, ids = make_catalogue([70, 30, 12, 5], seed=20, mixed=2)
    img_product = np.asarray(img_product)
    out = {{}}
    for kind in ("duplicates", "exact"):
        zv, zt = embeddings(kind, img_product, seed=21)
        cands = R.sample100_candidates(img_product, img_sub, ids, n_queries=30, n_neg=20)
        devs = np.asarray(jax.devices())
        meshes = {{
            "one": (Mesh(devs[:1], ("data",)), ("data",)),
            "flat": (Mesh(devs, ("data",)), ("data",)),
            # two batch axes, and a third the protocols replicate over
            "3d": (Mesh(devs.reshape(2, 2, 2), ("data", "fsdp", "model")), ("data", "fsdp")),
        }}
        for name, (mesh, axes) in meshes.items():
            kw = dict(mesh=mesh, axis_names=axes, **KW)
            sim = fast.similarity_matrix(zv, zt, img_product, **kw)
            res = fast.evaluate(zv, zt, img_product, {{"s": cands}}, **kw)
            host_full = R.full_protocol(sim, img_product)
            host_s = R.sample100_protocol(sim, cands)
            assert res.full == host_full, (kind, name)
            assert {{k: res.sample100["s"][k] for k in host_s}} == host_s, (kind, name)
            scores, idx = fast.topk_device(zv, zt, 5, **kw)
            want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
            if kind == "exact":
                assert (idx == want).all(), name
            out[f"{{kind}}/{{name}}"] = [res.full, res.sample100["s"]]
        # The same matrix on 1 and on 8 devices: rows are placed differently, the tiles agree.
        assert len({{json.dumps(v, sort_keys=True) for k, v in out.items()
                     if k.startswith(kind)}}) == 1, kind
    print("MULTI_DEVICE_OK")
""")


def test_eight_simulated_devices():
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "MULTI_DEVICE_OK" in proc.stdout, proc.stderr[-4000:]
