"""Which tower of a demo model sees the local details: linear probes scored on the twin pairs.

    python benchmarks/twin_probe.py /tmp/fine_demo
    python benchmarks/twin_probe.py /tmp/vit_only --step=0     # right after the ViT warm-start

Every product of the embedded set has a near-twin that differs in one local detail (or has one
detail where its twin has another). For each detail, a ridge-regression probe is fitted on the
training split's rows to predict from a feature whether the product has that detail; on the
held-out twin pairs (first view of each product; twins share the view's jitter, so their images
differ only where the detail is drawn) it then counts how often the probe ranks the product with
the detail above its twin. 50 % is chance. The features:

* ``vit_cls``: the image tower's own CLS output, before the projection;
* ``z_img`` and ``z_txt``: the L2-normalised, MAA-integrated embeddings the retrieval ranks by.

The twin test asks the two embeddings to differ along the same direction; this asks, separately
for each tower, whether the difference is there at all. A checkpoint right after the ViT
warm-start (``--config.train.max_steps=1``, then ``--step=0``) probes the warm-start alone; its
text tower is untrained.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float = 1.0):
    """Ridge regression of targets ``y`` (N, K) in {-1, 1} on standardised ``x`` (N, D); returns
    a function of new features giving (M, K) scores."""
    mu, sd = x.mean(0), x.std(0) + 1e-6

    def design(f):
        return np.concatenate([(f - mu) / sd, np.ones((len(f), 1), f.dtype)], 1)

    a = design(x)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)
    return lambda f: design(f) @ w


def twin_comparisons(twins, details_of) -> list[tuple[str, int, int]]:
    """(detail, product that has it, its twin without it) for every held-out twin pair; a pair
    that swaps one detail for another gives one comparison per detail."""
    out = []
    for a, b, what in twins:
        if " vs " in what:
            x, y = what.split(" vs ")
            out += [(x, a, b), (y, b, a)]
        else:
            has, other = (a, b) if what in details_of[a] else (b, a)
            out.append((what, has, other))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training workdir or a weights checkpoint")
    parser.add_argument("--step", type=int, default=None, help="a workdir's step (default: latest)")
    parser.add_argument("--config", default="configs/demo.py", help="the data to probe on")
    parser.add_argument("--train_rows", type=int, default=6000,
                        help="training rows the probes are fitted on (at most)")
    args = parser.parse_args(argv)

    import jax

    from fine_jax import config as config_lib
    from fine_jax import datasets
    from fine_jax.api import FineModel
    from fine_jax.checkpoint import WeightsNotFound
    from fine_jax.data import synthetic
    from fine_jax.models.fine import vision_tower

    cfg = config_lib.load_config_file(args.config)
    if cfg.data.source != "synthetic":
        raise SystemExit(f"{args.config}: the twin probe needs the embedded set (data.source="
                         "synthetic), whose products have twins")
    data = datasets.resolve(cfg, lexicon=False)
    products = json.loads((data.root / synthetic.PRODUCTS_FILE).read_text())
    details_of = {p["product_id"]: set(p["details"]) for p in products}
    names = sorted({d for p in products for d in p["details"]})
    try:
        model = FineModel.load(args.checkpoint, step=args.step)
    except WeightsNotFound as e:  # e.g. --step=0 of a run without a ViT warm-start
        raise SystemExit(f"twin_probe: {e}") from None
    vit = vision_tower(model.config)
    vit_params = model.params["visual_encoder"]
    vit_cls = jax.jit(lambda x: vit.apply({"params": vit_params}, x)[:, 0])

    def features(source, rows):
        recs = [source[int(r)] for r in rows]
        images = model.preprocess_images([r["image"] for r in recs])
        cls = np.concatenate([np.asarray(vit_cls(images[i:i + 256]))
                              for i in range(0, len(images), 256)])
        pids = [int(source.row_product_id[int(r)]) for r in rows]
        return pids, {"vit_cls": cls, "z_img": model.embed_image_arrays(images),
                      "z_txt": model.encode_text([r["description"] for r in recs])}

    train_rows = np.arange(min(args.train_rows, len(data.train)))
    train_pids, train_feats = features(data.train, train_rows)
    targets = np.array([[2.0 * (d in details_of[p]) - 1 for d in names] for p in train_pids])
    eval_pids, eval_feats = features(data.eval, data.eval.product_first_rows())
    index = {p: i for i, p in enumerate(eval_pids)}
    comparisons = twin_comparisons(synthetic.load_twins(data.root, "validation"), details_of)

    print(f"{args.checkpoint}{'' if args.step is None else f' step {args.step}'}: probes fitted "
          f"on {len(train_rows)} training rows, scored on {len(comparisons)} held-out twin "
          "comparisons (chance 50%)")
    for name in ("vit_cls", "z_img", "z_txt"):
        scores = fit_ridge(train_feats[name], targets)(eval_feats[name])
        per_detail = collections.defaultdict(list)
        for detail, has, other in comparisons:
            j = names.index(detail)
            per_detail[detail].append(scores[index[has], j] > scores[index[other], j])
        total = np.mean([x for v in per_detail.values() for x in v])
        common = sorted(per_detail, key=lambda d: -len(per_detail[d]))[:5]
        print(f"  {name:<8} {100 * total:5.1f}%   " + ", ".join(
            f"{d} {100 * np.mean(per_detail[d]):.0f}% (n={len(per_detail[d])})" for d in common))


if __name__ == "__main__":
    main()
