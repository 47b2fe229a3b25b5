"""Stage-1 train-step benchmark: compile time, step time, pairs/s and peak memory.

    python benchmarks/train_step.py                      # tiny (batch 8) and reference (batch 2, 4)
    python benchmarks/train_step.py --sizes=tiny --steps=20
    python benchmarks/train_step.py --sizes=reference --batches=4 --dtype=bfloat16

Sizes:
  tiny       ViT 64 wide / depth 2 / 2 heads / patch 16 / 64 px; BERT hidden 64, 4 layers
             (2 fusion), 2 heads, FFN 256, vocab 30,522; text 32; E 256; queue 1,024; batch 8.
  reference  ViT-B/16 @ 256 px + BERT-base 6+6; text 180; queue 65,536.

Random inputs of the right shapes; the step is the full stage-1 step (both momentum forwards, focal
ITC against the queue, ITM with hard negatives over 3B fusion pairs, MLM, RTP, AdamW), jitted with
the state donated. Peak memory is the device's peak bytes in use where the backend reports it (GPU,
TPU), else the process's peak resident set size (CPU).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fine_jax import config as config_lib  # noqa: E402
from fine_jax import stages  # noqa: E402
from fine_jax.config import base_config, tiny_config  # noqa: E402
from fine_jax.models.fine import FashionFINE  # noqa: E402
from fine_jax.optim import make_optimizer  # noqa: E402
from fine_jax.stages.common import create_state  # noqa: E402


def size_config(name: str):
    if name == "tiny":
        return tiny_config()
    if name == "reference":
        return base_config()
    raise SystemExit(f"unknown size {name!r}: use tiny or reference")


def random_batch(cfg, b: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s, length, vocab = cfg.model.image_size, cfg.data.max_len, cfg.model.vocab_size
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    labels = np.where(rng.random((b, length)) < 0.12, ids, -100).astype(np.int32)
    return {"image": rng.normal(size=(b, s, s, 3)).astype(np.float32), "input_ids": ids,
            "attention_mask": mask, "mask_labels": labels,
            "replace_labels": (rng.random((b, length)) < 0.015).astype(np.int32),
            "idx": np.arange(b, dtype=np.int32)}


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def bench(size: str, batch: int, steps: int, dtype: str) -> dict:
    cfg = size_config(size)
    cfg.model.dtype = dtype
    cfg.train.global_batch_size = batch
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    stage = stages.get(cfg.stage)
    optimizer, schedule = make_optimizer(cfg.optim, steps_per_epoch=1000)
    queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    state = jax.jit(lambda r: create_state(model, optimizer, r, queues))(jax.random.PRNGKey(0))
    step = jax.jit(stage.make_step(model, optimizer, loss_cfg, 1000, schedule), donate_argnums=0)
    batch_arrays = jax.device_put(random_batch(cfg, batch))
    rng = jax.random.PRNGKey(1)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, rng).compile()
    compile_s = time.perf_counter() - t0

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_arrays, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
        if i >= 2:  # the first runs include allocation and autotuning
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mem, mem_kind = peak_memory_bytes()
    return dict(size=size, batch=batch, dtype=dtype, compile_s=compile_s, step_s=med,
                pairs_per_s=batch / med, peak_gib=mem / 2**30, mem_kind=mem_kind,
                loss=float(metrics["loss"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,reference")
    ap.add_argument("--batches", default="", help="comma list; default 8 for tiny, 2,4 for reference")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"backend: {jax.default_backend()} | device: {dev.device_kind} x {jax.device_count()} | "
          f"jax {jax.__version__}", flush=True)
    print(f"{'size':<10} {'batch':>5} {'dtype':<9} {'compile s':>9} {'step s':>9} {'pairs/s':>9} "
          f"{'peak GiB':>9}  memory", flush=True)
    for size in args.sizes.split(","):
        batches = [int(b) for b in args.batches.split(",")] if args.batches else (
            [8] if size == "tiny" else [2, 4])
        for b in batches:
            r = bench(size, b, args.steps, args.dtype)
            print(f"{r['size']:<10} {r['batch']:>5} {r['dtype']:<9} {r['compile_s']:>9.2f} "
                  f"{r['step_s']:>9.4f} {r['pairs_per_s']:>9.1f} {r['peak_gib']:>9.2f}  "
                  f"{r['mem_kind']} (loss {r['loss']:.3f})", flush=True)


if __name__ == "__main__":
    main()
