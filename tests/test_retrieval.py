"""Tests for fine_jax.eval.retrieval (spec §7.1, §7.2, B6).

The "reference" helpers below are plain transcriptions of Fashion-FINE ``itm_eval`` and FashionSAP
``fashiongen_dataset_retrieval.__cluster_subcate`` / ``get_i2t_test`` / ``get_t2i_test``, kept
deliberately literal (loops, argsort-then-where, global ``random``) so the fast implementation is
checked against the reference's own semantics.
"""
import copy
import json
import os
import random

import numpy as np
import pytest

from fine_jax.eval import retrieval as R


# ----------------------------------------------------------------------------------------------
# literal reference transcriptions


def ref_labels(img_product):
    """get_test_labels: text2img = product -> its rows, img2text = row -> product."""
    n_txt = int(np.max(img_product)) + 1
    text2img = {t: [int(i) for i in np.flatnonzero(img_product == t)] for t in range(n_txt)}
    img2text = {}
    for k, v in text2img.items():
        for vv in v:
            img2text[vv] = k
    return img2text, text2img


def ref_full_ranks(scores_i2t, scores_t2i, img2txt, txt2img):
    ranks_i = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks_i[index] = np.where(inds == img2txt[index])[0][0]
    ranks_t = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        rank = 100000
        for i in txt2img[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks_t[index] = rank
    return ranks_i, ranks_t


def ref_metrics(ranks_i, ranks_t):
    tr1 = 100.0 * len(np.where(ranks_i < 1)[0]) / len(ranks_i)
    tr5 = 100.0 * len(np.where(ranks_i < 5)[0]) / len(ranks_i)
    tr10 = 100.0 * len(np.where(ranks_i < 10)[0]) / len(ranks_i)
    ir1 = 100.0 * len(np.where(ranks_t < 1)[0]) / len(ranks_t)
    ir5 = 100.0 * len(np.where(ranks_t < 5)[0]) / len(ranks_t)
    ir10 = 100.0 * len(np.where(ranks_t < 10)[0]) / len(ranks_t)
    return {
        "i2t_r1": tr1, "i2t_r5": tr5, "i2t_r10": tr10,
        "t2i_r1": ir1, "t2i_r5": ir5, "t2i_r10": ir10,
        "i2t_mean": (tr1 + tr5 + tr10) / 3, "t2i_mean": (ir1 + ir5 + ir10) / 3,
        "r_mean": (tr1 + ir1) / 2, "sum": tr1 + tr5 + tr10 + ir1 + ir5 + ir10,
    }


def ref_tiny_ranks(scores, query_indexes, cand_indexes):
    """The tiny branch of itm_eval (both directions have this shape)."""
    tiny_score = np.zeros(cand_indexes.shape)
    rows = scores[query_indexes]
    for i, t_socre in enumerate(rows):
        tiny_score[i] = t_socre[cand_indexes[i]]
    ranks = np.zeros(tiny_score.shape[0])
    for index, score in enumerate(tiny_score):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == 100)[0][0]
    return ranks


class RefDataset:
    """The parts of FashionSAP's fashiongen_dataset_retrieval used by the tiny protocol."""

    def __init__(self, img_product, img_subcategory, product_ids):
        self.info_data = [
            {"input_subcategory": s, "input_productID": int(product_ids[p])}
            for p, s in zip(img_product, img_subcategory)
        ]
        # productid_list.json: runs of equal consecutive ids, in row order.
        self.product_list = []
        self.product_indexmap = {}
        prev = None
        for i, p in enumerate(img_product):
            pid = int(product_ids[p])
            if pid != prev:
                self.product_list.append(pid)
                self.product_indexmap[pid] = [i]
                prev = pid
            else:
                self.product_indexmap[pid].append(i)
        self.subcate_map = self._cluster_subcate()

    def _cluster_subcate(self):
        subcate_map = {}
        for i, item_info in enumerate(self.info_data):
            subcat = item_info["input_subcategory"]
            product_id = item_info["input_productID"]
            if subcat in subcate_map:
                subcate_map[subcat].add(product_id)
            else:
                subcate_map[subcat] = set([product_id])
        for k, v in subcate_map.items():
            subcate_map[k] = list(v)
        return subcate_map

    def get_i2t_test(self, set_len=1000, neg_len=100):
        pid_indexes = list(range(len(self.product_list)))
        random.shuffle(pid_indexes)
        pid_indexes = pid_indexes[:set_len]
        img_indexes = []
        pid_to_index = {pid: i for i, pid in enumerate(self.product_list)}
        txt_indexs = []
        for pid_ind in pid_indexes:
            pid = self.product_list[pid_ind]
            img_index = random.choice(self.product_indexmap[pid])
            img_indexes.append(img_index)
            subcates = list(self.subcate_map.keys())
            random.shuffle(subcates)
            subcate = self.info_data[img_index]["input_subcategory"]
            subcates.remove(subcate)
            neg_pids = copy.deepcopy(self.subcate_map[subcate])
            neg_pids.remove(pid)
            while len(neg_pids) < 100:
                subcate = subcates.pop()
                neg_pids.extend(self.subcate_map[subcate])
            neg_pids = random.sample(neg_pids, neg_len)
            neg_indexes = [pid_to_index[pid] for pid in neg_pids]
            txt_indexs.append(neg_indexes + [pid_ind])
        return np.array(img_indexes), np.array(txt_indexs)

    def get_t2i_test(self, set_len=1000, neg_len=100):
        pid_indexes = list(range(len(self.product_list)))
        random.shuffle(pid_indexes)
        pid_indexes = pid_indexes[:set_len]
        txt_indexes = []
        img_indexs = []
        for pid_ind in pid_indexes:
            pid = self.product_list[pid_ind]
            txt_indexes.append(pid_ind)
            subcates = list(self.subcate_map.keys())
            random.shuffle(subcates)
            pos_img_index = random.choice(self.product_indexmap[pid])
            subcate = self.info_data[pos_img_index]["input_subcategory"]
            neg_pids = copy.deepcopy(self.subcate_map[subcate])
            neg_pids.remove(pid)
            while len(neg_pids) < 100:
                subcate = subcates.pop()
                neg_pids.extend(self.subcate_map[subcate])
            neg_pids = random.sample(neg_pids, neg_len)
            neg_indexes = [random.choice(self.product_indexmap[i]) for i in neg_pids]
            img_indexs.append(neg_indexes + [pos_img_index])
        return np.array(txt_indexes), np.array(img_indexs)


@pytest.fixture
def global_random():
    """The reference transcription seeds the global generator; restore it afterwards."""
    state = random.getstate()
    yield
    random.setstate(state)


def make_catalogue(sub_sizes, seed=0, max_imgs=4, mixed=0):
    """Synthetic FashionGen-like split: products in contiguous rows, FashionGen-like int ids.

    ``sub_sizes`` gives the number of products per subcategory; products are interleaved across
    subcategories so first-appearance order differs from the sizes' order. ``mixed`` products get
    one image in another subcategory.
    """
    rng = np.random.default_rng(seed)
    subs = np.concatenate([np.full(n, k) for k, n in enumerate(sub_sizes)])
    rng.shuffle(subs)
    n_prod = len(subs)
    ids = rng.choice(np.arange(100000, 400000), size=n_prod, replace=False)
    n_imgs = rng.integers(1, max_imgs + 1, size=n_prod)
    img_product = np.repeat(np.arange(n_prod), n_imgs)
    img_sub = [f"SUB{subs[p]}" for p in img_product]
    multi = np.flatnonzero(n_imgs > 1)[:mixed]
    for p in multi:
        last = int(np.flatnonzero(img_product == p)[-1])
        img_sub[last] = f"SUB{(subs[p] + 1) % len(sub_sizes)}"
    return img_product, img_sub, [int(x) for x in ids]


# ----------------------------------------------------------------------------------------------
# full protocol


def hand_made():
    # products: p0 -> images 0,1 ; p1 -> image 2 ; p2 -> images 3,4,5
    img_product = np.array([0, 0, 1, 2, 2, 2])
    sim = np.array([
        [0.9, 0.1, 0.2],   # img0 (p0): rank 0
        [0.3, 0.5, 0.4],   # img1 (p0): rank 2
        [0.2, 0.6, 0.7],   # img2 (p1): rank 1
        [0.1, 0.2, 0.3],   # img3 (p2): rank 0
        [0.5, 0.4, 0.0],   # img4 (p2): rank 2
        [0.8, 0.9, 0.1],   # img5 (p2): rank 2
    ], dtype=np.float32)
    return sim, img_product


def test_full_protocol_hand_made():
    sim, img_product = hand_made()
    ri, tied_i = R.i2t_ranks(sim, img_product)
    rt, tied_t = R.t2i_ranks(sim, img_product)
    assert ri.tolist() == [0, 2, 1, 0, 2, 2]
    # text0: img0 (0.9) is top; text1: img2 (0.6) behind img5 (0.9);
    # text2: best positive img3 (0.3) behind img2 (0.7) and img1 (0.4).
    assert rt.tolist() == [0, 1, 2]
    assert tied_i == tied_t == 0
    res = R.full_protocol(sim, img_product)
    assert res["i2t_r1"] == pytest.approx(100 * 2 / 6)
    assert res["i2t_r5"] == res["i2t_r10"] == 100.0
    assert res["t2i_r1"] == pytest.approx(100 / 3)
    assert res["t2i_r5"] == 100.0
    assert res["r_mean"] == pytest.approx((100 * 2 / 6 + 100 / 3) / 2)
    assert res["sum"] == pytest.approx(100 * 2 / 6 + 200 + 100 / 3 + 200)
    assert res["n_i2t"] == 6 and res["n_t2i"] == 3


@pytest.mark.parametrize("levels", [None, 3, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_full_protocol_matches_literal_reference(levels, dtype):
    """Random matrices, heavily tied when quantised; rows longer than numpy's small-sort cutoff."""
    rng = np.random.default_rng(1 if levels is None else levels)
    n_txt = 40
    img_product = np.repeat(np.arange(n_txt), rng.integers(1, 6, size=n_txt))
    sim = rng.standard_normal((img_product.size, n_txt))
    if levels is not None:
        sim = np.round(sim * levels / 3) / levels
    sim = sim.astype(dtype)
    img2txt, txt2img = ref_labels(img_product)
    ref_i, ref_t = ref_full_ranks(sim, np.ascontiguousarray(sim.T), img2txt, txt2img)
    ri, tied_i = R.i2t_ranks(sim, img_product, chunk_size=16)
    rt, tied_t = R.t2i_ranks(sim, img_product, chunk_size=16)
    np.testing.assert_array_equal(ri, ref_i)
    np.testing.assert_array_equal(rt, ref_t)
    if levels is not None:
        assert tied_i > 0 and tied_t > 0
    got = R.full_protocol(sim, img_product, chunk_size=16)
    want = ref_metrics(ref_i, ref_t)
    for k, v in want.items():
        assert got[k] == v, k  # identical float operations, so exactly equal

    # The tie-independent bounds bracket the reference rank.
    for fn, ref in ((R.i2t_ranks, ref_i), (R.t2i_ranks, ref_t)):
        lo, _ = fn(sim, img_product, ties="optimistic")
        hi, _ = fn(sim, img_product, ties="pessimistic")
        assert np.all(lo <= ref) and np.all(ref <= hi)
        if levels is None:
            np.testing.assert_array_equal(lo, hi)


def test_full_protocol_ties_bounds_exact():
    # Image 0 (product 0) ties with texts 1 and 2; text 0 ties with image 2 (product 1).
    img_product = np.array([0, 0, 1, 2])
    sim = np.array([
        [0.5, 0.5, 0.5],
        [0.1, 0.9, 0.0],
        [0.4, 0.8, 0.0],
        [0.0, 0.0, 0.7],
    ], dtype=np.float32)
    lo, _ = R.i2t_ranks(sim, img_product, ties="optimistic")
    hi, _ = R.i2t_ranks(sim, img_product, ties="pessimistic")
    assert lo[0] == 0 and hi[0] == 2
    # text 0: positives 0.5 (img0), 0.1 (img1); img2 has 0.4 -> no tie: rank 0
    # text 1: positive img2 0.8 behind img1 0.9 -> rank 1
    lo_t, tied = R.t2i_ranks(sim, img_product, ties="optimistic")
    assert lo_t.tolist() == [0, 1, 0] and tied == 0


def test_full_protocol_positive_ties_among_themselves_are_exact():
    # Two images of product 0 share the best score: no tie-breaking needed.
    img_product = np.array([0, 0, 1])
    sim = np.array([[0.7, 0.0], [0.7, 0.1], [0.2, 0.9]], dtype=np.float32)
    rt, tied = R.t2i_ranks(sim, img_product)
    assert rt.tolist() == [0, 0] and tied == 0


def test_full_protocol_nan_rows_follow_argsort():
    rng = np.random.default_rng(3)
    img_product = np.repeat(np.arange(12), 3)
    sim = rng.standard_normal((36, 12)).astype(np.float32)
    sim[5, 7] = np.nan
    sim[20, 6] = np.nan  # image 20 is of product 6: its own score is NaN
    img2txt, txt2img = ref_labels(img_product)
    ref_i, ref_t = ref_full_ranks(sim, np.ascontiguousarray(sim.T), img2txt, txt2img)
    np.testing.assert_array_equal(R.i2t_ranks(sim, img_product)[0], ref_i)
    np.testing.assert_array_equal(R.t2i_ranks(sim, img_product)[0], ref_t)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_full_protocol_chunking_invariant(chunk):
    rng = np.random.default_rng(4)
    img_product = np.repeat(np.arange(30), rng.integers(1, 5, size=30))
    sim = np.round(rng.standard_normal((img_product.size, 30)) * 2).astype(np.float32) / 2
    base = R.full_protocol(sim, img_product, chunk_size=1_000_000)
    assert R.full_protocol(sim, img_product, chunk_size=chunk) == base


def test_full_protocol_product_without_images_never_hits():
    img_product = np.array([0, 0, 2])
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.0], [0.0, 0.1, 0.5]], dtype=np.float32)
    rt, _ = R.t2i_ranks(sim, img_product)
    assert rt.tolist() == [0, 100000, 0]


# ----------------------------------------------------------------------------------------------
# sample-100 candidates


@pytest.mark.parametrize("mixed", [0, 5])
def test_sample100_matches_literal_reference(global_random, mixed):
    img_product, img_sub, ids = make_catalogue([150, 60, 30, 20, 5, 1], seed=mixed, mixed=mixed)
    n_queries = 120
    random.seed(66)
    ds = RefDataset(img_product, img_sub, ids)
    ref_i_img, ref_i_txt = ds.get_i2t_test(set_len=n_queries)
    ref_t_txt, ref_t_img = ds.get_t2i_test(set_len=n_queries)

    c = R.sample100_candidates(img_product, img_sub, product_ids_order=ids, seed=66,
                               n_queries=n_queries)
    assert [q[0] for q in c["i2t"]] == ref_i_img.tolist()
    assert [q[1] for q in c["i2t"]] == ref_i_txt.tolist()
    assert [q[0] for q in c["t2i"]] == ref_t_txt.tolist()
    assert [q[1] for q in c["t2i"]] == ref_t_img.tolist()

    # Same sets scored by the literal tiny branch of itm_eval and by sample100_protocol.
    rng = np.random.default_rng(7)
    sim = (np.round(rng.standard_normal((len(img_product), len(ids))) * 2) / 2).astype(np.float32)
    ri = ref_tiny_ranks(sim, ref_i_img, ref_i_txt)
    rt = ref_tiny_ranks(np.ascontiguousarray(sim.T), ref_t_txt, ref_t_img)
    got = R.sample100_protocol(sim, c)
    want = ref_metrics(ri, rt)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sum"):
        assert got[k] == want[k], k


def test_sample100_structure_and_subcategories():
    sizes = [150, 60, 30, 20, 5, 1]
    img_product, img_sub, ids = make_catalogue(sizes, seed=11)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=200)
    prod_sub = {int(p): s for p, s in zip(img_product, img_sub)}  # one subcategory per product
    sub_size = {s: sum(1 for v in prod_sub.values() if v == s) for s in set(prod_sub.values())}
    assert len(c["i2t"]) == len(c["t2i"]) == 200
    assert len({q[0] for q in c["t2i"]}) == 200  # distinct products
    assert len({int(img_product[q[0]]) for q in c["i2t"]}) == 200

    saw_fallback = saw_pure = False
    for img, cand, pos in c["i2t"]:
        assert len(cand) == 101 and cand[-1] == pos == img_product[img]
        negs = cand[:-1]
        assert pos not in negs  # own subcategory is removed from the I2T fallback
        assert len(set(negs)) == 100
        own = prod_sub[pos]
        if sub_size[own] - 1 >= 100:
            assert all(prod_sub[q] == own for q in negs)
            saw_pure = True
        else:
            # every same-subcategory product is in the pool; the rest come from whole subcategories
            assert any(prod_sub[q] != own for q in negs)
            saw_fallback = True
    assert saw_pure and saw_fallback

    for txt, cand, pos in c["t2i"]:
        assert len(cand) == 101 and cand[-1] == pos and img_product[pos] == txt
        if sub_size[prod_sub[txt]] - 1 >= 100:
            assert all(prod_sub[int(img_product[i])] == prod_sub[txt] for i in cand)


def test_sample100_deterministic_and_seeded():
    img_product, img_sub, ids = make_catalogue([120, 40, 10], seed=2)
    a = R.sample100_candidates(img_product, img_sub, ids, seed=66, n_queries=50)
    b = R.sample100_candidates(img_product, img_sub, ids, seed=66, n_queries=50)
    c = R.sample100_candidates(img_product, img_sub, ids, seed=67, n_queries=50)
    assert a == b
    assert a["i2t"] != c["i2t"]
    # global random state is not touched
    random.seed(5)
    x = random.random()
    random.seed(5)
    R.sample100_candidates(img_product, img_sub, ids, n_queries=5)
    assert random.random() == x


def test_sample100_t2i_positive_reenters_b6():
    # Small own subcategories force the fallback; T2I may pop the own subcategory again.
    img_product, img_sub, ids = make_catalogue([150, 40, 30], seed=5)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=1000)
    reentered = 0
    for txt, cand, pos in c["t2i"]:
        neg_products = [int(img_product[i]) for i in cand[:-1]]
        reentered += txt in neg_products
    assert reentered > 0
    for img, cand, pos in c["i2t"]:
        assert pos not in cand[:-1]


def test_sample100_too_few_negatives_uses_all():
    # 60 products: the reference would pop from an empty list; we use every available negative.
    img_product, img_sub, ids = make_catalogue([40, 20], seed=8)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=1000)
    assert len(c["i2t"]) == len(c["t2i"]) == 60  # fewer products than n_queries: all of them
    for img, cand, pos in c["i2t"]:
        assert sorted(cand[:-1]) == sorted(set(range(60)) - {pos}) and cand[-1] == pos
    sub_of = {int(p): s for p, s in zip(img_product, img_sub)}
    n_sub = {s: sum(1 for v in sub_of.values() if v == s) for s in set(sub_of.values())}
    for txt, cand, pos in c["t2i"]:
        # pool = own subcategory minus itself + every subcategory again, own one included (B6)
        assert len(cand) - 1 == 59 + n_sub[sub_of[txt]]
        assert txt in [int(img_product[i]) for i in cand[:-1]]
    res = R.sample100_protocol(np.eye(60, dtype=np.float32)[img_product], c)
    assert res["i2t_r1"] == 100.0


def test_sample100_ids_change_set_order():
    # With ids given, subcategory lists follow CPython set order of the ids, not row order.
    img_product = np.arange(3)
    img_sub = ["a", "a", "a"]
    ids = [5, 2, 7]  # small ints hash to themselves: an 8-slot set iterates 2, 5, 7
    assert list(set(ids)) != ids
    c1 = R.sample100_candidates(img_product, img_sub, ids, n_queries=3, n_neg=2)
    c2 = R.sample100_candidates(img_product, img_sub, None, n_queries=3, n_neg=2)
    assert c1["n_products"] == c2["n_products"] == 3
    for c in (c1, c2):
        for _, cand, pos in c["i2t"]:
            assert sorted(cand) == [0, 1, 2] and cand[-1] == pos


def test_save_load_roundtrip(tmp_path):
    img_product, img_sub, ids = make_catalogue([120, 30], seed=9)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=20)
    path = tmp_path / "sub" / "cands.json"
    R.save_candidates(path, c)
    assert R.load_candidates(path) == json.loads(json.dumps(c)) == c
    assert os.listdir(path.parent) == ["cands.json"]
    R.save_candidates(path, c)  # overwrite in place
    assert R.load_candidates(path) == c
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        R.load_candidates(tmp_path / "bad.json")


def test_sample100_protocol_hand_made():
    # 3 products, 1 image each, candidate lists of 3 (positive last).
    sim = np.array([[0.9, 0.1, 0.2], [0.3, 0.5, 0.6], [0.0, 0.1, 0.8]], dtype=np.float32)
    c = {"n_images": 3, "n_products": 3,
         "i2t": [[0, [1, 2, 0], 0], [1, [0, 2, 1], 1], [2, [0, 1, 2], 2]],
         "t2i": [[0, [1, 2, 0], 0], [1, [0, 2, 1], 1], [2, [0, 1, 2], 2]]}
    res = R.sample100_protocol(sim, c)
    # i2t ranks: 0, 1 (text 2's 0.6 beats 0.5), 0 ; t2i ranks: 0, 0, 0
    assert res["i2t_r1"] == pytest.approx(200 / 3)
    assert res["t2i_r1"] == 100.0
    assert res["i2t_r5"] == 100.0


# ----------------------------------------------------------------------------------------------
# twin protocol


def test_twin_protocol_perfect_and_inverted():
    img_product = np.array([0, 0, 1, 1, 1, 2, 3])
    n_txt = 4
    perfect = np.eye(n_txt, dtype=np.float32)[img_product]
    pairs = [(0, 1), (2, 3)]
    res = R.twin_protocol(perfect, img_product, pairs)
    assert res["i2t_acc"] == 100.0 and res["t2i_acc"] == 100.0
    assert res["n_i2t"] == 7 and res["n_t2i"] == 4 and res["n_pairs"] == 2
    swap = np.array([1, 0, 3, 2])
    inverted = np.eye(n_txt, dtype=np.float32)[swap[img_product]]
    res = R.twin_protocol(inverted, img_product, pairs)
    assert res["i2t_acc"] == 0.0 and res["t2i_acc"] == 0.0
    tied = np.ones((7, n_txt), dtype=np.float32)
    res = R.twin_protocol(tied, img_product, pairs)
    assert res["i2t_acc"] == 0.0 and res["t2i_acc"] == 0.0


def test_twin_protocol_t2i_uses_max_over_images():
    img_product = np.array([0, 0, 1, 1])
    # text 0: own images 0.2, 0.9 (max 0.9, mean 0.55); twin images 0.5, 0.6 (max 0.6, mean 0.55)
    # text 1: own 0.4, 0.4; twin 0.1, 0.45 -> max loses (0.4 < 0.45) though mean wins
    sim = np.array([[0.2, 0.1], [0.9, 0.45], [0.5, 0.4], [0.6, 0.4]], dtype=np.float32)
    res = R.twin_protocol(sim, img_product, [(0, 1)])
    assert res["t2i_acc"] == 50.0
    # i2t: img0 0.2>0.1 ok, img1 0.9>0.45 ok, img2 0.4<0.5 wrong, img3 0.4<0.6 wrong
    assert res["i2t_acc"] == 50.0
    with pytest.raises(ValueError):
        R.twin_protocol(sim, img_product, [(0, 0)])


# ----------------------------------------------------------------------------------------------
# reporting


def test_reference_keys_and_report():
    sim, img_product = hand_made()
    full = R.full_protocol(sim, img_product)
    ref = R.to_reference_keys(full=full)
    assert ref["txt_r1"] == full["i2t_r1"] and ref["img_r10"] == full["t2i_r10"]
    assert ref["full_sum"] == full["sum"] and ref["tiny_sum"] == 0.0
    text = R.format_report({"full": full, "twin": {"i2t_acc": 75.0, "t2i_acc": 50.0}})
    lines = text.splitlines()
    assert lines[0].startswith("protocol") and "I2T R@1" in lines[0]
    assert lines[2].startswith("full") and "33.33" in lines[2] and "r_mean=" in lines[2]
    assert lines[3].startswith("twin") and "i2t_acc=75.00" in lines[3]
    assert R.format_report(full).splitlines()[2].startswith("results")


# ----------------------------------------------------------------------------------------------
# cleaned sample-100, several draws, saved sets


def test_sample100_default_is_the_reference_draw_unchanged():
    img_product, img_sub, ids = make_catalogue([150, 40, 30], seed=5, mixed=3)
    a = R.sample100_candidates(img_product, img_sub, ids, n_queries=80)
    b = R.sample100_candidates(img_product, img_sub, ids, n_queries=80, n_neg=100, clean=False)
    assert json.dumps(a) == json.dumps(b)
    assert "clean" not in a and a["n_neg"] == 100
    assert list(a) == ["format", "seed", "n_queries", "n_neg", "n_images", "n_products",
                       "reference_ids", "i2t", "t2i"]


@pytest.mark.parametrize("mixed", [0, 6])
def test_sample100_clean_variant(mixed):
    # Small subcategories force the fallback, where the reference T2I re-adds the positive (B6).
    img_product, img_sub, ids = make_catalogue([150, 40, 30, 3], seed=5, mixed=mixed)
    ref = R.sample100_candidates(img_product, img_sub, ids, n_queries=1000)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=1000, clean=True)
    assert c["clean"] is True and c["n_neg"] == 99
    assert [q[2] for q in c["i2t"]] == [q[2] for q in ref["i2t"]]  # same first shuffle
    subs_of = {}
    for p, s in zip(img_product, img_sub):
        subs_of.setdefault(int(p), set()).add(s)
    for img, cand, pos in c["i2t"]:
        assert len(cand) == 100 and cand[-1] == pos == img_product[img]
        assert pos not in cand[:-1] and len(set(cand[:-1])) == 99
    for txt, cand, pos in c["t2i"]:
        assert len(cand) == 100 and cand[-1] == pos and img_product[pos] == txt
        neg_products = [int(img_product[i]) for i in cand[:-1]]
        assert txt not in neg_products and len(set(neg_products)) == 99
    if mixed == 0:
        # The reference does re-add the positive product here; the cleaned draw never does.
        assert any(txt in [int(img_product[i]) for i in cand[:-1]] for txt, cand, _ in ref["t2i"])


def test_sample100_clean_without_enough_products_uses_all():
    img_product, img_sub, ids = make_catalogue([40, 20], seed=8)
    c = R.sample100_candidates(img_product, img_sub, ids, n_queries=1000, clean=True)
    for txt, cand, pos in c["t2i"]:
        assert sorted(int(img_product[i]) for i in cand[:-1]) == sorted(set(range(60)) - {txt})


def test_sample100_draws_and_mean_std():
    img_product, img_sub, ids = make_catalogue([120, 40], seed=2)
    draws = R.sample100_draws(img_product, img_sub, ids, n_queries=20)
    assert [d["seed"] for d in draws] == [66, 67, 68, 69, 70]
    assert draws[0] == R.sample100_candidates(img_product, img_sub, ids, n_queries=20)
    runs = [{"i2t_r1": v, "sum": 2 * v} for v in (10.0, 20.0, 30.0, 40.0, 50.0)]
    mean, std = R.mean_std(runs, keys=("i2t_r1", "sum"))
    assert mean == {"i2t_r1": 30.0, "sum": 60.0}
    assert std["i2t_r1"] == pytest.approx(np.sqrt(250.0))  # sample std: divisor n - 1
    assert R.mean_std(runs, keys=("i2t_r1",), ddof=0)[1]["i2t_r1"] == pytest.approx(np.sqrt(200))
    assert np.isnan(R.mean_std(runs[:1], keys=("sum",))[1]["sum"])


def test_load_or_draw_candidates(tmp_path, monkeypatch):
    img_product, img_sub, ids = make_catalogue([120, 30], seed=9)
    path = tmp_path / "sample100_candidates.json"
    calls = []
    draw = R.sample100_candidates
    monkeypatch.setattr(R, "sample100_candidates", lambda *a, **k: calls.append(k) or draw(*a, **k))
    kw = dict(seed=66, n_queries=15, n_neg=10)
    a = R.load_or_draw_candidates(path, img_product, img_sub, ids, **kw)
    assert path.is_file() and len(calls) == 1
    assert R.load_or_draw_candidates(path, img_product, img_sub, ids, **kw) == a
    assert len(calls) == 1  # reused
    for change in (dict(seed=67), dict(n_queries=16), dict(n_neg=9)):
        R.load_or_draw_candidates(path, img_product, img_sub, ids, **{**kw, **change})
    assert len(calls) == 4 and R.load_candidates(path)["n_neg"] == 9
    R.load_or_draw_candidates(path, img_product[:-1], img_sub[:-1], ids, **kw)
    assert len(calls) == 5  # another split (one image fewer)
    # The cleaned sets never pass for the reference ones and vice versa.
    c = R.load_or_draw_candidates(path, img_product, img_sub, ids, clean=True, **kw)
    assert len(calls) == 6 and c["clean"]
    R.load_or_draw_candidates(path, img_product, img_sub, ids, **kw)
    assert len(calls) == 7
    path.write_text("not json")
    R.load_or_draw_candidates(path, img_product, img_sub, ids, **kw)
    assert len(calls) == 8 and R.load_candidates(path) == a
    assert R.load_or_draw_candidates(None, img_product, img_sub, ids, **kw) == a


def test_clean_candidates_file():
    assert R.clean_candidates_file("/w/sample100_candidates.json") == \
        os.path.join("/w", "sample100_clean_candidates.json")
    assert R.clean_candidates_file("cands.json") == "cands_clean.json"


def test_metrics_helpers_match_protocols():
    sim, img_product = hand_made()
    ri, ti = R.i2t_ranks(sim, img_product)
    rt, tt = R.t2i_ranks(sim, img_product)
    assert R.full_metrics(ri, rt, ti, tt) == R.full_protocol(sim, img_product)
    assert "i2t_tied" not in R.full_metrics(ri, rt)
    m = R.sample100_metrics(np.array([0, 3, 12]), np.array([0, 0]))
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["t2i_r10"] == 100.0 and m["n_i2t"] == 3
