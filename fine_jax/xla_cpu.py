"""How the training steps lower on the CPU backend: random bits without a loop.

JAX lowers its threefry hash (every dropout mask, the hard-negative draws, MLM masking done on
device) on CPU as a 5-iteration ``while`` loop, to keep compile times short; on GPU and TPU it
unrolls the 20 rounds. On XLA's CPU runtime each loop iteration runs about twenty small kernels
one after the other (13 of them copies of the loop state): in a ``jax.profiler`` trace of the tiny
stage-1 step with dropout, about 700 of its 3,200 kernels computed random bits. Unrolled, each hash
is one fused elementwise kernel. The bits are the same: only the lowering changes (tested in tests/test_xla_cpu.py).

Measured on this repository's 2-core CPU, tiny stage-1 step, batch 8, fp32, each lowering in its
own process, three pairs one after the other: 32.3-35.4 ms per step unrolled against 35.7-36.5
ms with the loop (about 5 % shorter), compile 10.7-10.8 s against 10.5-10.6 s, and a compile
peak 0.07-0.08 GiB higher (1.38-1.40 against 1.30-1.32 GiB peak RSS). The switch is process-wide
(a lowering rule is a property of the JAX process), is applied by the commands that train
(``fine_jax.trainer``, ``benchmarks/train_step.py``), and is a no-op where JAX's internals differ
from what it expects. ``FINE_JAX_THREEFRY=loop`` keeps JAX's own lowering (the lower compile peak);
``unrolled`` is the default.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "FINE_JAX_THREEFRY"
CHOICES = ("unrolled", "loop")

_applied: bool | None = None


def unroll_threefry_on_cpu() -> bool:
    """Registers JAX's unrolled threefry lowering for the CPU platform; True when it is in use.

    Idempotent. Returns False (and changes nothing) with ``FINE_JAX_THREEFRY=loop``, or when
    this JAX version does not have the private pieces it uses; the training steps then lower as
    JAX does by default.
    """
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "unrolled")
    if choice not in CHOICES:
        from fine_jax.config import ConfigError  # one line from the commands, not a traceback

        raise ConfigError(f"{ENV}={choice!r}: use {' or '.join(CHOICES)} (unrolled, the default, "
                         "lowers the random-bit hash without a loop on CPU; loop keeps JAX's own)")
    if choice == "loop":
        _applied = False
        return _applied
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry
        rule = threefry._threefry2x32_lowering_rule  # the unrolled rule GPU and TPU use
        mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
        _applied = True
    except (ImportError, AttributeError) as e:  # a JAX whose internals moved: keep its default
        log.debug("threefry lowering left as JAX's default: %s", e)
        _applied = False
    return _applied
