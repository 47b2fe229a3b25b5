"""The evaluators the trainer calls every epoch and ``fine_jax.evaluate`` calls once.

An evaluator needs only the weights and the evaluation split (never the training split, the
optimiser state, WordNet or a data iterator). ``evaluator(model, params, mesh, out_dir, log)``
embeds the split data-parallel over ``mesh``, scores it with the reference protocols and returns
a flat dict of percentages; ``evaluator.criterion`` names the key the best checkpoint is selected
by, as the reference selects ``checkpoint_best.pth`` (method_spec §7.3).

* :class:`FashionGenEvaluator` (stages 1 and 2): z_v for every image, z_t for every product text,
  the full protocol, sample-100 (the saved reference draw, the mean and spread over several
  draws, the cleaned variant), the twin test where the dataset defines twins, and optionally ITM
  re-ranking of each query's top-k (``eval.itm_rerank_k``) under ``*_itm`` keys. Criterion:
  ``full/sum``.
* :class:`FashionIQEvaluator` (stage 3): per category, the query features f(reference image,
  modification text) against the CLS features of that category's gallery; R@1/5/10/50 per
  category and averaged, under ``tgir/`` for the configured gallery (``eval.tgir_gallery``: the
  reference's ``val`` gallery by default) and under ``tgir_split/`` (or ``tgir_val/``) for the
  other one when the folder has its files. Criterion: ``tgir/select`` = sum over the categories of
  R@10 + R@50.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from fine_jax import datasets
from fine_jax.data import fashioniq as fiq_ops
from fine_jax.data import image as image_ops
from fine_jax.data import pipeline, samplers
from fine_jax.eval import rerank, retrieval, tgir
from fine_jax.eval.embed import Embedder, timed
from fine_jax.eval.results import group
from fine_jax.models.fine import FashionFINE

def _as_numbers(results: dict) -> dict:
    """Plain floats for JSON, counts (numbers of queries, ties, k) kept as ints."""
    return {k: int(v) if isinstance(v, (int, np.integer)) else float(v) for k, v in results.items()}


FASHIONGEN_GROUPS = ("full", "sample100", "sample100_mean", "sample100_std", "sample100_clean",
                     "twin", "full_itm", "sample100_itm", "twin_itm")


def _embed_fns(model: FashionFINE) -> dict:
    """Jittable embedding functions of a model, made once per model so they compile once."""
    def call(method):
        return lambda p, *args: model.apply({"params": p}, *args, method=method)

    return {name: call(getattr(FashionFINE, name)) for name in (
        "embed_images", "embed_texts", "itm_score", "embed_gallery", "embed_tgir_queries")}


class _Cache:
    """Per-model embedder and jitted functions."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._key = None

    def get(self, model, mesh):
        key = (model.config, id(mesh))
        if self._key != key:
            self._key = key
            self.embedder = Embedder(mesh, self.batch_size)
            self.fns = _embed_fns(model)
        return self.embedder, self.fns


# ----------------------------------------------------------------------------------------------
# FashionGen
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FashionGenEvaluator:
    source: Any  # the evaluation split's row source
    tokenizer: Any
    twins: list  # [(product id, product id)], may be empty
    max_len: int
    eval_cfg: Any  # the config's eval block
    criterion: str = "full/sum"

    @classmethod
    def from_config(cls, cfg) -> "FashionGenEvaluator":
        data = datasets.resolve(cfg, splits=("validation",), lexicon=False)
        return cls(data.eval, data.tokenizer, data.twins, cfg.data.max_len, cfg.eval)

    def __post_init__(self):
        self._cache = _Cache(self.eval_cfg.batch_size)
        self.vocab_size = self.tokenizer.vocab_size
        split = samplers.eval_set(self.source)
        self.img_product = split.image_product
        self.img_subcategory = split.image_subcategory
        self.product_ids = split.product_ids
        self.texts = pipeline.eval_texts(split.descriptions, self.tokenizer, self.max_len)

    def embed(self, model, params, mesh, log):
        embedder, fns = self._cache.get(model, mesh)
        p = embedder.params(params)
        size = model.config.image_size
        with timed(log, f"embedded {len(self.source)} images and {len(self.product_ids)} texts"):
            z_v = embedder(fns["embed_images"], p, (
                (b["image"],) for b in pipeline.eval_image_batches(self.source, size,
                                                                    embedder.batch_size)))
            z_t = embedder(fns["embed_texts"], p, [(self.texts["input_ids"],
                                                    self.texts["attention_mask"])],
                           pad_values=[self.tokenizer.pad_id, 1])
        return z_v, z_t

    def __call__(self, model, params, mesh, out_dir, log=print) -> dict:
        z_v, z_t = self.embed(model, params, mesh, log)
        e = self.eval_cfg
        out_dir = pathlib.Path(out_dir)
        # Every process draws the same sets (a fixed seed); only process 0 writes the file.
        saved = out_dir / "sample100_candidates.json" if jax.process_index() == 0 else None
        with timed(log, "scored the retrieval protocols"):
            results = retrieval.fashiongen_protocols(
                z_v, z_t, self.img_product, self.img_subcategory, self.product_ids,
                candidates_path=saved, seed=e.sample100_seed,
                n_draws=e.sample100_draws, n_queries=e.sample100_queries,
                n_neg=e.sample100_negatives, mesh=mesh)
            pairs = self._twin_pairs()
            if pairs:
                results.update({f"twin/{k}": v for k, v in self._twin(z_v, z_t, pairs).items()})
        if e.itm_rerank_k:
            with timed(log, f"ITM re-ranking of the top {e.itm_rerank_k}"):
                results.update(self._rerank(model, params, mesh, z_v, z_t, out_dir, log))
        return _as_numbers(results)

    def report(self, results: dict) -> str:
        return retrieval.format_report(group(results, FASHIONGEN_GROUPS))

    # --- twins ---------------------------------------------------------------------------------
    def _twin_pairs(self) -> list[tuple[int, int]]:
        index_of = {pid: i for i, pid in enumerate(self.product_ids)}
        return [(index_of[a], index_of[b]) for a, b in self.twins
                if a in index_of and b in index_of]

    def _twin(self, z_v, z_t, pairs) -> dict:
        """The twin test on the twin products' images and texts only (no full matrix)."""
        products = sorted({p for pair in pairs for p in pair})
        col = {p: j for j, p in enumerate(products)}
        images = np.flatnonzero(np.isin(self.img_product, products))
        sub = z_v[images].astype(np.float32) @ z_t[products].astype(np.float32).T
        # Remap to a small (images x twin products) problem with the same semantics.
        img_product = np.asarray([col[p] for p in self.img_product[images]])
        return retrieval.twin_protocol(sub, img_product, [(col[a], col[b]) for a, b in pairs])

    # --- ITM re-ranking -----------------------------------------------------------------------
    def _load_images(self, rows, size) -> np.ndarray:
        return np.stack([image_ops.test_transform(self.source[int(r)]["image"], size,
                                                  normalized=False) for r in rows])

    def itm_scores(self, model, params, mesh, img_rows, txt_idx) -> np.ndarray:
        """ITM match logits of the (image row, product text) pairs, in batches over the mesh."""
        embedder, fns = self._cache.get(model, mesh)
        p = embedder.params(params)
        size = model.config.image_size
        ids, mask = self.texts["input_ids"], self.texts["attention_mask"]
        bs = embedder.batch_size

        def batches():
            for s in range(0, len(img_rows), bs):
                rows, txt = img_rows[s:s + bs], txt_idx[s:s + bs]
                yield self._load_images(rows, size), ids[txt], mask[txt]

        return embedder(fns["itm_score"], p, batches(), pad_values=[0, self.tokenizer.pad_id, 1])

    def _rerank(self, model, params, mesh, z_v, z_t, out_dir, log) -> dict:
        k = int(self.eval_cfg.itm_rerank_k)
        return rerank.fashiongen_itm_rerank(
            z_v, z_t, self.img_product, k,
            score_pairs=lambda rows, txt: self.itm_scores(model, params, mesh, rows, txt),
            candidates_path=out_dir / "sample100_candidates.json",
            twin_pairs=self._twin_pairs(), mesh=mesh)


# ----------------------------------------------------------------------------------------------
# FashionIQ
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FashionIQEvaluator:
    fiq: Any  # fine_jax.data.fashioniq.FashionIQ
    tokenizer: Any
    max_len: int
    eval_cfg: Any
    categories: tuple = fiq_ops.CATEGORIES
    criterion: str = "tgir/select"

    @classmethod
    def from_config(cls, cfg) -> "FashionIQEvaluator":
        data = datasets.resolve_fashioniq(cfg)
        return cls(data.fiq, data.tokenizer, cfg.data.max_len, cfg.eval)

    def __post_init__(self):
        self._cache = _Cache(self.eval_cfg.batch_size)
        self.vocab_size = self.tokenizer.vocab_size
        # The configured gallery is reported under tgir/ and selects the best checkpoint; the
        # other one, when the folder has what it needs, is reported beside it.
        main = self.eval_cfg.tgir_gallery
        other = "split" if main == "val" else "val"
        self.galleries = {"tgir": {c: self.fiq.val_set(c, main) for c in self.categories}}
        self.skipped = None
        try:
            self.galleries[f"tgir_{other}"] = {c: self.fiq.val_set(c, other)
                                               for c in self.categories}
        except (FileNotFoundError, fiq_ops.FashionIQError) as e:
            self.skipped = f"the {other!r} gallery is not reported: {e}"

    def __call__(self, model, params, mesh, out_dir, log=print) -> dict:
        embedder, fns = self._cache.get(model, mesh)
        p = embedder.params(params)
        if self.skipped:
            log(self.skipped)
        results = {}
        for prefix, val_sets in self.galleries.items():
            per_category = {cat: self._category(embedder, fns, p, model, vs, mesh, log)
                            for cat, vs in val_sets.items()}
            report = tgir.tgir_report(per_category)
            results.update({prefix + k[len("tgir"):]: v for k, v in report.items()})
        return _as_numbers(results)

    def _category(self, embedder, fns, p, model, vs, mesh, log) -> dict:
        size, bs = model.config.image_size, embedder.batch_size
        with timed(log, f"FashionIQ {vs.category} ({vs.gallery_kind} gallery): {len(vs.texts)} "
                        f"queries, {len(vs.gallery)} images"):
            gallery = embedder(fns["embed_gallery"], p, (
                (b["image"],) for b in pipeline.fashioniq_image_batches(
                    self.fiq, vs.gallery, size, bs)))
            texts = pipeline.tgir_texts(vs.captions, self.tokenizer, self.max_len)
            refs = [vs.gallery[r] for r in vs.labels[:, 1]]

            def queries():
                for s, b in zip(range(0, len(refs), bs),
                                pipeline.fashioniq_image_batches(self.fiq, refs, size, bs)):
                    yield (b["image"], texts["input_ids"][s:s + bs],
                           texts["attention_mask"][s:s + bs])

            f = embedder(fns["embed_tgir_queries"], p, queries(),
                         pad_values=[0, self.tokenizer.pad_id, 1])
            return tgir.tgir_protocol(f, gallery, vs.labels, mesh=mesh)

    def report(self, results: dict) -> str:
        lines = ["gallery     category    R@1    R@5   R@10   R@50"]
        for prefix in self.galleries:
            for cat in (*self.categories, "avg"):
                r = {k.split("/")[-1]: v for k, v in results.items()
                     if k.startswith(f"{prefix}/{cat}/")}
                cells = [f"{r[m]:6.2f}" if m in r else "     -" for m in ("r1", "r5", "r10", "r50")]
                lines.append(f"{prefix:11s} {cat:8s} " + " ".join(cells))
        return "\n".join(lines)

