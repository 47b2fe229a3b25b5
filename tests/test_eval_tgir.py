"""Tests for fine_jax.eval.tgir (spec §7.4) against a literal transcription of the reference."""
import chex
import numpy as np
import pytest

from fine_jax.eval import fast, tgir


def ref_itm_eval(sim_f2i, labels):
    """Fashion-FINE tgir.py ``itm_eval``, verbatim but for the dict keys."""
    assert len(labels) == sim_f2i.shape[0]
    labels = [i[2] for i in labels]
    ranks = np.zeros(sim_f2i.shape[0])
    for index, score in enumerate(sim_f2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == labels[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    ir50 = 100.0 * len(np.where(ranks < 50)[0]) / len(ranks)
    ir_mean = (ir1 + ir5 + ir10) / 3
    return ranks, {"r1": ir1, "r5": ir5, "r10": ir10, "r50": ir50, "r_mean": ir_mean}


def make_split(n_queries=90, n_gallery=120, dim=16, seed=0, kind="random"):
    """Queries with (i, reference, target) labels as TGIRValSet builds them; ``kind`` picks ties."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, n_gallery, n_queries)
    tgt = (ref + rng.integers(1, n_gallery, n_queries)) % n_gallery
    labels = np.stack([np.arange(n_queries), ref, tgt], axis=1)
    if kind == "exact":
        g = rng.integers(-2, 3, size=(n_gallery, dim)).astype(np.float32) / 4
        f = np.clip(g[tgt] + rng.integers(-1, 2, size=(n_queries, dim)), -2, 2) / 4
        return f.astype(np.float32), g, labels
    g = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    f = g[tgt] + 0.8 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
    if kind == "duplicates":
        # The same image twice in the gallery ties a target with a non-target; repeated queries.
        for a, b in ((int(tgt[0]), int(ref[0])), (int(tgt[3]), (int(tgt[3]) + 5) % n_gallery)):
            g[b] = g[a]
        f[10] = f[11]
    return f, g, labels


@pytest.mark.parametrize("kind", ["random", "duplicates", "exact"])
def test_tgir_equals_literal_itm_eval(kind):
    f, g, labels = make_split(kind=kind)
    kw = dict(block_rows=16, tile_cols=32)
    sim = fast.similarity_matrix(f, g, labels[:, 2], **kw)
    if kind == "exact":
        np.testing.assert_array_equal(sim, f @ g.T)
    ref_ranks, want = ref_itm_eval(sim, labels)
    got, ranks = tgir.tgir_protocol(f, g, labels, return_ranks=True, **kw)
    np.testing.assert_array_equal(ranks, ref_ranks)
    for k, v in want.items():
        assert got[k] == v, k
    assert got["n_queries"] == len(f)
    if kind != "random":
        assert got["tied"] > 0
    host = tgir.tgir_protocol_host(sim, labels)
    assert host == got


def test_tgir_argsort_reversed_not_argsort_negated():
    # Three gallery images with equal scores: [::-1] of an ascending argsort puts the *last*
    # tied index first, unlike argsort(-score). The target is gallery item 2.
    f = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]], np.float32)
    labels = np.array([[0, 0, 2]])
    _, want = ref_itm_eval(f @ g.T, labels)
    assert tgir.tgir_protocol(f, g, labels)["r1"] == want["r1"]
    assert tgir.tgir_protocol_host(f @ g.T, labels)["r1"] == want["r1"]


def test_reference_image_stays_in_gallery():
    # The query equals its reference image's feature, which then outranks the target.
    g = np.eye(3, dtype=np.float32)
    f = np.array([[1.0, 0.5, 0.0]], np.float32)
    res = tgir.tgir_protocol(f, g, np.array([[0, 0, 1]]))
    assert res["r1"] == 0.0 and res["r5"] == 100.0


def test_labels_validation():
    f, g, labels = make_split(n_queries=5, n_gallery=7)
    with pytest.raises(ValueError):
        tgir.tgir_protocol(f, g, labels[:, :2])
    bad = labels.copy()
    bad[:, 0] = bad[::-1, 0]
    with pytest.raises(ValueError):
        tgir.tgir_protocol(f, g, bad)
    bad = labels.copy()
    bad[0, 2] = 7
    with pytest.raises(ValueError):
        tgir.tgir_protocol(f, g, bad)


def test_report_keys_and_selection():
    res = {
        "dress": {"r1": 10.0, "r5": 20.0, "r10": 30.0, "r50": 60.0},
        "shirt": {"r1": 11.0, "r5": 21.0, "r10": 25.0, "r50": 55.0},
        "toptee": {"r1": 12.0, "r5": 22.0, "r10": 35.1, "r50": 65.3},
        "all": {"r1": 1.0, "r5": 2.0, "r10": 3.0, "r50": 4.0},
    }
    out = tgir.tgir_report(res)
    assert out["tgir/dress/r10"] == 30.0 and out["tgir/all/r50"] == 4.0
    assert out["tgir/avg/r10"] == pytest.approx((30.0 + 25.0 + 35.1) / 3)
    assert out["tgir/avg/r50"] == pytest.approx((60.0 + 55.0 + 65.3) / 3)
    assert out["tgir/avg/mean"] == pytest.approx((out["tgir/avg/r10"] + out["tgir/avg/r50"]) / 2)
    # The reference's sum, in its order: dress, toptee, shirt R@10 then R@50.
    assert out["tgir/select"] == 30.0 + 35.1 + 25.0 + 60.0 + 65.3 + 55.0
    assert set(out) == {f"tgir/{c}/r{k}" for c in res for k in (1, 5, 10, 50)} | {
        f"tgir/avg/r{k}" for k in (1, 5, 10, 50)} | {"tgir/avg/mean", "tgir/select"}
    with pytest.raises(ValueError):
        tgir.tgir_report({"dress": res["dress"]})


def test_report_from_protocol_results():
    per_cat = {}
    for seed, cat in enumerate(tgir.CATEGORIES):
        f, g, labels = make_split(n_queries=40, n_gallery=60, seed=seed)
        per_cat[cat] = tgir.tgir_protocol(f, g, labels, block_rows=16, tile_cols=32)
    out = tgir.tgir_report(per_cat)
    chex.assert_trees_all_close(
        out["tgir/select"], sum(per_cat[c]["r10"] + per_cat[c]["r50"] for c in per_cat))
