"""Data-parallel embedding of an evaluation set: every device embeds its share of each batch.

Batches are padded to a fixed size (a multiple of the device count), so one compiled function
serves every batch, and the padding rows are dropped from the result. Parameters are replicated
over the mesh; the batch is split along its batch axes.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's device count."""
    n = mesh.devices.size
    return int(math.ceil(batch_size / n) * n)


class Embedder:
    """``embedder(fn, params, batches)``: runs ``fn(params, *arrays)`` over host batches of
    arrays (each a tuple of equal-length arrays), sharded over ``mesh``; returns the stacked
    numpy outputs without the padding."""

    def __init__(self, mesh: Mesh, batch_size: int, batch_axes: Sequence[str] | None = None):
        self.mesh = mesh
        self.batch_size = padded_batch_size(batch_size, mesh)
        axes = tuple(batch_axes or mesh.axis_names)
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P(axes))
        self._compiled: dict[int, Callable] = {}

    def _jit(self, fn, n_args: int):
        key = (id(fn), n_args)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(fn, in_shardings=(self.replicated,) + (self.sharded,) * n_args,
                                          out_shardings=self.sharded)
        return self._compiled[key]

    def params(self, params):
        return jax.device_put(params, self.replicated)

    def __call__(self, fn, params, batches: Iterable[Sequence[np.ndarray]],
                 pad_values: Sequence[float] | None = None) -> np.ndarray:
        out = []
        compiled = None
        for arrays in batches:
            arrays = [np.asarray(a) for a in arrays]
            n = len(arrays[0])
            for start in range(0, n, self.batch_size):  # a host batch larger than ours is split
                chunk = [a[start:start + self.batch_size] for a in arrays]
                m = len(chunk[0])
                pads = pad_values or [0] * len(chunk)
                chunk = [np.concatenate([c, np.full((self.batch_size - m,) + c.shape[1:], v,
                                                    c.dtype)]) if m < self.batch_size else c
                         for c, v in zip(chunk, pads)]
                compiled = compiled or self._jit(fn, len(chunk))
                result = compiled(params, *[jax.device_put(c, self.sharded) for c in chunk])
                out.append(np.asarray(jax.device_get(result))[:m])
        if not out:
            raise ValueError("nothing to embed: the evaluation set is empty")
        return np.concatenate(out)


def timed(log, what: str):
    """Context manager that logs how long ``what`` took."""

    class _Timer:
        def __enter__(self):
            self.t0 = time.time()
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                log(f"{what} in {time.time() - self.t0:.1f}s")

    return _Timer()
