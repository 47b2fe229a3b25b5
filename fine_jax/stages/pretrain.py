"""Stage 1: Fashion-FINE pre-training on FashionGen (method_spec §3.1, §3.2, §4, §5.1).

    L = L_itc(focal, product-id targets) + L_itm + L_sym + L_mlm + L_rtp

The step follows the reference's order exactly: clamp tau (written back into the params),
EMA-update the momentum modules with the pre-step online weights, momentum forward (global CLS
features only), focal ITC against [local batch; queue] with distillation, symbol loss, ITM with
in-batch hard negatives, MLM and RTP on the positive fusion, enqueue the momentum features and
product ids, then the AdamW update. All on the corrupted stage-1 text, as in the reference.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fine_jax import objectives as obj
from fine_jax import parallel
from fine_jax.models.fine import FashionFINE
from fine_jax.momentum import ema_update, enqueue, init_queues
from fine_jax.objectives import LossConfig
from fine_jax.stages import common

NAME = "pretrain"
LOG_TERMS = ("loss", "loss_itc", "loss_itm", "loss_sym", "loss_mlm", "loss_rtp")


def make_queues(loss_cfg: LossConfig, embed_dim: int):
    """image (Q, E), text (Q, E), idx (Q,) = -100, ptr."""
    return lambda rng: init_queues(rng, loss_cfg.queue_size, embed_dim, with_idx=True)


def make_step(model: FashionFINE, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
              steps_per_epoch: int, schedule: Callable | None = None,
              total_steps: int | None = None, deterministic: bool = False,
              groups: parallel.Groups | None = None):
    """The pure stage-1 step ``(state, batch, rng) -> (state, metrics)``.

    ``groups`` says how the loss is split over the devices (``fine_jax.parallel.grads``): per
    device as the reference does per GPU (the default in training), or over the global batch.

    ``steps_per_epoch`` drives the alpha ramp. ``deterministic`` turns every dropout off (the
    reference trains with BERT dropout 0.1, online and momentum). A batch may carry
    ``neg_image`` / ``neg_text`` (B,) indices to use instead of drawing the ITM hard negatives.

    During the from-scratch warm-up the step skips the momentum forward: the momentum coefficient
    is 0, so the momentum towers hold the online weights and their features equal the online
    global features (exactly so without dropout; with dropout the momentum BERT would draw its
    own mask). Nothing else changes, and the momentum copies and queues are still kept up to
    date. ``total_steps``, when given and covered entirely by the warm-up, leaves the momentum
    forward out of the compiled step altogether; otherwise a conditional picks it per step.
    """
    M = FashionFINE
    apply = common.make_apply(model)
    c = loss_cfg
    warmup = c.scratch_warmup_steps > 0
    online_keys = warmup and total_steps is not None and c.scratch_warmup_steps >= total_steps

    def loss_fn(params, momentum, queues, batch, rng, alpha, queue_on):
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        corrupted = ids
        if c.clean_itc_itm_text:  # B5 fix: everything but MLM / RTP reads the clean text
            ids = batch["clean_ids"]
        idx = batch["idx"]
        b = ids.shape[0]
        r_txt, r_txt_m, r_fuse, r_neg = jax.random.split(rng, 4)
        r_mlm_txt, r_mlm_fuse = jax.random.split(r_txt)
        if deterministic:
            r_txt = r_txt_m = r_fuse = r_mlm_txt = r_mlm_fuse = None

        # Online unimodal features (on the corrupted stage-1 text, as in the reference).
        img = apply(params, M.encode_image, images)
        txt = apply(params, M.encode_text, ids, mask, deterministic=r_txt is None, rng=r_txt)
        g_v, z_v, _ = apply(params, M.image_features, img)
        g_t, z_t, _ = apply(params, M.text_features, txt, mask)

        def online_global():
            return jax.lax.stop_gradient(g_v), jax.lax.stop_gradient(g_t)

        def momentum_global():
            # Global CLS only, no MAA; the momentum BERT runs with dropout (B15).
            return common.momentum_global_features(apply, params, momentum, images, ids, mask,
                                                   r_txt_m)

        if online_keys:  # warm-up for the whole run: momentum == online (see the docstring)
            g_v_m, g_t_m = online_global()
        elif warmup:  # the same shortcut for the warm-up steps only
            g_v_m, g_t_m = jax.lax.cond(queue_on, momentum_global, online_global)
        else:
            g_v_m, g_t_m = momentum_global()

        # Focal ITC with distillation against [local batch; queue] keys and product-id targets.
        temp = params["temp"]
        q_t, q_v = g_t_m, g_v_m  # the in-batch keys the online features are scored against
        if warmup and c.scratch_warmup_maa_keys:
            q_t = jnp.where(queue_on, g_t_m, z_t.astype(g_t_m.dtype))
            q_v = jnp.where(queue_on, g_v_m, z_v.astype(g_v_m.dtype))
        sim_i2t = common.sims_against_bank(z_v, q_t, queues["text"], temp)
        sim_t2i = common.sims_against_bank(z_t, q_v, queues["image"], temp)
        sim_i2t_m = common.sims_against_bank(g_v_m, g_t_m, queues["text"], temp)
        sim_t2i_m = common.sims_against_bank(g_t_m, g_v_m, queues["image"], temp)
        queue_idx = queues["idx"]
        if warmup and not c.scratch_warmup_queue:
            off = jnp.concatenate([jnp.zeros((b,)), jnp.full(queue_idx.shape, common.QUEUE_MASK)])
            off = jnp.where(queue_on, 0.0, off)[None, :]
            sim_i2t, sim_t2i = sim_i2t + off, sim_t2i + off
            sim_i2t_m, sim_t2i_m = sim_i2t_m + off, sim_t2i_m + off
            queue_idx = jnp.where(queue_on, queue_idx, jnp.iinfo(jnp.int32).min)
        targets = obj.idx_targets(idx, jnp.concatenate([idx, queue_idx]))
        loss_itc, (loss_i2t, loss_t2i) = obj.focal_itc_loss(
            sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets, alpha, c.alpha_focal, c.gamma_focal)

        # Symbol similarity against the MAA-integrated image feature.
        sym = apply(params, M.symbol_feature, txt, mask)
        loss_sym = obj.symbol_loss(sym, z_v)

        # ITM: positives, then one hard negative image per text and one hard negative text per image.
        exclude = common.itm_exclusions(batch, c)
        loss_itm, pos, _ = common.itm_loss_with_hard_negatives(
            apply, params, txt, mask, img, sim_i2t[:, :b], sim_t2i[:, :b], r_neg, exclude,
            batch.get("neg_image"), batch.get("neg_text"), fuse_rng=r_fuse,
            hard=c.itm_negatives == "hard" and (
                queue_on if warmup and c.scratch_warmup_random_negatives else True))

        # MLM and replaced-token prediction on the positive fusion (B5 fix: on a fusion pass of
        # the corrupted text of its own).
        if c.clean_itc_itm_text:
            txt_c = apply(params, M.encode_text, corrupted, mask, deterministic=r_mlm_txt is None,
                          rng=r_mlm_txt)
            pos = apply(params, M.fuse, txt_c, mask, img, deterministic=r_mlm_fuse is None,
                        rng=r_mlm_fuse)
        if c.mlm_gather:
            rows = obj.mlm_buffer_rows(b, ids.shape[1], c.mlm_max_fraction)
            loss_mlm = obj.gathered_mlm_loss(lambda x: apply(params, M.mlm_logits, x), pos,
                                             batch["mask_labels"], rows,
                                             fallback=c.mlm_overflow != "host")
        else:
            loss_mlm = obj.mlm_loss(apply(params, M.mlm_logits, pos), batch["mask_labels"])
        loss_rtp = obj.rtp_loss(apply(params, M.rtp_logits, pos), batch["replace_labels"])

        w_sym = jnp.where(queue_on, c.w_sym, 0.0) if warmup else c.w_sym
        total = (c.w_itc * loss_itc + c.w_itm * loss_itm + w_sym * loss_sym + c.w_mlm * loss_mlm
                 + c.w_rtp * loss_rtp)
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                   "loss_itm": loss_itm, "loss_sym": loss_sym, "loss_mlm": loss_mlm,
                   "loss_rtp": loss_rtp}
        return total, (metrics, (g_v_m, g_t_m))

    def train_step(state, batch, rng):
        params = common.clamp_temperature(state["params"], c.temp_min, c.temp_max)
        # queue_on is False only during the from-scratch warm-up (see LossConfig).
        queue_on = state["step"] >= c.scratch_warmup_steps
        m = c.momentum
        # After a from-scratch warm-up, distillation starts as in a fresh reference run: alpha
        # ramps up over the epoch that follows the warm-up.
        alpha = obj.distill_alpha(state["step"] - (c.scratch_warmup_steps if warmup else 0),
                                  steps_per_epoch, c.alpha, c.alpha_warmup)
        if warmup:
            m = jnp.where(queue_on, m, 0.0)
            alpha = jnp.where(queue_on, alpha, 0.0)
        momentum = ema_update(state["momentum"], params, m)
        grads, metrics, (g_v_m, g_t_m) = parallel.grads(
            loss_fn, groups, params, momentum, state["queues"], batch, rng, alpha, queue_on)
        finite = common.step_is_finite(metrics["loss"], grads)
        # Enqueue after the loss: the loss above saw the pre-step queue.
        queues = enqueue(state["queues"], g_v_m, g_t_m, batch["idx"], keep=finite)
        return common.finish_step(state, params, momentum, queues, grads, optimizer, metrics,
                                  alpha, schedule, finite)

    return train_step
