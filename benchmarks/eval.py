"""FashionGen evaluation benchmark: the device protocols against the reference's NumPy loops.

    python benchmarks/eval.py                                  # 32,528 images x 7,519 texts
    python benchmarks/eval.py --images=4000 --texts=1000       # smaller
    python benchmarks/eval.py --no-reference                   # the device path only

Inputs: random 256-d unit embeddings with a FashionGen-like product structure (1-12 images per
product, most with 4, images of a product in consecutive rows; ~48 subcategories of skewed
sizes; 6-digit product ids), each image correlated with its product's text so that the recalls
are far from chance, and a few duplicate captions and duplicate images (exact ties with the
positive, as real duplicate captions give). Protocols: the full protocol, sample-100 on the
saved reference draw (seed 66), on 4 more draws (seeds 67-70, for the 5-draw mean) and on the
cleaned draw: 6 candidate sets of 1,000 + 1,000 queries.

Reference: Fashion-FINE ``retrieval.py`` transcribed literally: ``sim_t2i = text_feats @
img_feats.t()`` (here a NumPy float32 matmul), I2T over the rows of ``sim_t2i.T`` and T2I over the
rows of ``sim_t2i``, each ``inds = np.argsort(score)[::-1]`` then ``np.where(inds == gt)[0][0]``
(T2I: min over the product's images), and the tiny branch per candidate set (float64 copy of the
candidate scores, argsort, position of index 100). Drawing the candidate sets is the same Python
code for both and is timed separately. The device path runs once to compile, then is timed.

The two paths rank different float32 matrices (NumPy's and the device tile program's, which
differ in the last bit), so an exact tie present in one and not the other could move a rank;
the benchmark reports whether every metric agrees.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from fine_jax.eval import fast  # noqa: E402
from fine_jax.eval import retrieval as R  # noqa: E402


def catalogue(n_images: int, n_texts: int, n_subcategories: int, seed: int):
    """Images per product in [1, 12] (mostly 4) summing to n_images; rows grouped by product."""
    rng = np.random.default_rng(seed)
    if not n_texts <= n_images <= 12 * n_texts:
        raise SystemExit("need texts <= images <= 12 * texts")
    four = rng.random(n_texts) < 0.72  # FashionGen: 5,387 of 7,519 products have 4 images
    counts = np.where(four, 4, rng.integers(1, 13, n_texts))
    while counts.sum() != n_images:  # nudge the other products towards the exact total
        diff = n_images - counts.sum()
        pool = np.flatnonzero(~four) if (~four).any() else np.arange(n_texts)
        idx = rng.choice(pool, min(abs(diff), len(pool)), replace=False)
        counts[idx] = np.clip(counts[idx] + np.sign(diff), 1, 12)
        if counts.sum() == n_images:
            break
        if np.all(counts[pool] == (12 if diff > 0 else 1)):
            four[:] = False  # the others are saturated: let every product move
    img_product = np.repeat(np.arange(n_texts), counts)
    weights = 1.0 / np.arange(1, n_subcategories + 1) ** 1.1
    sub_of_product = rng.choice(n_subcategories, size=n_texts, p=weights / weights.sum())
    img_sub = [f"SUB{s}" for s in sub_of_product[img_product]]
    ids = rng.choice(np.arange(100000, 1000000), size=n_texts, replace=False)
    return img_product, img_sub, [int(x) for x in ids]


def embeddings(img_product, n_texts: int, dim: int, seed: int, duplicates: bool):
    rng = np.random.default_rng(seed + 1)
    z_t = rng.standard_normal((n_texts, dim)).astype(np.float32)
    z_t /= np.linalg.norm(z_t, axis=1, keepdims=True)
    z_v = z_t[img_product] + 1.2 * rng.standard_normal((len(img_product), dim)).astype(np.float32)
    z_v /= np.linalg.norm(z_v, axis=1, keepdims=True)
    if duplicates:
        # ~0.5% duplicate captions and ~0.1% duplicate images across products.
        a = rng.choice(n_texts, size=(max(1, n_texts // 200), 2), replace=False)
        z_t[a[:, 1]] = z_t[a[:, 0]]
        b = rng.choice(len(z_v), size=(max(1, len(z_v) // 1000), 2), replace=False)
        z_v[b[:, 1]] = z_v[b[:, 0]]
    return z_v.astype(np.float32), z_t.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the reference's loops (Fashion-FINE retrieval.py itm_eval)


def reference_itm_eval(scores_i2t, scores_t2i, img2txt, txt2img, tiny_sets):
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == img2txt[index])[0][0]
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)

    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        rank = 100000
        for i in txt2img[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    full = {"i2t_r1": tr1, "i2t_r5": tr5, "i2t_r10": tr10, "t2i_r1": ir1, "t2i_r5": ir5,
            "t2i_r10": ir10, "i2t_mean": (tr1 + tr5 + tr10) / 3, "t2i_mean": (ir1 + ir5 + ir10) / 3,
            "r_mean": (tr1 + ir1) / 2, "sum": tr1 + tr5 + tr10 + ir1 + ir5 + ir10}

    tiny = {}
    for name, c in tiny_sets.items():
        out = {}
        for direction, scores in (("i2t", scores_i2t), ("t2i", scores_t2i)):
            query_indexes = np.array([q[0] for q in c[direction]])
            cand_indexes = np.array([q[1] for q in c[direction]])
            tiny_score = np.zeros(cand_indexes.shape)
            rows = scores[query_indexes]
            for i, t_socre in enumerate(rows):
                tiny_score[i] = t_socre[cand_indexes[i]]
            last = cand_indexes.shape[1] - 1  # 100 for the reference's 101 candidates
            ranks = np.zeros(tiny_score.shape[0])
            for index, score in enumerate(tiny_score):
                inds = np.argsort(score)[::-1]
                ranks[index] = np.where(inds == last)[0][0]
            for k in (1, 5, 10):
                out[f"{direction}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out["sum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        tiny[name] = out
    return full, tiny


def reference(z_v, z_t, img_product, tiny_sets):
    n_txt = len(z_t)
    txt2img = {t: [] for t in range(n_txt)}
    img2txt = {}
    for i, p in enumerate(img_product.tolist()):
        txt2img[p].append(i)
        img2txt[i] = p
    sim_t2i = z_t @ z_v.T
    # The reference returns sim_t2i.T.cpu().numpy() and sim_t2i.cpu().numpy().
    return reference_itm_eval(sim_t2i.T, sim_t2i, img2txt, txt2img, tiny_sets)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32528)
    ap.add_argument("--texts", type=int, default=7519)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--subcategories", type=int, default=48)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the device path")
    ap.add_argument("--block-rows", type=int, default=None)
    ap.add_argument("--tile-cols", type=int, default=None)
    ap.add_argument("--no-duplicates", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].platform}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    img_product, img_sub, ids = catalogue(args.images, args.texts, args.subcategories, args.seed)
    z_v, z_t = embeddings(img_product, args.texts, args.dim, args.seed, not args.no_duplicates)
    print(f"{len(z_v)} images x {len(z_t)} texts, dim {args.dim}; "
          f"{np.mean(np.bincount(img_product) == 4):.0%} of products with 4 images")

    t0 = time.perf_counter()
    sets = {"sample100": R.sample100_candidates(img_product, img_sub, ids, seed=66,
                                                n_queries=args.queries)}
    for j, c in enumerate(R.sample100_draws(img_product, img_sub, ids,
                                            seeds=range(67, 66 + args.draws),
                                            n_queries=args.queries)):
        sets[f"draw{67 + j}"] = c
    sets["sample100_clean"] = R.sample100_candidates(img_product, img_sub, ids, seed=66,
                                                     n_queries=args.queries, clean=True)
    t_draw = time.perf_counter() - t0
    print(f"drawing {len(sets)} candidate sets (Python random, shared by both paths): "
          f"{t_draw:.2f} s")

    kw = dict(block_rows=args.block_rows, tile_cols=args.tile_cols)
    t0 = time.perf_counter()
    res = fast.evaluate(z_v, z_t, img_product, sets, **kw)
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = fast.evaluate(z_v, z_t, img_product, sets, **kw)
        times.append(time.perf_counter() - t0)
    t_fast = min(times)
    print(f"device path: first call (with compilation) {t_first:.2f} s; "
          f"steady {t_fast:.3f} s (min of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in times)})")
    print(f"  tie fallback: I2T {res.full['i2t_tied']} images, T2I {res.full['t2i_tied']} texts; "
          f"sample-100 {sum(m['i2t_tied'] + m['t2i_tied'] for m in res.sample100.values())} "
          f"queries")
    runs = [res.sample100["sample100"]] + [res.sample100[f"draw{67 + j}"]
                                           for j in range(args.draws - 1)]
    mean, std = R.mean_std(runs)
    s100 = res.sample100
    print(f"  full sum {res.full['sum']:.2f} | sample100 sum {s100['sample100']['sum']:.2f}"
          f" | mean {mean['sum']:.2f} +- {std['sum']:.2f} (sample std, {len(runs)} draws)"
          f" | clean {s100['sample100_clean']['sum']:.2f}")
    if args.no_reference:
        return

    t0 = time.perf_counter()
    ref_full, ref_tiny = reference(z_v, z_t, img_product, sets)
    t_ref = time.perf_counter() - t0
    print(f"reference loops (NumPy matmul + argsort loops): {t_ref:.2f} s")
    print(f"speed-up: {t_ref / t_fast:.1f}x (steady), {t_ref / t_first:.1f}x (first call)")

    bad = [f"full/{k}: {v} vs {res.full[k]}" for k, v in ref_full.items() if res.full[k] != v]
    for name, want in ref_tiny.items():
        bad += [f"{name}/{k}: {v} vs {res.sample100[name][k]}" for k, v in want.items()
                if res.sample100[name][k] != v]
    n_keys = len(ref_full) + sum(len(v) for v in ref_tiny.values())
    if bad:
        print(f"metrics: {len(bad)} of {n_keys} differ:\n  " + "\n  ".join(bad))
    else:
        print(f"metrics: all {n_keys} agree exactly")


if __name__ == "__main__":
    main()
