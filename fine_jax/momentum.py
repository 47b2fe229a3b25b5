"""Momentum (EMA) parameters and feature queues as pure functions on pytrees (method_spec §1.6-§1.7).

Queues are stored row-major, ``(Q, E)``: row ``j`` is the feature the reference keeps in column
``j`` of its ``(E, Q)`` buffer. The checkpoint converter transposes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fine_jax.models.adapter import l2_normalize

IDX_QUEUE_FILL = -100  # never equals a real product index


def _check_fits(size: int, batch: int) -> None:
    # dynamic_update_slice clamps a write that runs past the end instead of wrapping it, which
    # would overwrite other rows silently; shapes are static, so this costs nothing at run time.
    if size % batch:
        raise ValueError(f"a queue of {size} rows takes writes of {batch} rows only if {batch} "
                         "divides it (loss.queue_size must be a multiple of the rows per step)")


def ema_update(momentum, online, m: float):
    """theta_m <- m * theta_m + (1 - m) * theta, leaf by leaf over the momentum tree's structure."""
    online_subset = {k: online[k] for k in momentum}
    return jax.tree_util.tree_map(lambda a, b: m * a + (1.0 - m) * b.astype(a.dtype), momentum,
                                  online_subset)


def init_queues(rng: jax.Array, size: int, dim: int, with_idx: bool = True) -> dict:
    """Random normal features, each normalised, idx filled with -100, pointer 0."""
    k_img, k_txt = jax.random.split(rng)
    queues = {
        "image": l2_normalize(jax.random.normal(k_img, (size, dim), jnp.float32)),
        "text": l2_normalize(jax.random.normal(k_txt, (size, dim), jnp.float32)),
        "ptr": jnp.zeros((), jnp.int32),
    }
    if with_idx:
        queues["idx"] = jnp.full((size,), IDX_QUEUE_FILL, jnp.int32)
    return queues


def _write(queue: jax.Array, rows: jax.Array, ptr: jax.Array, keep) -> jax.Array:
    """``rows`` written at ``ptr``; where ``keep`` is False the rows already there, rewritten:
    the decision costs a select over the written rows, not over the queue."""
    rows = rows.astype(queue.dtype)
    start = (ptr,) + (0,) * (queue.ndim - 1)
    if keep is not None:
        rows = jnp.where(keep, rows, jax.lax.dynamic_slice(queue, start, rows.shape))
    return jax.lax.dynamic_update_slice(queue, rows, start)


def _advance(ptr: jax.Array, n: int, size: int, keep) -> jax.Array:
    moved = (ptr + n) % size
    return (moved if keep is None else jnp.where(keep, moved, ptr)).astype(jnp.int32)


def enqueue(queues: dict, image_feat: jax.Array, text_feat: jax.Array,
            idx: jax.Array | None = None, keep=None) -> dict:
    """Write the global batch's momentum features at ``ptr``; ptr <- (ptr + Bg) mod Q.

    Q must be a multiple of Bg (checked when the config is built), so a write never wraps.
    ``keep`` (a traced bool, optional): False leaves the queues and the pointer as they were
    (a step that is not applied, ``stages.common.finish_step``).
    """
    batch = image_feat.shape[0]
    size = queues["image"].shape[0]
    _check_fits(size, batch)
    ptr = queues["ptr"]
    out = dict(queues)
    out["image"] = _write(queues["image"], image_feat, ptr, keep)
    out["text"] = _write(queues["text"], text_feat, ptr, keep)
    if "idx" in queues:
        if idx is None:
            raise ValueError("this queue keeps product ids: pass idx")
        out["idx"] = _write(queues["idx"], idx, ptr, keep)
    out["ptr"] = _advance(ptr, batch, size, keep)
    return out


def init_tgir_queues(rng: jax.Array, size: int, dim: int) -> dict:
    """Stage 3 (method_spec §1.7): ``image`` and ``fusion`` queues, random unit rows, each with
    its own pointer (the image queue takes 2 Bg rows per step, the fusion queue Bg)."""
    k_img, k_fus = jax.random.split(rng)
    return {
        "image": l2_normalize(jax.random.normal(k_img, (size, dim), jnp.float32)),
        "fusion": l2_normalize(jax.random.normal(k_fus, (size, dim), jnp.float32)),
        "image_ptr": jnp.zeros((), jnp.int32),
        "fusion_ptr": jnp.zeros((), jnp.int32),
    }


def enqueue_rows(queue: jax.Array, ptr: jax.Array, rows: jax.Array,
                 keep=None) -> tuple[jax.Array, jax.Array]:
    """Writes ``rows`` at ``ptr``; returns (queue, (ptr + len(rows)) mod Q). Q must be a multiple
    of ``len(rows)`` (checked when the config is validated), so a write never wraps. ``keep``
    False leaves both as they were (see :func:`enqueue`)."""
    _check_fits(queue.shape[0], rows.shape[0])
    return (_write(queue, rows, ptr, keep),
            _advance(ptr, rows.shape[0], queue.shape[0], keep))
