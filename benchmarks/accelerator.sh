#!/usr/bin/env bash
# The accelerator measurements of the speed targets in one run, each part under its own time limit,
# writing as it goes (a part cut short leaves the rows it printed):
#
#   bash benchmarks/accelerator.sh OUTDIR
#
#   OUTDIR/env.txt           the machine: accelerator, driver, JAX and its devices
#   OUTDIR/stage1.txt|json   stage 1, reference size, bf16, attention xla and fused, at $BATCHES
#                            (compile time, step time, pairs/s, MFU, peak memory)
#   OUTDIR/tests.txt         tests/test_speed_options.py on the accelerator (bf16, fused attention,
#                            remat, scanned layers, matmul precision against the float32 step)
#   OUTDIR/fp32.txt|json     stage 1 in float32 at the reference's precision and at JAX's default
#   OUTDIR/stages.txt|json   stages 2 and 3, bf16, fused attention, at the largest of $BATCHES
#
# The parts run in that order, most wanted first. Environment: PYTHON (python3), SIZE (reference),
# BATCHES (64), STEPS (10), and LIMIT_S, the limit of each benchmark part in seconds (200; the
# tests get 150). About a minute per measurement on a GPU, most of it compilation; the whole run
# fits in ten minutes. Needs fine_jax's dependencies installed; installs and downloads nothing.
set -u -o pipefail
out=${1:?usage: bash benchmarks/accelerator.sh OUTDIR}
py=${PYTHON:-python3}
size=${SIZE:-reference}
batches=${BATCHES:-64}
steps=${STEPS:-10}
limit=${LIMIT_S:-200}
largest=${batches##*,}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND, its output to NAME.txt and the screen
  local name=$1 seconds=$2
  shift 2
  echo "== $name: $*"
  timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=$?
  [ "$rc" = 0 ] || echo "== $name ended with status $rc" | tee -a "$out/$name.txt"
}

bench=("$py" benchmarks/train_step.py --sizes="$size" --steps="$steps")
part stage1 "$limit" "${bench[@]}" --batches="$batches" --dtypes=bfloat16 --attention=xla,fused \
  --json="$out/stage1.json"
# The tests pin JAX to the CPU unless JAX_PLATFORMS is set: an empty value leaves JAX its default
# backend, the accelerator.
JAX_PLATFORMS= part tests 150 "$py" -m pytest -q -o addopts="" -p no:cacheprovider \
  tests/test_speed_options.py
part fp32 "$limit" "${bench[@]}" --batches="$largest" --dtypes=float32 --precision=auto,default \
  --json="$out/fp32.json"
part stages "$limit" "${bench[@]}" --batches="$largest" --dtypes=bfloat16 --attention=fused \
  --stages=retrieval,tgir --json="$out/stages.json"
