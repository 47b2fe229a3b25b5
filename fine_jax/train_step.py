"""The stage-1 train state and the jitted, pure training step (method_spec §5.1).

``train_step(state, batch, rng) -> (state, metrics)``. The state is a plain dict pytree:

* ``step``      int32 scalar, optimiser updates done so far
* ``params``    online parameters (every module)
* ``momentum``  EMA copies of the six modules of ``MOMENTUM_MODULES``
* ``opt_state`` AdamW state
* ``queues``    ``image`` (Q, E), ``text`` (Q, E), ``idx`` (Q,), ``ptr``

The order of operations follows the reference exactly: clamp tau (written back into the params),
EMA-update the momentum modules with the pre-step online weights, momentum forward, losses computed
against the pre-step queues, enqueue, then the AdamW update.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fine_jax import objectives as obj
from fine_jax.models.fine import FashionFINE, init_params, momentum_subset
from fine_jax.momentum import ema_update, enqueue, init_queues


@dataclasses.dataclass(frozen=True)
class LossConfig:
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_warmup: bool = True  # linear ramp of alpha over epoch 0
    alpha_focal: float = 0.25
    gamma_focal: float = 2.0
    temp_min: float = 0.001
    temp_max: float = 0.5
    queue_size: int = 65536
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_sym: float = 1.0
    w_mlm: float = 1.0
    w_rtp: float = 1.0
    # method_spec §10 B4: exclude same-product pairs from ITM negative sampling. Off = reference.
    itm_exclude_same_product: bool = False
    # Training from random weights (the reference always starts from ALBEF / FashionSAP weights).
    # A random BERT maps every caption to nearly the same [CLS] feature, and from that state the
    # momentum keys, the stale queue, self-distillation and the symbol loss all pull towards a
    # collapsed solution where every image and text embeds alike. For the first N steps the
    # contrastive keys are the in-batch online features (momentum coefficient 0), the queue is
    # left out of the softmax (it is still filled), distillation is off (alpha 0) and the symbol
    # loss weight is 0; afterwards the full objective runs. 0 = reference (no warm-up).
    scratch_warmup_steps: int = 0
    # During that warm-up, keep the queue in the softmax (its keys are then the online features of
    # the last queue_size / batch steps): many more negatives than the batch alone.
    scratch_warmup_queue: bool = False
    # During that warm-up, take the in-batch keys from the online MAA features z_v, z_t (with
    # gradient) instead of the global CLS features: a symmetric in-batch contrastive loss on the
    # very features that retrieval ranks by. Off: the keys are the stop-gradient CLS features, as
    # the momentum keys of the reference would be with momentum 0.
    scratch_warmup_maa_keys: bool = False

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        from fine_jax.config import dataclass_from_block

        return dataclass_from_block(cls, cfg, "loss")


def create_train_state(model: FashionFINE, optimizer: optax.GradientTransformation, rng: jax.Array,
                       queue_size: int) -> dict:
    """Fresh state: random online params, momentum = copy of the six online modules, random queues."""
    k_params, k_queue = jax.random.split(rng)
    params = init_params(model, k_params)
    momentum = jax.tree_util.tree_map(jnp.copy, momentum_subset(params))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "momentum": momentum,
        "opt_state": optimizer.init(params),
        "queues": init_queues(k_queue, queue_size, model.config.embed_dim),
    }


def clamp_temperature(params: dict, lo: float, hi: float) -> dict:
    out = dict(params)
    out["temp"] = jnp.clip(params["temp"], lo, hi)
    return out


QUEUE_MASK = -1e4  # added to the logits of queue columns that are switched off (not -inf: 0 * -inf)


def make_train_step(model: FashionFINE, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
                    steps_per_epoch: int, schedule: Callable | None = None,
                    total_steps: int | None = None):
    """Builds the pure stage-1 step. ``steps_per_epoch`` drives the alpha ramp.

    ``total_steps``, when given and covered entirely by the from-scratch warm-up, lets the step
    skip the momentum forward: during the warm-up the momentum coefficient is 0, so the momentum
    towers hold the online weights and their features equal the online global features (exactly
    so without dropout; with dropout the momentum BERT would draw its own mask). Nothing else
    changes, and the momentum copies and queues are still kept up to date.
    """
    M = FashionFINE
    online_keys = (loss_cfg.scratch_warmup_steps > 0 and total_steps is not None
                   and loss_cfg.scratch_warmup_steps >= total_steps)

    def apply(p, method, *args, rng=None, **kwargs):
        rngs = {"dropout": rng} if rng is not None else None
        return model.apply({"params": p}, *args, method=method, rngs=rngs, **kwargs)

    def loss_fn(params, momentum, queues, batch, rng, alpha, queue_on):
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        idx = batch["idx"]
        b = ids.shape[0]
        r_txt, r_txt_m, r_fuse, r_neg = jax.random.split(rng, 4)

        # Online unimodal features (on the corrupted stage-1 text, as in the reference).
        img = apply(params, M.encode_image, images)
        txt = apply(params, M.encode_text, ids, mask, deterministic=False, rng=r_txt)
        g_v, z_v, _ = apply(params, M.image_features, img)
        g_t, z_t, _ = apply(params, M.text_features, txt, mask)

        if online_keys:  # warm-up for the whole run: momentum == online (see the docstring)
            g_v_m, g_t_m = jax.lax.stop_gradient(g_v), jax.lax.stop_gradient(g_t)
        else:
            # Momentum features: global CLS only, no MAA; the momentum BERT runs with dropout (B15).
            mparams = {**params, **momentum}
            img_m = apply(mparams, M.encode_image, images)
            txt_m = apply(mparams, M.encode_text, ids, mask, deterministic=False, rng=r_txt_m)
            g_v_m = jax.lax.stop_gradient(apply(mparams, M.image_global, img_m))
            g_t_m = jax.lax.stop_gradient(apply(mparams, M.text_global, txt_m))

        # Focal ITC with distillation against [local batch; queue] keys and product-id targets.
        temp = params["temp"]
        keys_t = jnp.concatenate([g_t_m, queues["text"].astype(g_t_m.dtype)], axis=0)
        keys_v = jnp.concatenate([g_v_m, queues["image"].astype(g_v_m.dtype)], axis=0)
        f32 = lambda x: x.astype(jnp.float32)
        q_keys_t, q_keys_v = keys_t, keys_v  # the keys the online features are scored against
        if loss_cfg.scratch_warmup_steps > 0 and loss_cfg.scratch_warmup_maa_keys:
            n = g_t_m.shape[0]
            q_keys_t = keys_t.at[:n].set(jnp.where(queue_on, g_t_m, z_t.astype(g_t_m.dtype)))
            q_keys_v = keys_v.at[:n].set(jnp.where(queue_on, g_v_m, z_v.astype(g_v_m.dtype)))
        sim_i2t = f32(z_v) @ f32(q_keys_t).T / temp
        sim_t2i = f32(z_t) @ f32(q_keys_v).T / temp
        sim_i2t_m = f32(g_v_m) @ f32(keys_t).T / temp
        sim_t2i_m = f32(g_t_m) @ f32(keys_v).T / temp
        queue_idx = queues["idx"]
        if loss_cfg.scratch_warmup_steps > 0 and not loss_cfg.scratch_warmup_queue:
            off = jnp.concatenate([jnp.zeros((b,)), jnp.full(queue_idx.shape, QUEUE_MASK)])
            off = jnp.where(queue_on, 0.0, off)[None, :]
            sim_i2t, sim_t2i = sim_i2t + off, sim_t2i + off
            sim_i2t_m, sim_t2i_m = sim_i2t_m + off, sim_t2i_m + off
            queue_idx = jnp.where(queue_on, queue_idx, jnp.iinfo(jnp.int32).min)
        targets = obj.idx_targets(idx, jnp.concatenate([idx, queue_idx]))
        loss_itc, (loss_i2t, loss_t2i) = obj.focal_itc_loss(
            sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets, alpha, loss_cfg.alpha_focal,
            loss_cfg.gamma_focal)

        # Symbol similarity against the MAA-integrated image feature.
        sym = apply(params, M.symbol_feature, txt, mask)
        loss_sym = obj.symbol_loss(sym, z_v)

        # ITM: positives, then one hard negative image per text and one hard negative text per image.
        exclude = (idx[:, None] == idx[None, :]) if loss_cfg.itm_exclude_same_product else None
        neg_img, neg_txt = obj.sample_hard_negatives(r_neg, sim_i2t[:, :b], sim_t2i[:, :b], exclude)
        txt_all = jnp.concatenate([txt, txt, txt[neg_txt]], axis=0)
        mask_all = jnp.concatenate([mask, mask, mask[neg_txt]], axis=0)
        img_all = jnp.concatenate([img, img[neg_img], img], axis=0)
        fused = apply(params, M.fuse, txt_all, mask_all, img_all, deterministic=False, rng=r_fuse)
        loss_itm = obj.itm_loss(apply(params, M.itm_logits, fused), b)

        # MLM and replaced-token prediction on the positive fusion.
        pos = fused[:b]
        loss_mlm = obj.mlm_loss(apply(params, M.mlm_logits, pos), batch["mask_labels"])
        loss_rtp = obj.rtp_loss(apply(params, M.rtp_logits, pos), batch["replace_labels"])

        c = loss_cfg
        w_sym = jnp.where(queue_on, c.w_sym, 0.0) if c.scratch_warmup_steps > 0 else c.w_sym
        total = (c.w_itc * loss_itc + c.w_itm * loss_itm + w_sym * loss_sym + c.w_mlm * loss_mlm
                 + c.w_rtp * loss_rtp)
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                   "loss_itm": loss_itm, "loss_sym": loss_sym, "loss_mlm": loss_mlm,
                   "loss_rtp": loss_rtp}
        return total, (metrics, g_v_m, g_t_m)

    def train_step(state, batch, rng):
        params = clamp_temperature(state["params"], loss_cfg.temp_min, loss_cfg.temp_max)
        # queue_on is False only during the from-scratch warm-up (see LossConfig).
        queue_on = state["step"] >= loss_cfg.scratch_warmup_steps
        m = loss_cfg.momentum
        alpha = obj.distill_alpha(state["step"], steps_per_epoch, loss_cfg.alpha, loss_cfg.alpha_warmup)
        if loss_cfg.scratch_warmup_steps > 0:
            m = jnp.where(queue_on, m, 0.0)
            alpha = jnp.where(queue_on, alpha, 0.0)
        momentum = ema_update(state["momentum"], params, m)
        grads, (metrics, g_v_m, g_t_m) = jax.grad(loss_fn, has_aux=True)(
            params, momentum, state["queues"], batch, rng, alpha, queue_on)
        # Enqueue after the loss: the loss above saw the pre-step queue.
        queues = enqueue(state["queues"], g_v_m, g_t_m, batch["idx"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = dict(metrics, temp=params["temp"], alpha=alpha,
                       grad_norm=optax.global_norm(grads))
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        new_state = {"step": state["step"] + 1, "params": new_params, "momentum": momentum,
                     "opt_state": opt_state, "queues": queues}
        return new_state, metrics

    return train_step
