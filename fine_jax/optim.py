"""AdamW with the reference weight-decay mask and learning-rate schedule (method_spec §8.2-§8.3)."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and the learning-rate schedule, reference stage-1 values as defaults (method_spec
    §8.1); the one source of the ``optim`` config block's defaults."""

    lr: float = 6e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_units: int = 5
    warmup_unit_iters: int = 100
    epochs: int = 10
    weight_decay: float = 0.02
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Learning-rate multipliers by parameter path: "PATTERN=SCALE[,PATTERN=SCALE...]", each
    # PATTERN a regular expression searched in the parameter's path ("text_encoder/layer_2/...");
    # the first that matches scales that parameter's AdamW update (its weight decay included).
    # "" (the reference): one learning rate for every parameter.
    lr_scales: str = ""


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The reference's timm CosineLRScheduler as driven by ALBEF-style training scripts.

    In epoch 0 the scheduler is called after iterations 0, unit, 2*unit, ... W*unit with
    t = i / unit; the warm-up is linear in t from ``warmup_lr`` to ``peak_lr``. After epoch e the
    learning rate of epoch e+1 is a cosine over epochs from ``peak_lr`` to ``min_lr``.
    """

    peak_lr: float = 6e-5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_units: int = 5  # W, in scheduler calls
    warmup_unit_iters: int = 100  # iterations per scheduler call in epoch 0
    epochs: int = 10


def reference_lr(step, steps_per_epoch: int, cfg: ScheduleConfig):
    """Learning rate applied at iteration ``step`` (0-based count of optimiser updates before it)."""
    step = jnp.asarray(step, jnp.int32)
    epoch = step // steps_per_epoch
    j = step % steps_per_epoch
    w = cfg.warmup_units
    if w > 0:
        # Last scheduler call strictly before iteration j (calls happen after iterations 0, unit, ...).
        last_call = jnp.minimum(cfg.warmup_unit_iters * ((j - 1) // cfg.warmup_unit_iters),
                                cfg.warmup_unit_iters * w)
        t = last_call.astype(jnp.float32) / cfg.warmup_unit_iters
        warm = jnp.where(t < w, cfg.warmup_lr + t * (cfg.peak_lr - cfg.warmup_lr) / w, cfg.peak_lr)
        epoch0 = jnp.where(j == 0, cfg.warmup_lr, warm)
    else:
        epoch0 = jnp.asarray(cfg.peak_lr, jnp.float32)
    cosine = cfg.min_lr + 0.5 * (cfg.peak_lr - cfg.min_lr) * (
        1.0 + jnp.cos(math.pi * epoch.astype(jnp.float32) / cfg.epochs))
    # cycle_limit = 1: past the last epoch the scheduler returns min_lr.
    later = jnp.where(epoch < cfg.epochs, cosine, cfg.min_lr)
    return jnp.where(epoch == 0, epoch0, later).astype(jnp.float32)


def weight_decay_mask(params):
    """Decay every parameter that is not 1-D (reference: not 1-D and not '.bias').

    So matrices, conv kernels, W_v, the 0-d temperature, pos_embed and cls_token are decayed, while
    biases and LayerNorm scales are not (method_spec §8.2, §10 B13).
    """
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) != 1, params)


def parse_lr_scales(text: str) -> list[tuple[re.Pattern, float]]:
    """``optim.lr_scales`` as (compiled pattern, scale) pairs, with errors that name the fix."""
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, scale = item.rpartition("=")
        try:
            if not sep or not pattern:
                raise ValueError
            rules.append((re.compile(pattern), float(scale)))
        except (ValueError, re.error) as e:
            raise ValueError(f"optim.lr_scales: {item!r} is not PATTERN=SCALE with PATTERN a regular "
                             f"expression and SCALE a number ({e or 'no = or no pattern'}); e.g. "
                             "'text_encoder/layer_[2-9]|itm_head=2.0'") from None
    return rules


def lr_scale_tree(params, text: str):
    """Per-parameter learning-rate multipliers (1.0 where no pattern of ``text`` matches)."""
    rules = parse_lr_scales(text)

    def scale(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return next((s for pattern, s in rules if pattern.search(name)), 1.0)

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_updates_by_path(text: str) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its ``lr_scales`` multiplier (a no-op without rules)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scales = lr_scale_tree(updates, text)
        return jax.tree_util.tree_map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype),
                                      updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, steps_per_epoch: int) -> tuple[optax.GradientTransformation, callable]:
    """Returns (optimizer, schedule_fn) from the ``optim`` config block (or an OptimConfig)."""
    if not isinstance(cfg, OptimConfig):
        cfg = OptimConfig(**dict(cfg))
    sched_cfg = ScheduleConfig(peak_lr=cfg.lr, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                               warmup_units=cfg.warmup_units, warmup_unit_iters=cfg.warmup_unit_iters,
                               epochs=cfg.epochs)

    def schedule(count):
        return reference_lr(count, steps_per_epoch, sched_cfg)

    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=weight_decay_mask)
    if parse_lr_scales(cfg.lr_scales):
        opt = optax.chain(opt, scale_updates_by_path(cfg.lr_scales))
    return opt, schedule
