"""Memory plan for the stage-1 train step on a mesh larger than this machine.

    python benchmarks/memory_plan.py                                  # reference size, 64 devices
    python benchmarks/memory_plan.py --meshes=64x1,16x4,8x8 --batches=256,1024 --out=plan.json
    python benchmarks/memory_plan.py --size=tiny --devices=8 --meshes=8x1,2x4 --batches=16,32 \
        --queue=1024                                                  # a quick check
    python benchmarks/memory_plan.py --report=plan.json --budgets=v5e:16,v5p:95,h100:80

The step is built exactly as ``fine_jax.trainer`` builds it (model, optimiser, sharded state,
``parallel.groups_from_config``, ``jax.jit(step, in_shardings, out_shardings, donate_argnums=0)``)
for a *simulated* mesh of CPU devices (``--xla_force_host_platform_device_count``), then lowered
and compiled from abstract inputs only: the state is ``jax.eval_shape`` of the initialiser with
its FSDP shardings, the batch and the rng are ``jax.ShapeDtypeStruct``s with the batch and the
replicated sharding. Nothing is initialised or allocated; only the compiler runs.

For every mesh shape (``DATAxFSDP``) and global batch it prints:

* the compiled per-device memory from ``compiled.memory_analysis()``: arguments (this device's
  shard of the state, batch and rng), outputs (new state shard and metrics), temporaries (the
  activations, gradients and optimiser intermediates XLA's buffer assignment keeps live), the
  bytes of outputs aliased to donated arguments, and the generated code. The peak is estimated
  as ``argument + output + temp - alias``: the donated state is written in place, so the aliased
  outputs occupy no memory beyond their arguments.
* the collectives of one step, counted in the compiled (per-device, partitioned) HLO text:
  all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute. Their "bytes" is the
  full buffer each one exchanges on a device: the gathered result of an all-gather, the unscattered
  operand of a reduce-scatter, the operand of the others. A ring moves about (n-1)/n of it per
  device for an all-gather or reduce-scatter and 2(n-1)/n for an all-reduce. The step has no
  loops, so every collective in the text runs once per step.
* the compile time, and the XLA warnings "Involuntary full rematerialization" (a sharding the
  partitioner could only meet by replicating a tensor), counted with the ops they name.

Then, per mesh shape, the largest global batch that fits a per-device memory budget (default
16 GiB, a TPU v5e chip, and 95 GiB, a TPU v5p chip): the per-device peak is affine in the batch,
so ``peak = a + b * batch`` is fitted through the compiled points (least squares over two or more
batches) and solved for the budget. Reported are the unconstrained estimate and the largest batch
the trainer would accept: a multiple of the device count (at least two examples per device with
``batch_semantics=per_group``) that divides ``loss.queue_size`` (the queue pointer advances in
whole global batches).

These are XLA:CPU compiled sizes of the same program. They approximate, but do not equal, what
the TPU or GPU compiler lays out: fusion, rematerialisation, layout padding (TPU tiles pad minor
dimensions to 128 and second-minor ones to 8) and collective scheduling differ, and the CPU
compiles the program in float32 (``model.dtype`` of the config; ``auto``, the reference
configs' platform choice, is planned as float32).
Treat the numbers as a plan to check with one real step on the target.

Cost on the host: at the reference size on 64 simulated devices one compile took 8-12 minutes
on two shared CPU cores and 12-14 GiB of host memory (peak resident set); the tiny size takes a
minute or two and about 2 GiB. ``--out`` saves every point as it is compiled,
and ``--report`` reprints a saved plan.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import tempfile
import time


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=64,
                   help="simulated CPU devices (default 64)")
    p.add_argument("--meshes", default="64x1,16x4,8x8",
                   help="comma-separated DATAxFSDP mesh shapes; each must multiply to --devices")
    p.add_argument("--batches", default="256,1024",
                   help="comma-separated global batch sizes (two or more for the fit)")
    p.add_argument("--queue", type=int, default=None,
                   help="loss.queue_size (default: the config's, 65,536 for the reference)")
    p.add_argument("--semantics", default="per_group", choices=("per_group", "global"),
                   help="parallel.batch_semantics (default per_group)")
    p.add_argument("--size", default="base", help="named model size (base = the reference)")
    p.add_argument("--config", default=None,
                   help="config file (default configs/fashiongen.py of this repository)")
    p.add_argument("--fsdp_min_size", type=int, default=None,
                   help="parallel.fsdp_min_size (default: the config's)")
    p.add_argument("--budgets", default="v5e:16,v5p:95",
                   help="NAME:GiB per-device budgets for the largest-batch estimate")
    p.add_argument("--out", default=None, help="write every number to this JSON file")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="reprint the tables of a plan saved with --out (no compilation)")
    p.add_argument("--show_xla_log", action="store_true",
                   help="echo XLA's log output during compilation in full (otherwise only the "
                        "rematerialisation warnings are summarised)")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # The simulated devices must exist before jax is imported.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={ARGS.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fine_jax import config as config_lib  # noqa: E402
from fine_jax import parallel, stages  # noqa: E402
from fine_jax.data import pipeline  # noqa: E402
from fine_jax.models.fine import FashionFINE  # noqa: E402
from fine_jax.optim import make_optimizer  # noqa: E402
from fine_jax.stages.common import create_state  # noqa: E402

GIB = 2 ** 30
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# FashionGen's training records (the reference's 2,035 iterations x 128 per epoch): only the
# alpha ramp and the learning-rate schedule see steps_per_epoch, not the memory.
FASHIONGEN_TRAIN_RECORDS = 260_480
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
REMAT_WARNING = "Involuntary full rematerialization"


# ----------------------------------------------------------------------------------------------
# The step, as the trainer builds it
# ----------------------------------------------------------------------------------------------
def build_config(args, data: int, fsdp: int, batch: int):
    path = args.config or os.path.join(REPO, "configs", "fashiongen.py")
    cfg = config_lib.load_config_file(path, size=args.size)
    if cfg.model.vocab_size in (0, -1, None):
        cfg.model.vocab_size = 30522  # bert-base-uncased, the reference vocab
    if cfg.model.dtype == "auto":  # the plan compiles the fp32 program (see above)
        cfg.model.dtype = "float32"
    if args.queue is not None:
        cfg.loss.queue_size = args.queue
    if args.fsdp_min_size is not None:
        cfg.parallel.fsdp_min_size = args.fsdp_min_size
    cfg.train.global_batch_size = batch
    cfg.parallel.data, cfg.parallel.fsdp = data, fsdp
    cfg.parallel.batch_semantics = args.semantics
    return cfg


def abstract_batch(cfg, batch: int, sharding) -> dict:
    """The stage-1 batch (tests/test_train_step.py::make_batch) as sharded ShapeDtypeStructs."""
    s, length = cfg.model.image_size, cfg.data.max_len

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    return {"image": sds((batch, s, s, 3), np.float32),
            "input_ids": sds((batch, length), np.int32),
            "attention_mask": sds((batch, length), np.int32),
            "mask_labels": sds((batch, length), np.int32),
            "replace_labels": sds((batch, length), np.int32),
            "idx": sds((batch,), np.int32)}


def lower_step(cfg):
    """-> (lowered step, mesh, abstract state), mirroring ``fine_jax.trainer._train``."""
    stage = stages.get(cfg.stage)
    mesh = parallel.mesh_from_config(cfg)
    bg = cfg.train.global_batch_size
    spe = pipeline.steps_per_epoch(FASHIONGEN_TRAIN_RECORDS, bg)
    total_steps = cfg.optim.epochs * spe if cfg.train.max_steps < 0 else cfg.train.max_steps

    # --- model, optimiser, state (as in the trainer) ---
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer, schedule = make_optimizer(cfg.optim, spe)
    make_queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    # The trainer passes jax.random.PRNGKey(seed); its abstract value gives the same shapes
    # without running anything. The jitted init that comes back is never called.
    key = jax.eval_shape(lambda: jax.random.PRNGKey(cfg.train.seed))
    _init, abstract_state = parallel.sharded_init(
        lambda r: create_state(model, optimizer, r, make_queues), mesh, cfg.parallel.fsdp_min_size,
        key)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_state)

    step_fn = stage.make_step(model, optimizer, loss_cfg, spe, schedule, total_steps=total_steps,
                              deterministic=cfg.train.deterministic,
                              groups=parallel.groups_from_config(cfg, mesh))
    repl = parallel.replicated(mesh)
    batch_shard = parallel.batch_sharding(mesh)
    jstep = jax.jit(step_fn, in_shardings=(shardings, batch_shard, repl),
                    out_shardings=(shardings, repl), donate_argnums=0)

    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)  # the per-step key
    lowered = jstep.lower(abstract_state, abstract_batch(cfg, bg, batch_shard), rng)
    return lowered, mesh, abstract_state


# ----------------------------------------------------------------------------------------------
# Reading the compiled program
# ----------------------------------------------------------------------------------------------
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
                 r"(?P<op>" + "|".join(c.replace("-", r"\-") for c in COLLECTIVES) +
                 r")(?P<start>-start)?\(")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * DTYPE_BYTES[dtype]
    return total


def _operands(line: str, open_at: int) -> str:
    depth = 0
    for i in range(open_at, len(line)):
        if line[i] == "(":
            depth += 1
        elif line[i] == ")":
            depth -= 1
            if depth == 0:
                return line[open_at + 1:i]
    return line[open_at + 1:]


def count_collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} over the compiled HLO text (see the module docstring for what
    the bytes are); an async pair (``*-start`` / ``*-done``) counts once."""
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if not m:
            continue
        result = shape_bytes(m.group("shape"))
        operand = shape_bytes(_operands(line, m.end() - 1))
        if m.group("start") and m.group("shape").lstrip().startswith("("):
            result = max(result - operand, 0)  # a start's tuple echoes its operand
        out[m.group("op")]["count"] += 1
        out[m.group("op")]["bytes"] += max(result, operand)
    return out


class CaptureStderr:
    """Collects what the process writes to file descriptor 2 (XLA's C++ log) while active."""

    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False


_OP_NAME = re.compile(r'op_name="([^"]*)"')
_HLO_OP = re.compile(r"HLO operation:?\s*%?([\w.\-]+)\s*=\s*(?:\([^)]*\)|\S+)\s+([\w\-]+)\(")


def _braced(text: str, start: int) -> str:
    """The ``{...}`` group opening at or after ``start`` (nested braces included)."""
    i = text.find("{", start)
    if i < 0:
        return "?"
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    return text[i:]


def _strip_metadata(sharding: str) -> str:
    """A sharding's text without its ``metadata={...}`` parts."""
    out = sharding
    while (i := out.find("metadata={")) >= 0:
        end = i + len("metadata=") + len(_braced(out, i))
        out = out[:i] + out[end:]
    return re.sub(r"[,\s]+([}\]])", r"\1", out).strip()


def remat_warnings(log_text: str) -> list[dict]:
    """The "Involuntary full rematerialization" warnings of an XLA log, each with the HLO
    instruction it names, its jax op_name and the two shardings."""
    found = []
    for chunk in log_text.split(REMAT_WARNING)[1:]:
        chunk = chunk.split("\n")[0]
        op_at = chunk.find("HLO operation")
        hlo = _HLO_OP.search(chunk)
        name = _OP_NAME.search(chunk, max(op_at, 0))
        src_at = chunk.find("from sharding")
        src = _braced(chunk, src_at) if src_at >= 0 else "?"
        dst_at = chunk.find(" to ", src_at + len(src)) if src_at >= 0 else -1
        dst = _braced(chunk, dst_at) if dst_at >= 0 else "?"
        found.append({"hlo": f"{hlo.group(2)} {hlo.group(1)}" if hlo else "?",
                      "op_name": name.group(1) if name else "?",
                      "from": _strip_metadata(src), "to": _strip_metadata(dst),
                      "text": (REMAT_WARNING + chunk)[:1500]})
    return found


def memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", ""): int(getattr(ma, f, 0) or 0) for f in fields}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


# ----------------------------------------------------------------------------------------------
# One point, and the fit
# ----------------------------------------------------------------------------------------------
def plan_point(args, data: int, fsdp: int, batch: int) -> dict:
    n = data * fsdp
    row = {"mesh": f"{data}x{fsdp}", "data": data, "fsdp": fsdp, "global_batch": batch,
           "per_device_batch": batch / n}
    cfg = build_config(args, data, fsdp, batch)
    row["queue_size"] = cfg.loss.queue_size
    try:
        config_lib.validate(cfg, num_devices=n)
    except config_lib.ConfigError as e:
        row["error"] = f"config rejected: {e}"
        return row
    log = None
    try:
        with CaptureStderr() as cap:
            t0 = time.perf_counter()
            lowered, _mesh, abstract_state = lower_step(cfg)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        log = cap.text
    except Exception as e:  # noqa: BLE001 - one point failing should not end the plan
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        return row
    finally:
        if log is not None and args.show_xla_log and log.strip():
            sys.stderr.write(log)
            sys.stderr.flush()
    row["lower_s"], row["compile_s"] = t1 - t0, t2 - t1
    row["memory"] = memory(compiled)
    row["collectives"] = count_collectives(compiled.as_text())
    row["remat_warnings"] = remat_warnings(log or "")
    row["params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_state["params"])))
    row["shardings"] = parallel.describe_shardings(abstract_state)
    row["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    del compiled, lowered
    jax.clear_caches()
    return row


def fit_affine(points: list[tuple[int, int]]) -> tuple[float, float, float] | None:
    """Least-squares peak = a + b * batch -> (a, b, largest |residual|), or None."""
    if len({b for b, _ in points}) < 2:
        return None
    x = np.array([b for b, _ in points], np.float64)
    y = np.array([p for _, p in points], np.float64)
    b, a = np.polyfit(x, y, 1)
    resid = float(np.max(np.abs(y - (a + b * x))))
    return float(a), float(b), resid


def largest_batch(a: float, b: float, budget: float, n: int, queue: int,
                  per_group: bool) -> tuple[float | None, int | None]:
    """(unconstrained estimate, largest batch the trainer accepts) under ``budget`` bytes."""
    if a > budget:
        return 0.0, None
    if b <= 0:
        return math.inf, None
    est = (budget - a) / b
    lowest = 2 * n if per_group else max(n, 2)
    ok = [d for d in range(n, queue + 1, n)
          if queue % d == 0 and d >= lowest and d <= est]
    return est, (max(ok) if ok else None)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def gib(x) -> str:
    return f"{x / GIB:.2f}"


def human_bytes(x: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x} B"


def print_table(rows: list[dict]) -> None:
    short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
             "collective-permute": "CP"}
    print("| mesh (data x fsdp) | global batch | per-device batch | argument GiB | output GiB | "
          "temp GiB | alias GiB | peak GiB | collectives: count (bytes) | remat warnings | "
          "compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mesh']} | {r['global_batch']} | {r['per_device_batch']:g} | "
                  f"{r['error'][:200]} | | | | | | | |")
            continue
        m = r["memory"]
        coll = ", ".join(f"{short[k]} {v['count']} ({human_bytes(v['bytes'])})"
                         for k, v in r["collectives"].items() if v["count"]) or "none"
        print(f"| {r['mesh']} | {r['global_batch']} | {r['per_device_batch']:g} | "
              f"{gib(m['argument'])} | {gib(m['output'])} | {gib(m['temp'])} | "
              f"{gib(m['alias'])} | **{gib(m['peak'])}** | {coll} | {len(r['remat_warnings'])} | "
              f"{r['compile_s']:.0f} |")


def summarise_remat(rows: list[dict]) -> None:
    any_warn = False
    for r in rows:
        warns = r.get("remat_warnings") or []
        if not warns:
            continue
        any_warn = True
        print(f"\n{r['mesh']}, global batch {r['global_batch']}: {len(warns)} x "
              f"\"{REMAT_WARNING}\"")
        counts: dict[tuple[str, str, str], int] = {}
        for w in warns:
            kind = w["hlo"].split(" ")[0]  # the opcode, without the instruction's number
            key = (kind, w["op_name"], f"{w['from']} -> {w['to']}")
            counts[key] = counts.get(key, 0) + 1
        for (kind, name, change), c in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"  {c} x {kind}: {name}  [{change}]")
    if not any_warn:
        print(f"\nNo \"{REMAT_WARNING}\" warnings from the partitioner.")


def main(args) -> int:
    budgets = []
    for item in args.budgets.split(","):
        name, size = item.split(":")
        budgets.append((name, float(size)))
    if args.report:  # reprint a saved plan, with this run's budgets
        with open(args.report) as f:
            saved = json.load(f)
        rows = saved["rows"]
        meshes = list(dict.fromkeys((r["data"], r["fsdp"]) for r in rows))
        for key in ("size", "semantics", "devices"):
            setattr(args, key, saved["args"][key])
        print(f"# Stage-1 train-step memory plan (from {args.report}): size {args.size!r}, "
              f"{args.devices} simulated CPU devices, batch semantics {args.semantics}")
        print(f"jax {saved['jax']}; abstract inputs only, nothing allocated")
        return report(args, rows, meshes, budgets)

    n = jax.device_count()
    if n != args.devices:
        raise SystemExit(f"asked for {args.devices} devices but jax sees {n} (was jax imported "
                         "before XLA_FLAGS was set?)")
    meshes = []
    for spec in args.meshes.split(","):
        data, fsdp = (int(v) for v in spec.lower().split("x"))
        if data * fsdp != n:
            raise SystemExit(f"mesh {spec} has {data * fsdp} devices, not {n}")
        meshes.append((data, fsdp))
    batches = sorted({int(b) for b in args.batches.split(",")})

    print(f"# Stage-1 train-step memory plan: size {args.size!r}, {n} simulated CPU devices, "
          f"batch semantics {args.semantics}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; abstract inputs only, "
          "nothing allocated\n", flush=True)

    rows = []
    for data, fsdp in meshes:
        for batch in batches:
            print(f"compiling mesh {data}x{fsdp}, global batch {batch} ...", flush=True)
            row = plan_point(args, data, fsdp, batch)
            rows.append(row)
            if "error" in row:
                print(f"  failed: {row['error'][:500]}", flush=True)
            else:
                print(f"  peak {gib(row['memory']['peak'])} GiB per device; lowered in "
                      f"{row['lower_s']:.0f}s, compiled in {row['compile_s']:.0f}s; "
                      f"{len(row['remat_warnings'])} rematerialisation warnings; host max RSS "
                      f"{row['host_max_rss_gib']:.1f} GiB", flush=True)
            if args.out:  # partial results survive an interrupted plan
                _write(args.out, args, rows, [])
    return report(args, rows, meshes, budgets)


def report(args, rows: list[dict], meshes: list[tuple[int, int]], budgets) -> int:
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(f"\nModel: {ok[0]['params'] / 1e6:.1f}M parameters; queue "
              f"{ok[0]['queue_size']:,}.")
        for mesh in dict.fromkeys(r["mesh"] for r in ok):
            print(f"  {mesh}: {next(r['shardings'] for r in ok if r['mesh'] == mesh)}")
    print("\n## Per-device compiled memory and collectives per step\n")
    print_table(rows)
    print("\npeak = argument + output + temp - alias (the donated state is updated in place, so "
          "the outputs aliased to it take no extra memory); generated code is not included. "
          "Collective bytes: the full buffer each op exchanges on a device (gathered result of "
          "an all-gather, unscattered operand of a reduce-scatter, operand of the others), "
          "summed over the step.")

    print("\n## Largest global batch per device budget\n")
    at_least = " with at least 2 examples per device" if args.semantics == "per_group" else ""
    print("Fit per mesh: peak = a + b * global_batch through the compiled points (least "
          "squares). 'accepted' is the largest batch <= the estimate that is a multiple of the "
          f"device count{at_least} and divides the queue (so at most the queue size); 'none' "
          "when no such batch fits. Through two batches the line is exact (residual 0 by "
          "construction); a third batch tests the affine assumption.\n")
    header = ("| mesh | a (GiB) | b (MiB / global example) | b x devices (MiB / example on a "
              "device) | fit max residual (MiB) |")
    sep = "|---|---:|---:|---:|---:|"
    for name, size in budgets:
        header += f" {name} {size:g} GiB: estimate | {name} accepted |"
        sep += "---:|---:|"
    print(header)
    print(sep)
    fits = []
    for data, fsdp in meshes:
        mesh = f"{data}x{fsdp}"
        pts = [(r["global_batch"], r["memory"]["peak"]) for r in ok if r["mesh"] == mesh]
        fit = fit_affine(pts)
        if fit is None:
            print(f"| {mesh} | fewer than two compiled batches: no fit | | | |" +
                  " | |" * len(budgets))
            continue
        a, b, resid = fit
        queue = next(r["queue_size"] for r in ok if r["mesh"] == mesh)
        entry = {"mesh": mesh, "a_bytes": a, "b_bytes_per_example": b, "max_residual": resid,
                 "budgets": {}}
        line = (f"| {mesh} | {a / GIB:.2f} | {b / 2 ** 20:.1f} | "
                f"{b * data * fsdp / 2 ** 20:,.0f} | {resid / 2 ** 20:.1f} |")
        for name, size in budgets:
            est, accepted = largest_batch(a, b, size * GIB, data * fsdp, queue,
                                          args.semantics == "per_group")
            entry["budgets"][name] = {"gib": size, "estimate": est, "accepted": accepted}
            est_s = "unbounded" if est == math.inf else f"{est:,.0f}"
            line += f" {est_s} | {accepted if accepted is not None else 'none'} |"
        fits.append(entry)
        print(line)

    summarise_remat(rows)
    print("\nThese are XLA:CPU compiled sizes of the same program on simulated devices. They "
          "approximate, but do not equal, the TPU/GPU layouts: the other compilers fuse, "
          "rematerialise, pad (TPU tiles of 8 x 128) and schedule collectives differently. The "
          "CPU compiles the float32 program (model.dtype=float32). Check the chosen batch with "
          "one real step on the target.")
    if args.out and not args.report:
        _write(args.out, args, rows, fits)
        print(f"\nwrote {args.out}")
    return 0 if ok else 1


def _write(path: str, args, rows, fits) -> None:
    with open(path, "w") as f:
        json.dump({"args": vars(args), "jax": jax.__version__, "rows": rows, "fits": fits}, f,
                  indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main(ARGS))
