"""FashionGen cross-modal retrieval protocols (method spec §7.1, §7.2, §10 B6).

Everything here is plain numpy / Python on a precomputed similarity matrix ``sim`` of shape
``(n_images, n_texts)``: ``sim[i, p]`` is the cosine of image ``i`` and the text of product ``p``
(higher is better). There is one text per product, product index ``p`` follows
``productid_list.json`` order, and ``img_product[i]`` is the product index of image ``i``.

Reference semantics (Fashion-FINE ``pretrain.py`` / ``retrieval.py``, function ``itm_eval``; the
candidate sets come from FashionSAP ``dataset/fashiongen_dataset.py``,
``fashiongen_dataset_retrieval.__cluster_subcate`` / ``get_i2t_test`` / ``get_t2i_test``):

* A rank is ``np.where(np.argsort(score)[::-1] == gt)[0][0]``, i.e. 0-based, and R@K is
  ``100.0 * (#ranks < K) / #queries``.
* I2T ranks the product's text among all texts; T2I takes, per text, the best rank among the
  product's images. ``r_mean`` is ``(I2T R@1 + T2I R@1) / 2`` (checked in ``itm_eval``: not the
  mean of the six recalls); ``i2t_mean`` / ``t2i_mean`` are the means of the three recalls of one
  direction; ``sum`` is the six recalls (``full_sum`` / ``tiny_sum``).

Ties. When the positive's score is not tied with any competitor, its rank is the number of
strictly greater scores whatever sort is used, and that is how the full protocol computes it, in
row chunks, without sorting. Only when a competitor ties the positive does the position depend on
the sort: numpy's default ``argsort`` kind is unstable (introsort in the numpy of the reference;
SIMD sorts on recent numpy with AVX-512/AVX2), so the reference's tie order is a property of its
numpy build. For those queries (and for rows holding NaN, which numpy sorts as largest) the
default ``ties="argsort"`` runs exactly the reference's ``argsort(...)[::-1]`` on the row with the
installed numpy; ``"optimistic"`` / ``"pessimistic"`` give the tie-independent bounds. The number
of tie-dependent queries is reported (``i2t_tied`` / ``t2i_tied``) so that it is visible when it
matters (duplicate captions give exactly equal text embeddings).

Reference key names (``itm_eval``): ``txt_r*`` = I2T, ``img_r*`` = T2I, ``tiny_*`` = sample-100;
see :data:`REFERENCE_KEYS` and :func:`to_reference_keys`.

Beyond the reference draw: :func:`sample100_candidates` ``clean=True`` draws the cleaned
FashionBERT-style variant (B6), :func:`sample100_draws` / :func:`mean_std` give the spread over
several seeds, and :func:`load_or_draw_candidates` keeps a draw on disk. The same protocols on
the devices, from the embeddings and without the full matrix, are in :mod:`fine_jax.eval.fast`;
:func:`fashiongen_protocols` runs all of them there.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "REFERENCE_KEYS",
    "i2t_ranks",
    "t2i_ranks",
    "recall_at",
    "full_protocol",
    "full_metrics",
    "sample100_metrics",
    "sample100_candidates",
    "save_candidates",
    "load_candidates",
    "load_or_draw_candidates",
    "clean_candidates_file",
    "sample100_draws",
    "mean_std",
    "fashiongen_protocols",
    "sample100_protocol",
    "twin_protocol",
    "to_reference_keys",
    "format_report",
]

_TIES = ("argsort", "optimistic", "pessimistic")
# itm_eval initialises a text's best rank to 100000, so a product without images never counts as hit.
_NO_POSITIVE_RANK = 100000
CANDIDATES_FORMAT = "fine_jax.sample100.v1"

# Negatives per query: the reference's draw (101 candidates) and the cleaned FashionBERT-style one
# (1 positive + 99 negatives).
REFERENCE_NEGATIVES = 100
CLEAN_NEGATIVES = 99
# The reference's seed and the default number of draws for the mean and spread of sample-100.
REFERENCE_SEED = 66
N_DRAWS = 5
SAMPLE100_RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "sum")

# Our key -> key of the reference's eval_result dict, per protocol.
REFERENCE_KEYS: dict[str, dict[str, str]] = {
    "full": {
        "i2t_r1": "txt_r1", "i2t_r5": "txt_r5", "i2t_r10": "txt_r10", "i2t_mean": "txt_r_mean",
        "t2i_r1": "img_r1", "t2i_r5": "img_r5", "t2i_r10": "img_r10", "t2i_mean": "img_r_mean",
        "r_mean": "r_mean", "sum": "full_sum",
    },
    "sample100": {
        "i2t_r1": "tiny_txt_r1", "i2t_r5": "tiny_txt_r5", "i2t_r10": "tiny_txt_r10",
        "t2i_r1": "tiny_img_r1", "t2i_r5": "tiny_img_r5", "t2i_r10": "tiny_img_r10",
        "sum": "tiny_sum",
    },
}


# ----------------------------------------------------------------------------------------------
# helpers


def _check_ties(ties: str) -> None:
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}")


def _check_sim(sim: np.ndarray, img_product: np.ndarray) -> None:
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (n_images, n_texts), got shape {sim.shape}")
    if img_product.shape != (sim.shape[0],):
        raise ValueError(
            f"img_product must have shape ({sim.shape[0]},), got {img_product.shape}")
    if img_product.size and (img_product.min() < 0 or img_product.max() >= sim.shape[1]):
        raise ValueError("img_product holds a product index outside [0, n_texts)")


def _argsort_position(score: np.ndarray, targets: Iterable[int]) -> int:
    """Best (smallest) position of ``targets`` in ``np.argsort(score)[::-1]``, as in itm_eval."""
    inds = np.argsort(score)[::-1]
    return min(int(np.where(inds == t)[0][0]) for t in targets)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """``100.0 * #(ranks < k) / len(ranks)``, in the reference's operation order."""
    ranks = np.asarray(ranks)
    return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)


def _recalls(ranks: np.ndarray) -> tuple[float, float, float]:
    return recall_at(ranks, 1), recall_at(ranks, 5), recall_at(ranks, 10)


# ----------------------------------------------------------------------------------------------
# full protocol (§7.1)


def i2t_ranks(sim: np.ndarray, img_product: np.ndarray, *, chunk_size: int = 1024,
              ties: str = "argsort") -> tuple[np.ndarray, int]:
    """0-based rank of each image's own product text among all texts.

    Returns ``(ranks (n_images,) int64, n_tied)`` where ``n_tied`` counts the images whose rank
    depended on tie-breaking (a tie with the positive, or a NaN in the row).
    """
    _check_ties(ties)
    sim = np.asarray(sim)
    img_product = np.asarray(img_product, dtype=np.int64)
    _check_sim(sim, img_product)
    n_img = sim.shape[0]
    ranks = np.empty(n_img, dtype=np.int64)
    n_tied = 0
    for r0 in range(0, n_img, chunk_size):
        r1 = min(n_img, r0 + chunk_size)
        block = sim[r0:r1]
        gt_idx = img_product[r0:r1]
        gt = block[np.arange(r1 - r0), gt_idx][:, None]
        greater = np.count_nonzero(block > gt, axis=1)
        equal = np.count_nonzero(block == gt, axis=1)  # includes the positive itself
        has_nan = np.isnan(block).any(axis=1) if block.dtype.kind == "f" else np.zeros(r1 - r0, bool)
        ranks[r0:r1] = greater + equal - 1 if ties == "pessimistic" else greater
        for j in np.flatnonzero((equal != 1) | has_nan):
            n_tied += 1
            # NaN rows and the reference tie order both need the literal sort.
            if ties == "argsort" or has_nan[j]:
                ranks[r0 + j] = _argsort_position(block[j], (int(gt_idx[j]),))
    return ranks, n_tied


def t2i_ranks(sim: np.ndarray, img_product: np.ndarray, *, chunk_size: int = 1024,
              ties: str = "argsort") -> tuple[np.ndarray, int]:
    """Per product text, the best 0-based rank among its images over all images.

    Returns ``(ranks (n_texts,) int64, n_tied)``. Products without images get rank 100000,
    as in ``itm_eval``.
    """
    _check_ties(ties)
    sim = np.asarray(sim)
    img_product = np.asarray(img_product, dtype=np.int64)
    _check_sim(sim, img_product)
    n_img, n_txt = sim.shape
    pos_score = sim[np.arange(n_img), img_product]
    # Best positive score per product; ranking is then decided by that one value unless a
    # *negative* image ties it (ties among positives cannot change the best position).
    pos_max = np.full(n_txt, -np.inf, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN columns are re-ranked by argsort below
        np.maximum.at(pos_max, img_product, pos_score.astype(np.float64))
    n_pos = np.bincount(img_product, minlength=n_txt)
    pos_max = pos_max.astype(sim.dtype) if sim.dtype.kind == "f" else pos_max
    pos_at_max = np.zeros(n_txt, dtype=np.int64)
    np.add.at(pos_at_max, img_product, (pos_score == pos_max[img_product]).astype(np.int64))

    ranks = np.empty(n_txt, dtype=np.int64)
    n_tied = 0
    images_of: dict[int, np.ndarray] | None = None
    for c0 in range(0, n_txt, chunk_size):
        c1 = min(n_txt, c0 + chunk_size)
        block = sim[:, c0:c1]
        thr = pos_max[c0:c1][None, :]
        greater = np.count_nonzero(block > thr, axis=0)
        neg_equal = np.count_nonzero(block == thr, axis=0) - pos_at_max[c0:c1]
        has_nan = np.isnan(block).any(axis=0) if block.dtype.kind == "f" else np.zeros(c1 - c0, bool)
        if ties == "pessimistic":
            ranks[c0:c1] = greater + neg_equal
        else:
            ranks[c0:c1] = greater
        for j in np.flatnonzero((neg_equal != 0) | has_nan):
            t = c0 + j
            if n_pos[t] == 0:
                continue
            n_tied += 1
            if ties == "argsort" or has_nan[j]:
                if images_of is None:
                    order = np.argsort(img_product, kind="stable")
                    bounds = np.concatenate([[0], np.cumsum(n_pos)])
                    images_of = {p: order[bounds[p]:bounds[p + 1]] for p in range(n_txt)}
                ranks[t] = _argsort_position(block[:, j], images_of[t])
    ranks[n_pos == 0] = _NO_POSITIVE_RANK
    return ranks, n_tied


def full_protocol(sim: np.ndarray, img_product: np.ndarray, *, chunk_size: int = 1024,
                  ties: str = "argsort") -> dict[str, float]:
    """FashionGen "full" protocol (§7.1): all images vs all product texts.

    Pass ``sim`` in float32 to mirror the reference, whose score matrix is a float32 torch
    product. Keys: ``i2t_r1/5/10``, ``t2i_r1/5/10``, ``i2t_mean``, ``t2i_mean``,
    ``r_mean`` = (I2T R@1 + T2I R@1)/2, ``sum`` (= ``full_sum``), plus the query counts and the
    number of tie-dependent queries per direction.
    """
    ri, tied_i = i2t_ranks(sim, img_product, chunk_size=chunk_size, ties=ties)
    rt, tied_t = t2i_ranks(sim, img_product, chunk_size=chunk_size, ties=ties)
    return full_metrics(ri, rt, tied_i, tied_t)


def full_metrics(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray, i2t_tied: int | None = None,
                 t2i_tied: int | None = None) -> dict[str, float]:
    """The full protocol's dict from 0-based ranks (``itm_eval``'s formulas and their order)."""
    tr1, tr5, tr10 = _recalls(ranks_i2t)
    ir1, ir5, ir10 = _recalls(ranks_t2i)
    out = {
        "i2t_r1": tr1, "i2t_r5": tr5, "i2t_r10": tr10,
        "t2i_r1": ir1, "t2i_r5": ir5, "t2i_r10": ir10,
        "i2t_mean": (tr1 + tr5 + tr10) / 3,
        "t2i_mean": (ir1 + ir5 + ir10) / 3,
        "r_mean": (tr1 + ir1) / 2,
        "sum": tr1 + tr5 + tr10 + ir1 + ir5 + ir10,
        "n_i2t": int(len(ranks_i2t)), "n_t2i": int(len(ranks_t2i)),
    }
    if i2t_tied is not None:
        out["i2t_tied"] = int(i2t_tied)
    if t2i_tied is not None:
        out["t2i_tied"] = int(t2i_tied)
    return out


def sample100_metrics(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray, i2t_tied: int | None = None,
                      t2i_tied: int | None = None) -> dict[str, float]:
    """The sample-100 protocol's dict from 0-based ranks of the positive among its candidates."""
    tr1, tr5, tr10 = _recalls(np.asarray(ranks_i2t))
    ir1, ir5, ir10 = _recalls(np.asarray(ranks_t2i))
    out = {
        "i2t_r1": tr1, "i2t_r5": tr5, "i2t_r10": tr10,
        "t2i_r1": ir1, "t2i_r5": ir5, "t2i_r10": ir10,
        "sum": tr1 + tr5 + tr10 + ir1 + ir5 + ir10,
        "n_i2t": len(ranks_i2t), "n_t2i": len(ranks_t2i),
    }
    if i2t_tied is not None:
        out["i2t_tied"] = int(i2t_tied)
    if t2i_tied is not None:
        out["t2i_tied"] = int(t2i_tied)
    return out


# ----------------------------------------------------------------------------------------------
# sample-100 protocol (§7.2, B6)


def sample100_candidates(img_product: Sequence[int], img_subcategory: Sequence[Hashable],
                         product_ids_order: Sequence[int] | None = None, seed: int = 66,
                         n_queries: int = 1000, n_neg: int | None = None,
                         clean: bool = False) -> dict[str, Any]:
    """Draw the sample-100 candidate sets exactly as the reference's eval-only run does.

    Mirrors FashionSAP ``get_i2t_test`` then ``get_t2i_test`` after ``random.seed(seed)``: same
    Python ``random`` calls in the same order, on the same data structures:

    * products in ``productid_list`` order (index ``p``); a product's images in row order;
    * ``subcate_map``: subcategories in order of first appearance over the rows, each one's
      products as ``list(set_of_product_ids)`` filled in row order. The set iteration order
      depends on the id *values* (CPython int hash), so pass the real FashionGen product ids as
      ``product_ids_order`` (``product_ids_order[p]`` = id of product ``p``) to reproduce the
      reference draw; without it the product indices stand in as ids, which gives a valid draw
      with the same distribution but not the reference's sets.

    I2T query: a product, one random image of it (the query), negatives from the image's
    subcategory minus the product; while fewer than ``n_neg``, whole further subcategories from a
    shuffled list (own one removed) are appended; ``n_neg`` are sampled. T2I query: the same, but
    the shuffle precedes the positive-image draw and the own subcategory is *not* removed from the
    fallback list, so the positive product (and duplicates of negatives) can re-enter (B6); each
    negative product then contributes one random image.

    Deviations, only where the reference would raise: when the fallback runs out of
    subcategories before ``n_neg`` negatives exist, all collected ones are used (a
    ``random.sample`` of all of them, so fewer than ``n_neg`` candidates); the fallback threshold
    is ``n_neg`` (the reference hard-codes 100, the same for the default). Fewer products than
    ``n_queries`` simply gives one query per product, as the reference's slice does.

    A private ``random.Random(seed)`` replaces the global generator; it yields the same stream as
    ``random.seed(seed)`` followed by the module-level functions, without disturbing global state.

    ``clean=True`` draws the *cleaned* variant (B6), which is not the reference's protocol but the
    FashionBERT one: ``n_neg`` defaults to 99 (99 negatives + the positive = 100 candidates), T2I
    removes the own subcategory from the fallback list as I2T does, and in both directions the
    query's own product is dropped from the negative pool wherever it appears (a product with
    images in several subcategories) and the pool holds each product once, so the negatives are
    distinct products other than the query's. The random calls keep the reference's structure
    (the I2T query products, drawn first, are the reference draw's for the same seed; the rest
    diverges). The returned dict then carries ``"clean": True``; the default draw is unchanged
    (no such key).

    Returns a JSON-serialisable dict with ``"i2t"``: ``[image, [product candidates], product]``
    and ``"t2i"``: ``[product, [image candidates], image]`` per query; the positive is always the
    *last* candidate, which is the position the reference scores (``inds == 100``).
    """
    if n_neg is None:
        n_neg = CLEAN_NEGATIVES if clean else REFERENCE_NEGATIVES
    img_product = [int(p) for p in np.asarray(img_product).reshape(-1)]
    img_subcategory = list(img_subcategory)
    if len(img_subcategory) != len(img_product):
        raise ValueError("img_product and img_subcategory must have the same length")
    n_products = (len(product_ids_order) if product_ids_order is not None
                  else (max(img_product) + 1 if img_product else 0))
    if product_ids_order is None:
        ids = list(range(n_products))
    else:
        ids = [int(x) for x in product_ids_order]
        if len(set(ids)) != len(ids):
            raise ValueError("product_ids_order must hold unique product ids")
    if img_product and (min(img_product) < 0 or max(img_product) >= n_products):
        raise ValueError("img_product holds a product index outside [0, n_products)")

    product_images: list[list[int]] = [[] for _ in range(n_products)]
    for i, p in enumerate(img_product):
        product_images[p].append(i)
    if any(not imgs for imgs in product_images):
        raise ValueError("every product needs at least one image")

    # __cluster_subcate, on ids (set order depends on the id values), then mapped to indices;
    # the id <-> index map is a bijection so list order and membership are unchanged.
    subcate_sets: dict[Hashable, set[int]] = {}
    for i, p in enumerate(img_product):
        sub = img_subcategory[i]
        if sub in subcate_sets:
            subcate_sets[sub].add(ids[p])
        else:
            subcate_sets[sub] = set([ids[p]])
    id_to_index = {pid: k for k, pid in enumerate(ids)}
    subcate_map = {k: [id_to_index[pid] for pid in v] for k, v in subcate_sets.items()}

    rng = random.Random(seed)

    def negatives(p: int, sub: Hashable, subcates: list) -> list[int]:
        neg = list(subcate_map[sub])
        neg.remove(p)
        if clean:
            # Order-preserving, so the pool (and the draw) does not depend on set iteration.
            seen = set(neg)
            seen.add(p)
            while len(neg) < n_neg and subcates:
                for q in subcate_map[subcates.pop()]:
                    if q not in seen:
                        seen.add(q)
                        neg.append(q)
        else:
            while len(neg) < n_neg and subcates:
                neg.extend(subcate_map[subcates.pop()])
        return rng.sample(neg, min(n_neg, len(neg)))

    # get_i2t_test
    i2t = []
    order = list(range(n_products))
    rng.shuffle(order)
    for p in order[:n_queries]:
        img = rng.choice(product_images[p])
        subcates = list(subcate_map.keys())
        rng.shuffle(subcates)
        sub = img_subcategory[img]
        subcates.remove(sub)
        neg = negatives(p, sub, subcates)
        i2t.append([img, neg + [p], p])

    # get_t2i_test
    t2i = []
    order = list(range(n_products))
    rng.shuffle(order)
    for p in order[:n_queries]:
        subcates = list(subcate_map.keys())
        rng.shuffle(subcates)
        pos_img = rng.choice(product_images[p])
        sub = img_subcategory[pos_img]
        if clean:
            subcates.remove(sub)
        neg = negatives(p, sub, subcates)
        neg_imgs = [rng.choice(product_images[q]) for q in neg]
        t2i.append([p, neg_imgs + [pos_img], pos_img])

    out = {
        "format": CANDIDATES_FORMAT,
        "seed": seed,
        "n_queries": n_queries,
        "n_neg": n_neg,
        "n_images": len(img_product),
        "n_products": n_products,
        "reference_ids": product_ids_order is not None,
    }
    if clean:
        out["clean"] = True
    out["i2t"] = i2t
    out["t2i"] = t2i
    return out


def save_candidates(path: str | os.PathLike, cands: Mapping[str, Any]) -> None:
    """Write candidate sets as JSON atomically (temp file in the same folder + ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_cands_", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(cands, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_candidates(path: str | os.PathLike) -> dict[str, Any]:
    """Read candidate sets written by :func:`save_candidates`."""
    with open(path, "r", encoding="utf-8") as f:
        cands = json.load(f)
    if cands.get("format") != CANDIDATES_FORMAT:
        raise ValueError(f"{path}: not a {CANDIDATES_FORMAT} candidate file")
    return cands


def _candidates_match(cands: Mapping[str, Any], n_images: int, n_products: int, seed: int,
                      n_queries: int, n_neg: int, clean: bool, reference_ids: bool) -> bool:
    return (cands.get("n_images") == n_images and cands.get("n_products") == n_products
            and cands.get("seed") == seed and cands.get("n_queries") == n_queries
            and cands.get("n_neg") == n_neg and bool(cands.get("clean", False)) == bool(clean)
            and bool(cands.get("reference_ids")) == reference_ids)


def load_or_draw_candidates(path: str | os.PathLike | None, img_product: Sequence[int],
                            img_subcategory: Sequence[Hashable],
                            product_ids: Sequence[int] | None, seed: int = REFERENCE_SEED,
                            n_queries: int = 1000, n_neg: int | None = None,
                            clean: bool = False) -> dict[str, Any]:
    """The saved candidate sets at ``path`` if they were drawn for this split and these settings,
    else a fresh :func:`sample100_candidates` draw, saved to ``path`` (overwriting a stale file).

    "This split and these settings" means the same number of images and products, seed,
    ``n_queries``, ``n_neg``, variant (``clean``) and whether real product ids were given. An
    unreadable file is redrawn too. ``path=None`` draws without saving. Drawing once and reusing
    the file keeps every later evaluation on the same sets (B6).
    """
    if n_neg is None:
        n_neg = CLEAN_NEGATIVES if clean else REFERENCE_NEGATIVES
    n_images = int(np.asarray(img_product).size)
    n_products = (len(product_ids) if product_ids is not None
                  else (int(np.max(img_product)) + 1 if n_images else 0))
    if path is not None and os.path.isfile(path):
        try:
            cands = load_candidates(path)
        except (ValueError, OSError):
            cands = None
        if cands is not None and _candidates_match(cands, n_images, n_products, seed, n_queries,
                                                   n_neg, clean, product_ids is not None):
            return cands
    cands = sample100_candidates(img_product, img_subcategory, product_ids_order=product_ids,
                                 seed=seed, n_queries=n_queries, n_neg=n_neg, clean=clean)
    if path is not None:
        save_candidates(path, cands)
    return cands


def clean_candidates_file(path: str | os.PathLike) -> str:
    """Where the cleaned sets live beside the reference ones: ``.../sample100_candidates.json``
    -> ``.../sample100_clean_candidates.json`` (other names get ``_clean`` before the suffix)."""
    folder, name = os.path.split(os.fspath(path))
    if "sample100_candidates" in name:
        name = name.replace("sample100_candidates", "sample100_clean_candidates", 1)
    else:
        stem, ext = os.path.splitext(name)
        name = f"{stem}_clean{ext}"
    return os.path.join(folder, name)


def sample100_draws(img_product: Sequence[int], img_subcategory: Sequence[Hashable],
                    product_ids_order: Sequence[int] | None = None,
                    seeds: Iterable[int] = tuple(range(REFERENCE_SEED, REFERENCE_SEED + N_DRAWS)),
                    n_queries: int = 1000, n_neg: int | None = None,
                    clean: bool = False) -> list[dict[str, Any]]:
    """One :func:`sample100_candidates` draw per seed (default 66..70, the reference seed first)."""
    return [sample100_candidates(img_product, img_subcategory, product_ids_order, seed=int(s),
                                 n_queries=n_queries, n_neg=n_neg, clean=clean) for s in seeds]


def mean_std(results: Sequence[Mapping[str, float]],
             keys: Sequence[str] = SAMPLE100_RECALL_KEYS,
             ddof: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation of each key over several draws' results.

    The spread is the *sample* standard deviation (``ddof=1``, divisor n - 1): the draws are a
    sample of the protocol's possible candidate sets, and this estimates how much one draw's
    number moves from draw to draw. With a single draw it is NaN. Pass ``ddof=0`` for the
    population convention.
    """
    if not results:
        raise ValueError("mean_std needs at least one result")
    mean, std = {}, {}
    for k in keys:
        v = np.asarray([float(r[k]) for r in results], dtype=np.float64)
        mean[k] = float(v.mean())
        std[k] = float(v.std(ddof=ddof)) if len(v) > ddof else float("nan")
    return mean, std


def fashiongen_protocols(z_v, z_t, img_product: Sequence[int],
                         img_subcategory: Sequence[Hashable], product_ids: Sequence[int] | None,
                         *, candidates_path: str | os.PathLike | None = None,
                         clean_candidates_path: str | os.PathLike | None = None,
                         seed: int = REFERENCE_SEED, n_draws: int = N_DRAWS,
                         n_queries: int = 1000, n_neg: int = REFERENCE_NEGATIVES,
                         clean_n_neg: int | None = None, mesh=None,
                         axis_names: Sequence[str] = ("data",), **block_kw) -> dict[str, float]:
    """Every FashionGen protocol on the devices, as one flat dict (values in percent).

    Thin wrapper of :func:`fine_jax.eval.fast.fashiongen_protocols` (imported lazily, so this
    module stays NumPy-only); see there for the keys.
    """
    from fine_jax.eval import fast

    return fast.fashiongen_protocols(
        z_v, z_t, img_product, img_subcategory, product_ids, candidates_path=candidates_path,
        clean_candidates_path=clean_candidates_path, seed=seed, n_draws=n_draws,
        n_queries=n_queries, n_neg=n_neg, clean_n_neg=clean_n_neg, mesh=mesh,
        axis_names=axis_names, **block_kw)


def sample100_protocol(sim: np.ndarray, cands: Mapping[str, Any], *,
                       ties: str = "argsort") -> dict[str, float]:
    """R@1/5/10 on the saved sample-100 sets, ranking the last candidate (the positive).

    As in ``itm_eval``, each query's candidate scores are copied into a float64 array
    (``np.zeros(...)`` there) before ``argsort(...)[::-1]``. With a repeated candidate
    (possible in T2I, B6) the positive ties with its copy, which is why the position, not the
    id, is ranked.
    """
    _check_ties(ties)
    sim = np.asarray(sim)
    n_img, n_txt = sim.shape
    if cands.get("n_images", n_img) != n_img or cands.get("n_products", n_txt) != n_txt:
        raise ValueError("candidate sets were drawn for a different number of images/products")

    def rank(score: np.ndarray) -> int:
        last = len(score) - 1
        if ties == "argsort":
            return _argsort_position(score, (last,))
        greater = int(np.count_nonzero(score > score[last]))
        if ties == "optimistic":
            return greater
        return greater + int(np.count_nonzero(score == score[last])) - 1

    ri, rt = [], []
    for img, cand, pos in cands["i2t"]:
        if cand[-1] != pos:
            raise ValueError("the positive must be the last I2T candidate")
        ri.append(rank(np.asarray(sim[img, cand], dtype=np.float64)))
    for txt, cand, pos in cands["t2i"]:
        if cand[-1] != pos:
            raise ValueError("the positive must be the last T2I candidate")
        rt.append(rank(np.asarray(sim[cand, txt], dtype=np.float64)))
    return sample100_metrics(np.asarray(ri), np.asarray(rt))


# ----------------------------------------------------------------------------------------------
# twin protocol


def twin_protocol(sim: np.ndarray, img_product: np.ndarray,
                  twin_pairs: Iterable[Sequence[int]]) -> dict[str, float]:
    """Two-way discrimination between near-duplicate products ("twins"); chance is 50%.

    For a pair ``(a, b)``:

    * I2T: every image of ``a`` is correct when ``sim[i, a] > sim[i, b]``, every image of ``b``
      when ``sim[i, b] > sim[i, a]``; ties count as wrong.
    * T2I: the text of ``a`` is correct when its best (max) similarity over ``a``'s images beats
      its best over ``b``'s images, and symmetrically for ``b``; ties count as wrong. Max over a
      product's images matches the full protocol, where a text's rank is its best image's rank.

    Accuracies are in percent over all images (I2T) and all texts (T2I) of all pairs; a product in
    several pairs counts once per pair.
    """
    sim = np.asarray(sim)
    img_product = np.asarray(img_product, dtype=np.int64)
    _check_sim(sim, img_product)
    n_txt = sim.shape[1]
    order = np.argsort(img_product, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(img_product, minlength=n_txt))])

    def images(p: int) -> np.ndarray:
        if not 0 <= p < n_txt:
            raise ValueError(f"product index {p} outside [0, {n_txt})")
        imgs = order[bounds[p]:bounds[p + 1]]
        if imgs.size == 0:
            raise ValueError(f"product {p} has no images")
        return imgs

    i2t_ok = i2t_n = t2i_ok = t2i_n = n_pairs = 0
    for pair in twin_pairs:
        a, b = (int(x) for x in pair)
        if a == b:
            raise ValueError(f"twin pair ({a}, {b}) names one product twice")
        ia, ib = images(a), images(b)
        i2t_ok += int(np.count_nonzero(sim[ia, a] > sim[ia, b]))
        i2t_ok += int(np.count_nonzero(sim[ib, b] > sim[ib, a]))
        i2t_n += ia.size + ib.size
        t2i_ok += int(sim[ia, a].max() > sim[ib, a].max())
        t2i_ok += int(sim[ib, b].max() > sim[ia, b].max())
        t2i_n += 2
        n_pairs += 1
    if n_pairs == 0:
        raise ValueError("twin_pairs is empty")
    return {
        "i2t_acc": 100.0 * i2t_ok / i2t_n,
        "t2i_acc": 100.0 * t2i_ok / t2i_n,
        "n_pairs": n_pairs, "n_i2t": i2t_n, "n_t2i": t2i_n,
    }


# ----------------------------------------------------------------------------------------------
# reporting


def to_reference_keys(full: Mapping[str, float] | None = None,
                      sample100: Mapping[str, float] | None = None) -> dict[str, float]:
    """Rename results to the reference's ``eval_result`` keys (missing tiny values are 0 there)."""
    out: dict[str, float] = {}
    for name, res in (("full", full), ("sample100", sample100)):
        for ours, theirs in REFERENCE_KEYS[name].items():
            out[theirs] = float(res[ours]) if res is not None else 0.0
    return out


_RECALL_COLS = [("i2t_r1", "I2T R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"),
                ("t2i_r1", "T2I R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"), ("sum", "sum")]


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.2f}"
    return str(v)


def format_report(results: Mapping[str, Any]) -> str:
    """Compact table: one row per protocol, recalls in columns, other values as ``key=value``.

    ``results`` is either one protocol's dict or ``{protocol_name: dict, ...}``.
    """
    if results and all(not isinstance(v, Mapping) for v in results.values()):
        results = {"results": results}
    name_w = max([len("protocol")] + [len(str(k)) for k in results])
    col_w = [max(len(title), 7) for _, title in _RECALL_COLS]
    head = "protocol".ljust(name_w) + "  " + "  ".join(
        title.rjust(w) for (_, title), w in zip(_RECALL_COLS, col_w))
    lines = [head, "-" * len(head)]
    recall_keys = dict(_RECALL_COLS)
    for name, res in results.items():
        cells = [str(name).ljust(name_w)]
        if any(k in res for k in recall_keys):
            cells += [(_fmt(res[k]) if k in res else "-").rjust(w)
                      for (k, _), w in zip(_RECALL_COLS, col_w)]
        extras = " ".join(f"{k}={_fmt(v)}" for k, v in res.items() if k not in recall_keys)
        if extras:
            cells.append(extras)
        lines.append("  ".join(cells))
    return "\n".join(lines)
