"""Train-step benchmark: compile time, step time, pairs/s, MFU and peak memory of the three stages.

    python benchmarks/train_step.py                          # tiny (batch 8), reference (2 and 4)
    python benchmarks/train_step.py --sizes=tiny --steps=20
    python benchmarks/train_step.py --sizes=reference --batches=4 --dtypes=float32,bfloat16 \\
        --remat=off,on --scan=off,on --stages=pretrain,retrieval,tgir
    python benchmarks/train_step.py --sizes=tiny --control=1120cd6 --pairs=3
    python benchmarks/train_step.py --sizes=tiny,reference --batches=2 --allocator=system,auto
    python benchmarks/train_step.py --sizes=tiny --steps=60 --mlm_overflow=step,host --interleave

Sizes:
  tiny       ViT 64 wide / depth 2 / 2 heads / patch 16 / 64 px; BERT hidden 64, 4 layers
             (2 fusion), 2 heads, FFN 256, vocab 30,522; text 32; E 256; queue 1,024.
  reference  ViT-B/16 @ 256 px + BERT-base 6+6; text 180; queue 65,536.

Random inputs of the right shapes (uint8 images, as the pipelines send them); the step is the
stage's full training step (stage 1: both momentum forwards, focal ITC against the queue, ITM with
hard negatives over 3B fusion pairs, MLM, RTP, AdamW), jitted with the state donated. Each
measurement runs in its own process, so that its peak memory is its own: the device's peak bytes
in use where the backend reports it (GPU, TPU), else the process's peak resident set size (CPU,
which includes the compiler's own peak). MFU is the analytic model FLOPs (fine_jax.flops) over the
device's peak (a table for TPUs and GPUs, a measured matmul on CPU).

``--precision`` sets ``model.matmul_precision`` (default ``auto``, as training: float32 products
in float32 on a GPU or TPU when the dtype is float32; ``default`` measures JAX's faster TF32 or
bf16-pass products there). ``--mlm_overflow=step`` measures the stage-1 step with its MLM overflow conditional
(``loss.mlm_overflow``; the default, ``host``, leaves it to the trainer, and the random batch's
targets fit the gathered buffer). ``--interleave``
compiles every combination of the settings in one process and runs their steps in turn, so that
the machine's drift falls on all of them alike, and prints each one's speed relative to the first
(the process's peak memory is shared by all of them).

Each measurement runs with the host allocator the commands choose (``fine_jax.allocator``:
tcmalloc when installed, else glibc with huge pages); ``--allocator=system,auto`` measures both.
``--control=COMMIT`` measures that commit's own ``benchmarks/train_step.py`` (stage 1, fp32) in a
temporary git worktree, alternating with this tree (stage 1, each of ``--dtypes``) ``--pairs``
times per size and batch, and prints the speed ratio of each pair: machines drift from one minute
to the next, the ratio within a pair much less.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def size_config(name: str):
    from fine_jax.config import base_config, tiny_config
    if name == "tiny":
        return tiny_config()
    if name == "reference":
        return base_config()
    raise SystemExit(f"unknown size {name!r}: use tiny or reference")


def random_batch(cfg, b: int, seed: int = 0) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    s, length, vocab = cfg.model.image_size, cfg.data.max_len, cfg.model.vocab_size
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    image = lambda: rng.integers(0, 256, size=(b, s, s, 3), dtype=np.uint8)
    if cfg.stage == "tgir":
        return {"reference_image": image(), "target_image": image(), "input_ids": ids,
                "attention_mask": mask}
    labels = np.where(rng.random((b, length)) < 0.12, ids, -100).astype(np.int32)
    return {"image": image(), "input_ids": ids, "attention_mask": mask, "mask_labels": labels,
            "replace_labels": (rng.random((b, length)) < 0.015).astype(np.int32),
            "idx": np.arange(b, dtype=np.int32)}


def peak_memory_bytes() -> tuple[int, str]:
    import jax
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def resident_gib() -> tuple[float, float] | None:
    """(resident set now, its peak so far) in GiB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 2**20, int(fields["VmHWM"].split()[0]) / 2**20)
    except (OSError, KeyError, ValueError):
        return None


def build_step(size: str, stage: str, batch: int, dtype: str, remat: bool, attention: str,
               scan: bool = False, mlm_overflow: str = "host", precision: str = "auto"):
    """(config, resolved dtype, jitted step, state, batch arrays, rng) of one setting; the
    config holds the resolved ``model.matmul_precision``, which the step is traced at."""
    import jax

    from fine_jax import config as config_lib
    from fine_jax import stages, xla_cpu
    from fine_jax.models.fine import (FashionFINE, resolve_dtype, resolve_matmul_precision,
                                      with_matmul_precision)
    from fine_jax.optim import make_optimizer
    from fine_jax.stages.common import create_state

    dtype = resolve_dtype(dtype)[0]  # "auto": what the reference configs run on this platform
    xla_cpu.unroll_threefry_on_cpu()  # as the trainer does on CPU (a no-op for other backends)
    cfg = size_config(size)
    cfg.stage = stage
    cfg.model.dtype = dtype
    cfg.model.remat = remat
    cfg.model.attention = attention
    cfg.model.scan_layers = scan
    cfg.train.global_batch_size = batch
    cfg.loss.mlm_overflow = mlm_overflow  # the random batch's MLM targets fit the gathered buffer
    cfg.model.matmul_precision = resolve_matmul_precision(precision, dtype)[0]  # as training does
    if stage == "tgir":
        cfg.loss.queue_size = cfg.loss.queue_size // (2 * batch) * 2 * batch
    model_cfg = config_lib.model_config(cfg)
    model = FashionFINE(model_cfg)
    loss_cfg = config_lib.loss_config(cfg)
    st = stages.get(stage)
    optimizer, schedule = make_optimizer(cfg.optim, steps_per_epoch=1000)
    queues = st.make_queues(loss_cfg, cfg.model.embed_dim)
    state = jax.jit(lambda r: create_state(model, optimizer, r, queues))(jax.random.PRNGKey(0))
    step = jax.jit(with_matmul_precision(st.make_step(model, optimizer, loss_cfg, 1000, schedule),
                                         model_cfg), donate_argnums=0)
    batch_arrays = jax.device_put(random_batch(cfg, batch))
    jax.block_until_ready(state)
    return cfg, dtype, step, state, batch_arrays, jax.random.PRNGKey(1)


def bench_one(size: str, stage: str, batch: int, steps: int, dtype: str, remat: bool,
              attention: str, scan: bool = False, mlm_overflow: str = "host",
              precision: str = "auto") -> dict:
    """One measurement in this process."""
    import jax

    from fine_jax import allocator, flops

    # The host memory at each phase of the measurement (CPU): where the process's peak comes from.
    phases = {"imported": resident_gib()}
    cfg, dtype, step, state, batch_arrays, rng = build_step(size, stage, batch, dtype, remat,
                                                            attention, scan, mlm_overflow,
                                                            precision)
    phases["state"] = resident_gib()

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays, rng).compile()
    compile_s = time.perf_counter() - t0
    phases["compiled"] = resident_gib()
    allocator.release_free_memory()  # as the trainer does once its step is compiled
    phases["released"] = resident_gib()
    analysis = compiled.memory_analysis()  # XLA's buffers: None where the backend has no figures
    temp_bytes = getattr(analysis, "temp_size_in_bytes", None)

    times, faults = [], 0
    for i in range(steps + 2):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_arrays, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
        if i >= 2:  # the first runs include allocation and autotuning
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    med = statistics.median(times)
    phases["trained"] = resident_gib()
    mem, mem_kind = peak_memory_bytes()
    count = flops.step_flops(cfg).total
    precision = cfg.model.matmul_precision
    peak, peak_source = flops.device_peak_flops(jax.devices()[0], dtype, precision)
    return dict(code="this tree", size=size, stage=stage, batch=batch, dtype=dtype, remat=remat,
                attention=attention, scan=scan, mlm_overflow=mlm_overflow, precision=precision,
                compile_s=compile_s, step_s=med,
                pairs_per_s=batch / med,
                gflop_per_step=count / 1e9, mfu=flops.mfu(count, med, 1, peak),
                peak_source=peak_source, peak_gib=mem / 2**30, mem_kind=mem_kind,
                loss=float(metrics["loss"]), allocator=allocator.active(),
                page_faults_per_step=faults / steps, temp_bytes=temp_bytes,
                resident_gib={k: v for k, v in phases.items() if v is not None})


def bench_interleaved(size: str, stage: str, batch: int, steps: int, variants: list) -> list:
    """Several settings of one size, stage and batch compiled in this process, their steps run in
    turn (round i starts with variant i mod n): the machine's drift from minute to minute, which
    hides a change of a few per cent between processes, falls on all of them alike.
    ``variants``: (dtype, remat, attention, scan, mlm_overflow, precision) tuples. The peak memory is the
    process's, shared by all of them."""
    import jax

    from fine_jax import allocator, flops

    built = []
    for dtype, remat, attention, scan, mlm_overflow, precision in variants:
        cfg, dt, step, state, batch_arrays, rng = build_step(size, stage, batch, dtype, remat,
                                                             attention, scan, mlm_overflow,
                                                             precision)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch_arrays, rng).compile()
        built.append(dict(cfg=cfg, dtype=dt, compiled=compiled, state=state, batch=batch_arrays,
                          rng=rng, compile_s=time.perf_counter() - t0, times=[],
                          setting=(remat, attention, scan, mlm_overflow,
                                   cfg.model.matmul_precision)))
        allocator.release_free_memory()
    n = len(built)
    for i in range(steps + 2):
        for k in range(n):
            v = built[(i + k) % n]
            t0 = time.perf_counter()
            v["state"], metrics = v["compiled"](v["state"], v["batch"],
                                                jax.random.fold_in(v["rng"], i))
            jax.block_until_ready(metrics)
            if i >= 2:
                v["times"].append(time.perf_counter() - t0)
    mem, mem_kind = peak_memory_bytes()
    out = []
    for v in built:
        med = statistics.median(v["times"])
        count = flops.step_flops(v["cfg"]).total
        remat, attention, scan, mlm_overflow, precision = v["setting"]
        peak, peak_source = flops.device_peak_flops(jax.devices()[0], v["dtype"], precision)
        out.append(dict(code="in turn", size=size, stage=stage, batch=batch, dtype=v["dtype"],
                        remat=remat, attention=attention, scan=scan, mlm_overflow=mlm_overflow,
                        precision=precision,
                        compile_s=v["compile_s"], step_s=med, pairs_per_s=batch / med,
                        gflop_per_step=count / 1e9, mfu=flops.mfu(count, med, 1, peak),
                        peak_source=peak_source, peak_gib=mem / 2**30,
                        mem_kind=mem_kind + ", all variants", allocator=allocator.active()))
    return out


def run_child(args: list[str], steps: int, allocator: str = "auto") -> dict:
    """One measurement of this tree in a fresh process, with ``FINE_JAX_ALLOCATOR=allocator``."""
    from fine_jax.allocator import ACTIVE_ENV, ENV

    env = {k: v for k, v in os.environ.items() if k != ACTIVE_ENV}
    env[ENV] = allocator
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args,
                          f"--steps={steps}"], capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise SystemExit(f"measurement {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_control(worktree: str, size: str, batch: int, steps: int) -> dict:
    """One measurement of the control commit's own script (stage 1, fp32) in a fresh process."""
    from fine_jax.allocator import ACTIVE_ENV

    # As the control commit ran: without the allocator this tree's commands choose.
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", ACTIVE_ENV)}
    env["PYTHONPATH"] = worktree
    out = subprocess.run([sys.executable, "benchmarks/train_step.py", f"--sizes={size}",
                          f"--batches={batch}", f"--steps={steps}"], capture_output=True,
                         text=True, cwd=worktree, env=env)
    if out.returncode != 0:
        raise SystemExit(f"control measurement failed:\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == size:  # size batch dtype compile step pairs peak ...
            step_s = float(parts[4])  # its pairs/s column has one decimal only
            return dict(code="control", size=size, stage="pretrain", batch=batch,
                        dtype=parts[2], remat=False, attention="xla", scan=False,
                        compile_s=float(parts[3]), step_s=step_s, pairs_per_s=batch / step_s,
                        peak_gib=float(parts[6]), allocator="system malloc")
    raise SystemExit(f"control printed no result:\n{out.stdout[-2000:]}")


HEADER = (f"{'code':<10} {'size':<9} {'stage':<9} {'batch':>5} {'dtype':<8} {'remat':<5} "
          f"{'attn':<5} {'scan':<4} {'mlm':<4} {'prec':<4} {'alloc':<9} {'compile s':>9} {'step s':>8} {'pairs/s':>8} "
          f"{'MFU %':>6} {'peak GiB':>8} {'faults/step':>11}")


# model.matmul_precision, as the table prints it.
PRECISION_LABELS = {"default": "dflt", "float32": "f32", "tensorfloat32": "tf32", "bfloat16": "bf16"}


def row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:6.1f}" if "mfu" in r else f"{'':>6}"
    return (f"{r['code']:<10} {r['size']:<9} {r['stage']:<9} {r['batch']:>5} {r['dtype']:<8} "
            f"{'on' if r['remat'] else 'off':<5} {r['attention']:<5} "
            f"{'on' if r.get('scan') else 'off':<4} {r.get('mlm_overflow', '-'):<4} "
            f"{PRECISION_LABELS.get(r.get('precision'), '-'):<4} "
            f"{r.get('allocator', '?').split()[0]:<9} "
            f"{r['compile_s']:>9.2f} "
            f"{r['step_s']:>8.4f} {r['pairs_per_s']:>8.2f} {mfu} {r['peak_gib']:>8.2f} "
            f"{round(r['page_faults_per_step']) if 'page_faults_per_step' in r else '':>11}")


def phase_line(r: dict) -> str | None:
    """The host memory phases of a measurement: resident GiB (its peak so far) after each."""
    phases = r.get("resident_gib")
    if not phases:
        return None
    return "  resident GiB (peak so far): " + ", ".join(
        f"{name} {now:.2f} ({peak:.2f})" for name, (now, peak) in phases.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="tiny,reference")
    ap.add_argument("--batches", default="", help="comma list; default 8 for tiny, 2,4 for reference")
    ap.add_argument("--stages", default="pretrain")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16, "
                    "auto (the reference configs' choice for this platform)")
    ap.add_argument("--remat", default="off", help="comma list of off, on")
    ap.add_argument("--attention", default="xla", help="comma list of xla, fused")
    ap.add_argument("--scan", default="off", help="comma list of off, on (model.scan_layers)")
    ap.add_argument("--mlm_overflow", default="host", help="comma list of host (the default), "
                    "step (loss.mlm_overflow: the step without or with its MLM overflow "
                    "conditional)")
    ap.add_argument("--precision", default="auto", help="comma list of model.matmul_precision "
                    "values: auto, default, float32, tensorfloat32, bfloat16 (how float32 "
                    "products run on a GPU or TPU; a CPU computes them in float32 at every one)")
    ap.add_argument("--allocator", default="auto", help="comma list of FINE_JAX_ALLOCATOR "
                    "values: auto, tcmalloc, hugepages, system (fine_jax.allocator)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--control", default="", help="a commit to measure beside this tree")
    ap.add_argument("--pairs", type=int, default=1, help="control/this-tree pairs per setting")
    ap.add_argument("--phases", action="store_true",
                    help="under each row of this tree, the process's resident memory after each "
                         "phase (imports, state, compile, heap release, steps), from /proc")
    ap.add_argument("--interleave", action="store_true",
                    help="compile every combination of --dtypes, --remat, --attention, --scan, "
                         "--mlm_overflow and --precision in one process and run their steps in turn; prints "
                         "each one's speed relative to the first (small differences that the "
                         "machine's drift hides between processes)")
    ap.add_argument("--json", default="", help="also write every measurement to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child:
        from fine_jax import allocator

        allocator.reexec_if_needed()  # the allocator the commands run with (fine_jax.allocator)
        if rest[0] == "interleave":
            size, stage, batch, spec = rest[1:]
            print(json.dumps(bench_interleaved(size, stage, int(batch), args.steps,
                                               [tuple(v) for v in json.loads(spec)])))
            return
        size, stage, batch, dtype, remat, attention, scan, *more = rest
        print(json.dumps(bench_one(size, stage, int(batch), args.steps, dtype, remat == "on",
                                   attention, scan == "on", *more)))
        return

    import jax
    dev = jax.devices()[0]
    print(f"backend: {jax.default_backend()} | device: {dev.device_kind} x {jax.device_count()} | "
          f"jax {jax.__version__} | {args.steps} timed steps, median", flush=True)
    worktree = None
    if args.control:
        worktree = tempfile.mkdtemp(prefix="fine_jax_control_")
        subprocess.run(["git", "worktree", "add", "--detach", worktree, args.control],
                       cwd=REPO, check=True, capture_output=True)
    results = []
    print(HEADER, flush=True)
    try:
        for size in args.sizes.split(","):
            batches = [int(b) for b in args.batches.split(",")] if args.batches else (
                [8] if size == "tiny" else [2, 4])
            for b in batches:
                if worktree:
                    for _ in range(args.pairs):
                        c = run_control(worktree, size, b, args.steps)
                        print(row(c), flush=True)
                        results.append(c)
                        for dtype in args.dtypes.split(","):
                            t = run_child([size, "pretrain", str(b), dtype, "off", "xla", "off",
                                           args.mlm_overflow.split(",")[0],
                                           args.precision.split(",")[0]], args.steps)
                            print(row(t) + f"   x{t['pairs_per_s'] / c['pairs_per_s']:.2f} "
                                  f"pairs/s, x{t['peak_gib'] / c['peak_gib']:.2f} memory",
                                  flush=True)
                            if args.phases and phase_line(t):
                                print(phase_line(t), flush=True)
                            results.append(t)
                    continue
                if args.interleave:
                    for stage in args.stages.split(","):
                        spec = [(d, r == "on", a, sc == "on", mo, pr)
                                for d, r, a, sc, mo, pr in itertools.product(
                                    *(getattr(args, k).split(",") for k in (
                                        "dtypes", "remat", "attention", "scan", "mlm_overflow",
                                        "precision")))]
                        rows = run_child(["interleave", size, stage, str(b), json.dumps(spec)],
                                         args.steps, args.allocator.split(",")[0])
                        for r in rows:
                            print(row(r) + f"   x{rows[0]['step_s'] / r['step_s']:.3f} speed of "
                                  "the first", flush=True)
                        results.extend(rows)
                    continue
                for stage in args.stages.split(","):
                    for dtype in args.dtypes.split(","):
                        for remat in args.remat.split(","):
                            for attention in args.attention.split(","):
                                for scan, mo, pr, alloc in itertools.product(
                                        args.scan.split(","), args.mlm_overflow.split(","),
                                        args.precision.split(","), args.allocator.split(",")):
                                    r = run_child([size, stage, str(b), dtype, remat, attention,
                                                   scan, mo, pr], args.steps, alloc)
                                    print(row(r), flush=True)
                                    if args.phases and phase_line(r):
                                        print(phase_line(r), flush=True)
                                    results.append(r)
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", worktree], cwd=REPO,
                           capture_output=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
