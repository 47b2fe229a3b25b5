"""Tests for fine_jax.eval.rerank: hand-made cases and a brute-force re-ranking of full matrices."""
import numpy as np
import pytest

from fine_jax.eval import fast, rerank
from fine_jax.eval import retrieval as R

from test_retrieval import make_catalogue


def test_positions_hand_made():
    itm = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.7], [np.nan, 0.2, 0.2]])
    pos = rerank.rerank_positions(itm)
    assert pos.tolist() == [[2, 0, 1], [1, 2, 0], [2, 0, 1]]


def test_rerank_hand_made():
    # Query 0: positive at top-k slot 2, ITM moves it first. Query 1: positive outside the
    # top-3 at contrastive rank 7 keeps it. Query 2: two positives (T2I), the best one counts.
    # Query 3: positive outside but the list disagreed with the rank: never inside the top-k.
    is_pos = np.array([[0, 0, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0]], bool)
    itm = np.array([[0.1, 0.2, 0.9], [0.5, 0.4, 0.3], [0.1, 0.9, 0.5], [0.0, 0.0, 0.0]])
    ranks = rerank.rerank(is_pos, itm, np.array([2, 7, 0, 1]))
    assert ranks.tolist() == [0, 7, 1, 3]


def test_i2t_t2i_and_sample100_wrappers():
    img_product = np.array([0, 0, 1, 2])
    top_i2t = np.array([[1, 0], [2, 1], [1, 2], [0, 1]])  # texts per image
    itm = np.array([[0.9, 0.1], [0.5, 0.6], [0.2, 0.1], [0.3, 0.2]])
    assert rerank.rerank_i2t(top_i2t, itm, img_product, np.array([1, 5, 0, 4])).tolist() == \
        [1, 5, 0, 4]
    top_t2i = np.array([[2, 1], [0, 3], [3, 2]])  # images per text
    itm = np.array([[0.0, 0.4], [0.2, 0.1], [0.1, 0.5]])
    # text 0: positive image 1 at slot 1 (0.4 > 0.0) -> 0; text 1: no positive -> max(3, 2);
    # text 2: positive image 3 at slot 0 (0.1 < 0.5) -> 1.
    assert rerank.rerank_t2i(top_t2i, itm, img_product, np.array([1, 3, 0])).tolist() == \
        [0, 3, 1]
    scores = np.array([[0.2, 0.9, 0.5, 0.7], [0.1, 0.1, 0.3, np.nan]])
    pos = rerank.sample100_topk(scores, 2, lengths=np.array([4, 3]))
    assert pos.tolist() == [[1, 3], [2, 0]]
    # query 0: the positive (position 3) is the 2nd of the top-2 and ITM lifts it first;
    # query 1: the positive (position 2) is first by contrast, ITM puts position 0 before it.
    ranks = rerank.rerank_sample100(pos, np.array([[0.1, 0.8], [0.3, 0.9]]), np.array([1, 0]),
                                    np.array([4, 3]))
    assert ranks.tolist() == [0, 1]


def brute_force(scores, itm_full, k, positives):
    """Per query: take the contrastive top-k (stable: lower index first), lift their scores
    above everything by ITM (ties again by contrastive order), and find the best positive."""
    n_q, n_g = scores.shape
    out = np.empty(n_q, np.int64)
    for q in range(n_q):
        order = np.argsort(-scores[q], kind="stable")
        lifted = scores[q].astype(np.float64).copy()
        shift = np.nanmax(np.abs(scores)) + np.nanmax(np.abs(itm_full)) + 10.0
        for j in order[:k]:
            lifted[j] = itm_full[q, j] + shift if not np.isnan(itm_full[q, j]) else shift - 5.0
        # Contrastive position as the secondary key keeps ties in contrastive order.
        cpos = np.empty(n_g, np.int64)
        cpos[order] = np.arange(n_g)
        new_order = np.lexsort((cpos, -lifted))
        where = np.empty(n_g, np.int64)
        where[new_order] = np.arange(n_g)
        out[q] = min(where[j] for j in positives[q])
    return out


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("levels", [None, 3])
def test_brute_force_full_matrix(k, levels):
    rng = np.random.default_rng(k)
    img_product = np.repeat(np.arange(20), rng.integers(1, 4, size=20))
    n_img, n_txt = len(img_product), 20
    scores = rng.standard_normal((n_img, n_txt))
    itm_full = rng.standard_normal((n_img, n_txt))
    if levels is not None:  # heavy ties in both scores
        scores, itm_full = np.round(scores * levels) / levels, np.round(itm_full * 2) / 2
    # I2T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    crank = np.array([np.flatnonzero(np.argsort(-scores[i], kind="stable") == img_product[i])[0]
                      for i in range(n_img)])
    got = rerank.rerank_i2t(top, np.take_along_axis(itm_full, top, 1), img_product, crank)
    want = brute_force(scores, itm_full, k, [[p] for p in img_product])
    np.testing.assert_array_equal(got, want)
    # T2I: several positives per text
    st, it = scores.T.copy(), itm_full.T.copy()
    top = np.argsort(-st, axis=1, kind="stable")[:, :k]
    images_of = [np.flatnonzero(img_product == t) for t in range(n_txt)]
    crank = np.array([min(np.flatnonzero(np.argsort(-st[t], kind="stable") == i)[0]
                          for i in images_of[t]) for t in range(n_txt)])
    got = rerank.rerank_t2i(top, np.take_along_axis(it, top, 1), img_product, crank)
    np.testing.assert_array_equal(got, brute_force(st, it, k, images_of))


def test_brute_force_sample100():
    rng = np.random.default_rng(3)
    scores = np.round(rng.standard_normal((30, 101)) * 2) / 2
    itm_full = rng.standard_normal((30, 101))
    itm_full[0, :5] = np.nan
    k = 10
    pos = rerank.sample100_topk(scores, k)
    crank = np.array([np.flatnonzero(np.argsort(-s, kind="stable") == 100)[0] for s in scores])
    got = rerank.rerank_sample100(pos, np.take_along_axis(itm_full, pos, 1), crank, 101)
    np.testing.assert_array_equal(got, brute_force(scores, itm_full, k, [[100]] * 30))


def test_fashiongen_itm_rerank_end_to_end(tmp_path):
    img_product, img_sub, ids = make_catalogue([60, 25, 10], seed=4)
    img_product = np.asarray(img_product)
    rng = np.random.default_rng(5)
    n_txt = len(ids)
    zt = rng.standard_normal((n_txt, 16)).astype(np.float32)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    zv = zt[img_product] + rng.standard_normal((len(img_product), 16)).astype(np.float32)
    zv /= np.linalg.norm(zv, axis=1, keepdims=True)
    path = tmp_path / "sample100_candidates.json"
    R.save_candidates(path, R.sample100_candidates(img_product, img_sub, ids, n_queries=30,
                                                   n_neg=20))
    kw = dict(block_rows=16, tile_cols=24, candidates_path=path, twin_pairs=[(0, 1), (2, 5)])
    calls = []

    def oracle(rows, txt):  # a perfect matcher: every positive in the top-k goes first
        calls.append(len(rows))
        assert len(set(zip(rows.tolist(), txt.tolist()))) == len(rows)  # deduplicated
        return (img_product[rows] == txt).astype(np.float32)

    k = 5
    out = rerank.fashiongen_itm_rerank(zv, zt, img_product, k, oracle, **kw)
    assert len(calls) == 1
    res = fast.evaluate(zv, zt, img_product, {"s": R.load_candidates(path)}, block_rows=16,
                        tile_cols=24)
    # With the oracle, R@1 after re-ranking = contrastive R@k, and R@k is unchanged.
    assert out["full_itm/i2t_r1"] == res.full["i2t_r5"]
    assert out["full_itm/t2i_r1"] == res.full["t2i_r5"]
    assert out["full_itm/i2t_r10"] == res.full["i2t_r10"]
    assert out["sample100_itm/i2t_r1"] == res.sample100["s"]["i2t_r5"]
    assert out["sample100_itm/t2i_r1"] == res.sample100["s"]["t2i_r5"]
    assert out["twin_itm/i2t_acc"] == 100.0 and out["twin_itm/t2i_acc"] == 100.0
    assert out["full_itm/k"] == k and out["sample100_itm/k"] == k

    def contrastive(rows, txt):  # ITM = the contrastive score: nothing moves
        return np.einsum("ij,ij->i", zv[rows].astype(np.float64), zt[txt].astype(np.float64))

    out = rerank.fashiongen_itm_rerank(zv, zt, img_product, k, contrastive, **kw)
    for m in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert out[f"full_itm/{m}"] == res.full[m], m
        assert out[f"sample100_itm/{m}"] == res.sample100["s"][m], m
