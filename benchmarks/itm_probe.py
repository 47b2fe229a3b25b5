"""How well a stage-1 (or stage-2) demo model's ITM head tells matching pairs from negatives.

    python benchmarks/itm_probe.py /tmp/fine_demo
    python benchmarks/itm_probe.py /tmp/fine_ablation/full --products=400

On one view of each held-out product of the embedded set (configs/demo.py's data), it prints the
ITM head's mean match probability for the true caption, for a random other product's caption and
for the hardest other caption (the highest contrastive similarity to the image), how often the
true caption scores above each kind of negative, and the ITM loss a batch of one positive and two
negatives of each kind would give (chance: 0.636). The training log's ITM loss mixes positives
with the reference's hard negatives; this separates the two halves of the question: does the
head match at all (random negatives), and does it see the fine details (hardest negatives)?
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bce(p: np.ndarray, label: int) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.log(p) if label else np.log(1 - p)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training workdir or a weights checkpoint")
    parser.add_argument("--config", default="configs/demo.py", help="the data to probe on")
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from fine_jax import config as config_lib
    from fine_jax import datasets
    from fine_jax.api import FineModel

    source = datasets.resolve(config_lib.load_config_file(args.config)).eval
    first = source.product_first_rows()[:args.products]
    rows = [source[int(i)] for i in first]
    model = FineModel.load(args.checkpoint)
    images = model.preprocess_images([r["image"] for r in rows])
    ids, mask = model.tokenize([r["description"] for r in rows])
    n = len(rows)
    shift = np.random.default_rng(args.seed).integers(1, n, size=n)
    random_other = (np.arange(n) + shift) % n  # never the product itself
    sims = model.embed_image_arrays(images) @ model.embed_token_ids(ids, mask).T
    np.fill_diagonal(sims, -np.inf)
    hardest = sims.argmax(1)

    positive = model.match_probability(images, ids, mask)
    scores = {"random": model.match_probability(images, ids[random_other], mask[random_other]),
              "hardest": model.match_probability(images, ids[hardest], mask[hardest])}
    print(f"{args.checkpoint}: {n} held-out products, one view each")
    print(f"  p(match) of the true caption      {positive.mean():.3f}")
    for name, neg in scores.items():
        above = np.mean(positive[:, None] > neg[None, :]) if name == "random" else \
            np.mean(positive > neg)
        loss = (bce(positive, 1) + 2 * bce(neg, 0)) / 3
        print(f"  {name:>7} negatives: p(match) {neg.mean():.3f}, true caption above "
              f"{'any' if name == 'random' else 'its'} negative {100 * above:.1f}%, "
              f"ITM loss at 1:2 {loss:.3f} (chance 0.636)")


if __name__ == "__main__":
    main()
