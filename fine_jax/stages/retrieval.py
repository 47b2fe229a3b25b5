"""Stage 2: cross-modal retrieval fine-tuning on FashionGen (method_spec §3.1, §3.3, §5.2).

    L = L_itc(focal, diagonal targets) + L_itm

The stage-1 step without the symbol, MLM and replaced-token losses, on the clean stage-2 text
("the image description is ...", no symbol, no [SEP]), one item per product with one random image
of it per epoch. The ITC targets are the diagonal of [local batch; queue] and there is no idx queue,
so an older feature of the same product in the queue counts as a negative (method_spec §10 B3;
``loss.retrieval_idx_queue`` switches to product-id targets with an idx queue).
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

NAME = "retrieval"
LOG_TERMS = ("loss", "loss_itc", "loss_itm")


def make_queues(loss_cfg: LossConfig, embed_dim: int):
    """image (Q, E), text (Q, E), ptr; and idx (Q,) only with ``loss.retrieval_idx_queue``."""
    return lambda rng: init_queues(rng, loss_cfg.queue_size, embed_dim,
                                   with_idx=loss_cfg.retrieval_idx_queue)


def make_step(model: FashionFINE, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
              steps_per_epoch: int, schedule: Callable | None = None,
              total_steps: int | None = None, deterministic: bool = False,
              groups: parallel.Groups | None = None):
    """The pure stage-2 step ``(state, batch, rng) -> (state, metrics)``; see the stage-1 step
    (``fine_jax.stages.pretrain.make_step``) for the arguments."""
    del total_steps  # stage 2 has no from-scratch warm-up
    M = FashionFINE
    apply = common.make_apply(model)
    c = loss_cfg

    def loss_fn(params, momentum, queues, batch, rng, alpha):
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        r_txt, r_txt_m, r_fuse, r_neg = jax.random.split(rng, 4)
        if deterministic:
            r_txt = r_txt_m = r_fuse = None

        img = apply(params, M.encode_image, images)
        txt = apply(params, M.encode_text, ids, mask, deterministic=r_txt is None, rng=r_txt)
        _, z_v, _ = apply(params, M.image_features, img)
        _, z_t, _ = apply(params, M.text_features, txt, mask)

        g_v_m, g_t_m = common.momentum_global_features(apply, params, momentum, images, ids, mask,
                                                       r_txt_m)

        temp = params["temp"]
        sim_i2t = common.sims_against_bank(z_v, g_t_m, queues["text"], temp)
        sim_t2i = common.sims_against_bank(z_t, g_v_m, queues["image"], temp)
        sim_i2t_m = common.sims_against_bank(g_v_m, g_t_m, queues["text"], temp)
        sim_t2i_m = common.sims_against_bank(g_t_m, g_v_m, queues["image"], temp)
        if "idx" in queues:  # B3 fix
            targets = obj.idx_targets(batch["idx"], jnp.concatenate([batch["idx"], queues["idx"]]))
        else:
            targets = obj.diagonal_targets(b, sim_i2t.shape[1])
        loss_itc, (loss_i2t, loss_t2i) = obj.focal_itc_loss(
            sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets, alpha, c.alpha_focal, c.gamma_focal)

        exclude = common.itm_exclusions(batch, c)
        loss_itm, _, _ = common.itm_loss_with_hard_negatives(
            apply, params, txt, mask, img, sim_i2t[:, :b], sim_t2i[:, :b], r_neg, exclude,
            batch.get("neg_image"), batch.get("neg_text"), fuse_rng=r_fuse,
            hard=c.itm_negatives == "hard")

        total = c.w_itc * loss_itc + c.w_itm * loss_itm
        metrics = {"loss": total, "loss_itc": loss_itc, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                   "loss_itm": loss_itm}
        return total, (metrics, (g_v_m, g_t_m))

    def train_step(state, batch, rng):
        params = common.clamp_temperature(state["params"], c.temp_min, c.temp_max)
        alpha = obj.distill_alpha(state["step"], steps_per_epoch, c.alpha, c.alpha_warmup)
        momentum = ema_update(state["momentum"], params, c.momentum)
        grads, metrics, (g_v_m, g_t_m) = parallel.grads(
            loss_fn, groups, params, momentum, state["queues"], batch, rng, alpha)
        idx = batch["idx"] if "idx" in state["queues"] else None
        finite = common.step_is_finite(metrics["loss"], grads)
        queues = enqueue(state["queues"], g_v_m, g_t_m, idx, keep=finite)
        return common.finish_step(state, params, momentum, queues, grads, optimizer, metrics,
                                  alpha, schedule, finite)

    return train_step
