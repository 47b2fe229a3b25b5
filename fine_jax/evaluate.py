"""Retrieval evaluation of a stage-1 model on the evaluation split (method_spec §7).

Ranks by the cosine of the MAA-integrated features z_v and z_t, with no ITM re-ranking, under the
full protocol (§7.1), the sample-100 protocol on candidate sets drawn once and saved (§7.2, §10
B6), and, where the dataset defines near-twin products, the twin test.

Usable as ``python -m fine_jax.evaluate --config=... --workdir=DIR`` on the latest checkpoint in DIR.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from fine_jax.data import pipeline
from fine_jax.eval import retrieval
from fine_jax.models.fine import FashionFINE


def embed_eval_split(model: FashionFINE, params, source, tokenizer, max_len: int,
                     batch_size: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """z_v for every image row and z_t for every product's evaluation text."""
    image_size = model.config.image_size

    @jax.jit
    def embed_images(p, images):
        return model.apply({"params": p}, images, method=FashionFINE.embed_images)

    @jax.jit
    def embed_texts(p, ids, mask):
        return model.apply({"params": p}, ids, mask, method=FashionFINE.embed_texts)

    t0 = time.time()
    feats = []
    for batch in pipeline.eval_image_batches(source, image_size, batch_size):
        images = batch["image"]
        n = images.shape[0]
        if n < batch_size:  # pad the last batch so it reuses the compiled shape
            images = np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:],
                                                      images.dtype)])
        feats.append(np.asarray(embed_images(params, jnp.asarray(images)))[:n])
    z_v = np.concatenate(feats)

    meta = source.metadata()
    first_rows = source.product_first_rows()
    descriptions = [meta["description"][r] for r in first_rows]
    texts = pipeline.eval_texts(descriptions, tokenizer, max_len)
    feats = []
    for start in range(0, len(descriptions), batch_size):
        ids = texts["input_ids"][start:start + batch_size]
        mask = texts["attention_mask"][start:start + batch_size]
        n = ids.shape[0]
        if n < batch_size:
            pad = batch_size - n
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), mask.dtype)])
        feats.append(np.asarray(embed_texts(params, jnp.asarray(ids), jnp.asarray(mask)))[:n])
    z_t = np.concatenate(feats)
    log(f"embedded {len(z_v)} images and {len(z_t)} texts in {time.time() - t0:.1f}s")
    return z_v, z_t


def retrieval_metrics(z_v: np.ndarray, z_t: np.ndarray, source, twins, candidates_path,
                      cfg_eval) -> dict:
    """Flat dict in percent: full/*, sample100/* and (if twins) twin/*."""
    sim = z_v.astype(np.float32) @ z_t.astype(np.float32).T
    meta = source.metadata()
    img_product = np.asarray(source.row_product_index)
    results = {f"full/{k}": v for k, v in retrieval.full_protocol(sim, img_product).items()}

    candidates_path = pathlib.Path(candidates_path)
    product_ids = [int(pid) for pid, _ in source.productid_list]
    cands = retrieval.load_candidates(candidates_path) if candidates_path.is_file() else None
    if cands is not None and (cands.get("n_images") != len(img_product)
                              or cands.get("n_products") != len(product_ids)
                              or cands.get("seed") != cfg_eval.sample100_seed):
        cands = None  # drawn for another split or seed: draw again (and overwrite)
    if cands is None:
        cands = retrieval.sample100_candidates(
            img_product, meta["subcategory"], product_ids_order=product_ids,
            seed=cfg_eval.sample100_seed, n_queries=cfg_eval.sample100_queries,
            n_neg=cfg_eval.sample100_negatives)
        retrieval.save_candidates(candidates_path, cands)
    results.update({f"sample100/{k}": v for k, v in retrieval.sample100_protocol(sim, cands).items()})

    if twins:
        index_of = {pid: i for i, pid in enumerate(product_ids)}
        pairs = [(index_of[a], index_of[b]) for a, b in twins if a in index_of and b in index_of]
        if pairs:
            results.update({f"twin/{k}": v for k, v in
                            retrieval.twin_protocol(sim, img_product, pairs).items()})
    return {k: float(v) for k, v in results.items()}


def write_results(path: str | os.PathLike, results: dict) -> None:
    """Atomic JSON write: a reader never sees a half-written file."""
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate(model, params, data, cfg, workdir, log=print) -> dict:
    z_v, z_t = embed_eval_split(model, params, data.eval, data.tokenizer, cfg.data.max_len,
                                cfg.eval.batch_size, log)
    results = retrieval_metrics(z_v, z_t, data.eval, data.twins,
                                pathlib.Path(workdir) / "sample100_candidates.json", cfg.eval)
    write_results(pathlib.Path(workdir) / "eval_results.json", results)
    log(retrieval.format_report({
        "full": {k[5:]: v for k, v in results.items() if k.startswith("full/")},
        "sample100": {k[10:]: v for k, v in results.items() if k.startswith("sample100/")},
        **({"twin": {k[5:]: v for k, v in results.items() if k.startswith("twin/")}}
           if any(k.startswith("twin/") for k in results) else {}),
    }))
    return results


if __name__ == "__main__":
    from absl import app

    from fine_jax import train

    train.define_flags("Directory holding the checkpoints to evaluate.")
    app.run(train.cli_main(evaluate_only=True))
