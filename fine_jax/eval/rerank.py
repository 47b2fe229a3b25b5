"""ITM re-ranking of each query's contrastive top-k (an optional, non-reference protocol).

The reference ranks by ITC cosine only (§7: "no ITM re-ranking and no k_test"); ALBEF-style
re-ranking is reported under separate keys. For each query, the k best candidates by contrastive
score are re-ordered by the fusion encoder's ITM score; everything outside them keeps its
contrastive rank. So the re-ranked rank of a query's positive is

* its position in the ITM order of the top-k (ITM score descending, equal ITM scores in
  contrastive order, NaN last), when a positive is in the top-k - for T2I, where a text has
  several positive images, the best position among them;
* otherwise its contrastive rank, which is at least k (``max(rank, k)`` is taken, so a positive
  the top-k list missed never lands inside it, even if the list and the rank disagree on a tie
  at the boundary).

The functions on ranks are pure NumPy. :func:`fashiongen_itm_rerank` wires them to the device
protocols (:mod:`fine_jax.eval.fast`) and a caller-supplied ITM scorer.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fine_jax.eval import retrieval as R

__all__ = ["rerank_positions", "rerank", "rerank_i2t", "rerank_t2i", "rerank_sample100",
           "sample100_topk", "fashiongen_itm_rerank"]


def rerank_positions(itm: np.ndarray) -> np.ndarray:
    """(n_q, k) ITM scores of the top-k in contrastive order -> each entry's 0-based position
    after re-ranking: ITM descending, equal ITM scores keep their contrastive order, NaN last."""
    itm = np.asarray(itm, dtype=np.float64)
    if itm.ndim != 2:
        raise ValueError(f"itm must be (n_queries, k), got shape {itm.shape}")
    # Stable ascending sort of -itm: descending ITM, ties by contrastive position, NaN last.
    order = np.argsort(-itm, axis=1, kind="stable")
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.arange(itm.shape[1])[None, :].repeat(len(itm), 0), axis=1)
    return pos


def rerank(is_positive: np.ndarray, itm: np.ndarray, contrastive_rank: np.ndarray) -> np.ndarray:
    """Re-ranked 0-based rank per query.

    ``is_positive`` (n_q, k): whether each top-k candidate is a positive of the query;
    ``itm`` (n_q, k): the candidates' ITM scores, in contrastive order; ``contrastive_rank``
    (n_q,): the positive's rank without re-ranking (best over positives).
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    itm = np.asarray(itm)
    contrastive_rank = np.asarray(contrastive_rank, dtype=np.int64)
    if is_positive.shape != itm.shape or contrastive_rank.shape != (itm.shape[0],):
        raise ValueError(f"shapes disagree: is_positive {is_positive.shape}, itm {itm.shape}, "
                         f"contrastive_rank {contrastive_rank.shape}")
    k = itm.shape[1]
    pos = np.where(is_positive, rerank_positions(itm), np.iinfo(np.int64).max)
    best = pos.min(axis=1) if k else np.full(len(itm), np.iinfo(np.int64).max)
    return np.where(is_positive.any(axis=1), best, np.maximum(contrastive_rank, k))


def rerank_i2t(topk_idx: np.ndarray, itm: np.ndarray, img_product: np.ndarray,
               contrastive_rank: np.ndarray) -> np.ndarray:
    """I2T: ``topk_idx`` (n_images, k) text indices per image; the positive is the image's
    product text."""
    img_product = np.asarray(img_product, dtype=np.int64)
    return rerank(np.asarray(topk_idx) == img_product[:, None], itm, contrastive_rank)


def rerank_t2i(topk_idx: np.ndarray, itm: np.ndarray, img_product: np.ndarray,
               contrastive_rank: np.ndarray) -> np.ndarray:
    """T2I: ``topk_idx`` (n_texts, k) image indices per text; the positives are the product's
    images, and the rank is the best among them (as in the full protocol)."""
    img_product = np.asarray(img_product, dtype=np.int64)
    topk_idx = np.asarray(topk_idx, dtype=np.int64)
    return rerank(img_product[topk_idx] == np.arange(len(topk_idx))[:, None], itm,
                  contrastive_rank)


def sample100_topk(scores: np.ndarray, k: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """Positions (n_q, k) of each query's k best candidates by contrastive score: descending,
    equal scores by lower candidate position first, NaN (and positions past ``lengths``) last."""
    scores = np.asarray(scores, dtype=np.float64)
    if lengths is not None:
        cols = np.arange(scores.shape[1])[None, :]
        scores = np.where(cols < np.asarray(lengths)[:, None], scores, np.nan)
    k = int(k)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [1, {scores.shape[1]}], got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rerank_sample100(topk_pos: np.ndarray, itm: np.ndarray, contrastive_rank: np.ndarray,
                     lengths: np.ndarray | int) -> np.ndarray:
    """Sample-100: ``topk_pos`` (n_q, k) candidate positions (:func:`sample100_topk`); the
    positive is the last candidate, position ``lengths - 1``."""
    topk_pos = np.asarray(topk_pos)
    last = np.broadcast_to(np.asarray(lengths), (len(topk_pos),)) - 1
    return rerank(topk_pos == last[:, None], itm, contrastive_rank)


# ----------------------------------------------------------------------------------------------
# the whole FashionGen re-ranking, given an ITM scorer


def _unique_pairs(rows: np.ndarray, txt: np.ndarray, n_txt: int):
    key = rows.astype(np.int64) * n_txt + txt.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    return uniq // n_txt, uniq % n_txt, inverse


def fashiongen_itm_rerank(z_v, z_t, img_product, k: int,
                          score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                          candidates_path: str | os.PathLike | None = None,
                          candidates: Mapping[str, Any] | None = None,
                          twin_pairs: Iterable[Sequence[int]] = (), mesh=None,
                          axis_names: Sequence[str] = ("data",), block_rows: int | None = None,
                          tile_cols: int | None = None) -> dict[str, float]:
    """ITM re-ranking of the full protocol, sample-100 and the twin test; flat keys
    ``full_itm/<k>``, ``sample100_itm/<k>``, ``twin_itm/<k>`` in the layouts of
    ``retrieval.full_metrics`` / ``sample100_metrics`` / ``twin_protocol``, plus ``<group>/k``.

    ``score_pairs(image_rows, text_indices) -> (n,)`` ITM scores (higher = match) of the given
    (image, product text) pairs; it is called once, on the distinct pairs. The contrastive top-k
    and ranks come from the device protocols. Sample-100 uses ``candidates`` or the saved sets
    at ``candidates_path`` (skipped when neither exists); ``k`` is capped at the candidate count
    there. The twin test scores every image of both products of a pair against both texts.
    """
    from fine_jax.eval import fast

    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    img_product = np.asarray(img_product, dtype=np.int64)
    z_v, z_t = np.asarray(z_v, np.float32), np.asarray(z_t, np.float32)
    n_img, n_txt = len(z_v), len(z_t)
    if candidates is None and candidates_path is not None and os.path.isfile(candidates_path):
        candidates = R.load_candidates(candidates_path)
    kw = dict(mesh=mesh, axis_names=axis_names, block_rows=block_rows, tile_cols=tile_cols)
    res = fast.evaluate(z_v, z_t, img_product,
                        {"s": candidates} if candidates is not None else None, **kw)

    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    _, top_i2t = fast.topk_device(z_v, z_t, k_i2t, **kw)
    _, top_t2i = fast.topk_device(z_t, z_v, k_t2i, **kw)
    rows = [np.repeat(np.arange(n_img), k_i2t), top_t2i.reshape(-1)]
    txts = [top_i2t.reshape(-1), np.repeat(np.arange(n_txt), k_t2i)]

    if candidates is not None:
        sc_i2t, sc_t2i = res.sample100_scores["s"]
        len_i2t = np.asarray([len(c) for _, c, _ in candidates["i2t"]])
        len_t2i = np.asarray([len(c) for _, c, _ in candidates["t2i"]])
        k_s = min(k, int(len_i2t.min()), int(len_t2i.min()))
        cand_i2t = np.asarray([np.pad(c, (0, sc_i2t.shape[1] - len(c)))
                               for _, c, _ in candidates["i2t"]], np.int64)
        cand_t2i = np.asarray([np.pad(c, (0, sc_t2i.shape[1] - len(c)))
                               for _, c, _ in candidates["t2i"]], np.int64)
        pos_i2t = sample100_topk(sc_i2t, k_s, len_i2t)
        pos_t2i = sample100_topk(sc_t2i, k_s, len_t2i)
        q_img = np.asarray([q for q, _, _ in candidates["i2t"]], np.int64)
        q_txt = np.asarray([q for q, _, _ in candidates["t2i"]], np.int64)
        rows += [np.repeat(q_img, k_s), np.take_along_axis(cand_t2i, pos_t2i, 1).reshape(-1)]
        txts += [np.take_along_axis(cand_i2t, pos_i2t, 1).reshape(-1), np.repeat(q_txt, k_s)]

    twin_pairs = [(int(a), int(b)) for a, b in twin_pairs]
    if twin_pairs:
        products = sorted({p for pair in twin_pairs for p in pair})
        images_of = {p: np.flatnonzero(img_product == p) for p in products}
        for a, b in twin_pairs:
            for p in (a, b):
                for q in (a, b):
                    rows.append(images_of[p])
                    txts.append(np.full(len(images_of[p]), q))

    sizes = [len(r) for r in rows]
    u_rows, u_txt, inverse = _unique_pairs(np.concatenate(rows), np.concatenate(txts), n_txt)
    scores = np.asarray(score_pairs(u_rows, u_txt), dtype=np.float64).reshape(-1)
    if scores.shape != (len(u_rows),):
        raise ValueError(f"score_pairs returned {scores.shape}, expected ({len(u_rows)},)")
    parts = np.split(scores[inverse], np.cumsum(sizes)[:-1])

    fr = res.full_ranks
    ri = rerank_i2t(top_i2t, parts[0].reshape(n_img, k_i2t), img_product, fr.i2t)
    rt = rerank_t2i(top_t2i, parts[1].reshape(n_txt, k_t2i), img_product, fr.t2i)
    out = {f"full_itm/{m}": v for m, v in R.full_metrics(ri, rt).items()}
    out["full_itm/k"] = k
    j = 2
    if candidates is not None:
        sr = res.sample100_ranks["s"]
        si = rerank_sample100(pos_i2t, parts[2].reshape(-1, k_s), sr.i2t, len_i2t)
        st = rerank_sample100(pos_t2i, parts[3].reshape(-1, k_s), sr.t2i, len_t2i)
        out.update({f"sample100_itm/{m}": v for m, v in R.sample100_metrics(si, st).items()})
        out["sample100_itm/k"] = k_s
        j = 4
    if twin_pairs:
        col = {p: c for c, p in enumerate(products)}
        images = np.concatenate([images_of[p] for p in products])
        row_of = {int(i): r for r, i in enumerate(images)}
        sub = np.full((len(images), len(products)), np.nan)
        n = 0
        for a, b in twin_pairs:
            for p in (a, b):
                for q in (a, b):
                    sub[[row_of[int(i)] for i in images_of[p]], col[q]] = parts[j + n]
                    n += 1
        sub_product = np.asarray([col[int(img_product[i])] for i in images])
        twin = R.twin_protocol(sub, sub_product, [(col[a], col[b]) for a, b in twin_pairs])
        out.update({f"twin_itm/{m}": v for m, v in twin.items()})
    return out
