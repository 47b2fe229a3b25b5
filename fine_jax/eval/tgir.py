"""FashionIQ text-guided image retrieval protocol (method spec §7.4).

Reference (Fashion-FINE ``tgir.py``, ``evaluation`` then ``itm_eval``): per category, the query
features ``f`` (fusion of the reference image and the modification text) against the gallery
features (CLS of every image of the category's val triplets), ``sim_f2i = fusion_feats @
img_feats.t()`` in float32, and for query ``i``::

    inds = np.argsort(score)[::-1]
    ranks[i] = np.where(inds == labels[i][2])[0][0]

so a rank is the 0-based position of the **target** among the whole gallery, the reference image
included (it is not removed), in the descending order of ``np.argsort(score)[::-1]`` - not
``np.argsort(-score)``, which orders ties the other way round. The recalls are
``100.0 * len(np.where(ranks < K)[0]) / len(ranks)`` for K = 1, 5, 10, 50, and the reference's
``img_r_mean`` is the mean of R@1/5/10 (our ``r_mean``). Model selection keeps the best
``dress + toptee + shirt`` R@10 plus the same R@50 (:func:`tgir_report`'s ``tgir/select``).

Ties as in :mod:`fine_jax.eval.retrieval`: the rank is the number of gallery items scoring
strictly higher than the target, unless one ties it (or the row holds a NaN), in which case the
literal ``argsort(...)[::-1]`` position is taken with the installed numpy. :func:`tgir_protocol`
does this on the devices (:func:`fine_jax.eval.fast.rank_rows`, on the device similarity matrix);
:func:`tgir_protocol_host` on a similarity matrix held by the host.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fine_jax.eval import retrieval as R

__all__ = ["CATEGORIES", "RECALL_KS", "check_labels", "tgir_metrics", "tgir_protocol",
           "tgir_protocol_host", "tgir_report"]

CATEGORIES = ("dress", "shirt", "toptee")
RECALL_KS = (1, 5, 10, 50)


def check_labels(labels, n_queries: int, n_gallery: int) -> np.ndarray:
    """``labels`` (n_queries, 3) = (query i, reference index, target index) -> targets."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n_queries, 3):
        raise ValueError(f"labels must have shape ({n_queries}, 3), got {labels.shape}")
    if not np.array_equal(labels[:, 0], np.arange(n_queries)):
        raise ValueError("labels[:, 0] must be the query index 0..n-1, as get_labels builds it")
    if n_queries and (labels[:, 1:].min() < 0 or labels[:, 1:].max() >= n_gallery):
        raise ValueError(f"labels hold a gallery index outside [0, {n_gallery})")
    return labels[:, 2]


def tgir_metrics(ranks: np.ndarray, tied: np.ndarray | int | None = None) -> dict[str, float]:
    """R@1/5/10/50 (percent), ``r_mean`` = mean of R@1/5/10 (``img_r_mean``), query count and,
    when given, the number of tie-dependent queries."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": R.recall_at(ranks, k) for k in RECALL_KS}
    out["r_mean"] = (out["r1"] + out["r5"] + out["r10"]) / 3
    out["n_queries"] = int(len(ranks))
    if tied is not None:
        out["tied"] = int(np.sum(tied))
    return out


def tgir_protocol(f_query, f_gallery, labels, *, mesh=None, axis_names: Sequence[str] = ("data",),
                  block_rows: int | None = None, tile_cols: int | None = None,
                  return_ranks: bool = False):
    """The TGIR metrics of one category on the devices (blocked; queries sharded over ``mesh``).

    ``f_query`` (n_queries, E), ``f_gallery`` (n_gallery, E): L2-normalised features;
    ``labels`` as built by ``fine_jax.data.fashioniq.TGIRValSet.labels``. Returns
    :func:`tgir_metrics`'s dict, and the per-query ranks too with ``return_ranks=True``.
    """
    from fine_jax.eval import fast

    f_query = np.asarray(f_query, dtype=np.float32)
    f_gallery = np.asarray(f_gallery, dtype=np.float32)
    targets = check_labels(labels, len(f_query), len(f_gallery))
    ranks, tied = fast.rank_rows(f_query, f_gallery, targets, mesh=mesh, axis_names=axis_names,
                                 block_rows=block_rows, tile_cols=tile_cols)
    res = tgir_metrics(ranks, tied)
    return (res, ranks) if return_ranks else res


def tgir_protocol_host(sim: np.ndarray, labels) -> dict[str, float]:
    """The same metrics from a (n_queries, n_gallery) similarity matrix on the host."""
    sim = np.asarray(sim)
    targets = check_labels(labels, sim.shape[0], sim.shape[1])
    ranks, n_tied = R.i2t_ranks(sim, targets)
    return tgir_metrics(ranks, n_tied)


def tgir_report(results: Mapping[str, Mapping[str, float]],
                categories: Sequence[str] = CATEGORIES) -> dict[str, float]:
    """Flat report keys from per-category results (``{"dress": ..., "shirt": ..., "toptee": ...}``
    and optionally ``"all"``, each a :func:`tgir_metrics` dict):

    * ``tgir/<cat>/r1``, ``r5``, ``r10``, ``r50`` for every category given;
    * ``tgir/avg/r1`` ... ``r50``: the mean over ``categories`` (the three FashionIQ ones);
    * ``tgir/avg/mean`` = (avg R@10 + avg R@50) / 2, the usual FashionIQ "mean";
    * ``tgir/select`` = sum over the categories of R@10 + R@50, summed in the reference's order
      (dress, toptee, shirt R@10, then the same R@50), its checkpoint-selection criterion.
    """
    missing = [c for c in categories if c not in results]
    if missing:
        raise ValueError(f"tgir_report needs every category of {tuple(categories)}; "
                         f"missing {missing}")
    out: dict[str, float] = {}
    for cat, res in results.items():
        for k in RECALL_KS:
            out[f"tgir/{cat}/r{k}"] = float(res[f"r{k}"])
    for k in RECALL_KS:
        vals = [float(results[c][f"r{k}"]) for c in categories]
        out[f"tgir/avg/r{k}"] = sum(vals) / len(vals)
    out["tgir/avg/mean"] = (out["tgir/avg/r10"] + out["tgir/avg/r50"]) / 2
    ref_order = [c for c in ("dress", "toptee", "shirt") if c in categories]
    ref_order += [c for c in categories if c not in ref_order]
    select = 0.0
    for k in ("r10", "r50"):
        for c in ref_order:
            select += float(results[c][k])
    out["tgir/select"] = select
    return out
