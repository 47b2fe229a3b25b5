"""Stage 3: text-guided image retrieval on FashionIQ (method_spec §5.3).

The query is the fusion of the reference image with the modification text, through the *text*
projection: f = norm(Pt(fusion(text, ViT(reference))[:, 0])). The target is the global CLS feature
of the target image, t = norm(Pv(ViT(target)[:, 0])); no MAA, no ITM, no focal loss.

    s_f2i = f . [t_m; r_m; image_queue] / tau     (B x (2B + Q))
    s_i2f = t . [f_m; fusion_queue] / tau         (B x (B + Q))
    y = alpha softmax(momentum sims) + (1 - alpha) onehot(column b)
    L = (CE(s_i2f, y_i2f) + CE(s_f2i, y_f2i)) / 2

The batch's reference images are explicit negatives (r_m in the image bank, method_spec §10 B8).
The momentum query f_m runs the momentum ViT and momentum BERT (with dropout, B15) and, as in the
reference, the momentum ``text_proj`` followed by the *online* ``combine_text_proj`` (B7;
``loss.tgir_momentum_head_fix`` uses the momentum one). After the loss, [t_m; r_m] (2B rows per group, gathered group by
group in device order) go into the image queue and f_m into the fusion queue, each with its own pointer.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fine_jax import objectives as obj
from fine_jax import parallel
from fine_jax.models.adapter import l2_normalize
from fine_jax.models.fine import FashionFINE
from fine_jax.momentum import ema_update, enqueue_rows, init_tgir_queues
from fine_jax.objectives import LossConfig
from fine_jax.stages import common

NAME = "tgir"
LOG_TERMS = ("loss", "loss_f2i", "loss_i2f")


def make_queues(loss_cfg: LossConfig, embed_dim: int):
    return lambda rng: init_tgir_queues(rng, loss_cfg.queue_size, embed_dim)


def make_step(model: FashionFINE, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
              steps_per_epoch: int, schedule: Callable | None = None,
              total_steps: int | None = None, deterministic: bool = False,
              groups: parallel.Groups | None = None):
    """The pure stage-3 step ``(state, batch, rng) -> (state, metrics)``. The batch holds
    ``reference_image``, ``target_image``, ``input_ids`` and ``attention_mask``."""
    del total_steps
    M = FashionFINE
    apply = common.make_apply(model)
    c = loss_cfg

    def query(p, ref_states, ids, mask, r_txt, r_fuse, combine_params=None):
        """The query feature norm(Pt(fusion CLS)); ``combine_params`` swaps in another
        combine_text_proj (the reference's momentum query uses the online one, B7)."""
        txt = apply(p, M.encode_text, ids, mask, deterministic=r_txt is None, rng=r_txt)
        fused = apply(p, M.fuse, txt, mask, ref_states, deterministic=r_fuse is None, rng=r_fuse)
        head = p if combine_params is None else {**p, "combine_text_proj": combine_params}
        return l2_normalize(apply(head, M.project_text, fused[:, 0]))

    def loss_fn(params, momentum, queues, batch, rng, alpha):
        ref, tgt = batch["reference_image"], batch["target_image"]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        r_txt, r_fuse, r_txt_m, r_fuse_m = jax.random.split(rng, 4)
        if deterministic:
            r_txt = r_fuse = r_txt_m = r_fuse_m = None

        f = query(params, apply(params, M.encode_image, ref), ids, mask, r_txt, r_fuse)
        t = apply(params, M.image_global, apply(params, M.encode_image, tgt))

        mparams = {**params, **momentum}
        head = None if c.tgir_momentum_head_fix else params["combine_text_proj"]
        ref_m_states = apply(mparams, M.encode_image, ref)
        f_m = jax.lax.stop_gradient(query(mparams, ref_m_states, ids, mask, r_txt_m, r_fuse_m,
                                          combine_params=head))
        t_m = jax.lax.stop_gradient(
            apply(mparams, M.image_global, apply(mparams, M.encode_image, tgt)))
        r_m = jax.lax.stop_gradient(apply(mparams, M.image_global, ref_m_states))

        temp = params["temp"]
        image_keys = jnp.concatenate([t_m, r_m], axis=0)  # 2B local image keys
        sim_f2i = common.sims_against_bank(f, image_keys, queues["image"], temp)
        sim_i2f = common.sims_against_bank(t, f_m, queues["fusion"], temp)
        sim_f2i_m = common.sims_against_bank(f_m, image_keys, queues["image"], temp)
        sim_i2f_m = common.sims_against_bank(t_m, f_m, queues["fusion"], temp)
        y_f2i = obj.distilled_targets(sim_f2i_m, obj.diagonal_targets(b, sim_f2i.shape[1]), alpha)
        y_i2f = obj.distilled_targets(sim_i2f_m, obj.diagonal_targets(b, sim_i2f.shape[1]), alpha)
        loss_f2i = obj.soft_cross_entropy(sim_f2i, y_f2i)
        loss_i2f = obj.soft_cross_entropy(sim_i2f, y_i2f)
        total = c.w_itc * (loss_i2f + loss_f2i) / 2.0
        metrics = {"loss": total, "loss_f2i": loss_f2i, "loss_i2f": loss_i2f}
        return total, (metrics, (image_keys, f_m))

    def train_step(state, batch, rng):
        params = common.clamp_temperature(state["params"], c.temp_min, c.temp_max)
        alpha = obj.distill_alpha(state["step"], steps_per_epoch, c.alpha, c.alpha_warmup)
        momentum = ema_update(state["momentum"], params, c.momentum)
        grads, metrics, (image_keys, f_m) = parallel.grads(
            loss_fn, groups, params, momentum, state["queues"], batch, rng, alpha)
        q = state["queues"]
        finite = common.step_is_finite(metrics["loss"], grads)
        image, image_ptr = enqueue_rows(q["image"], q["image_ptr"], image_keys, keep=finite)
        fusion, fusion_ptr = enqueue_rows(q["fusion"], q["fusion_ptr"], f_m, keep=finite)
        queues = {"image": image, "image_ptr": image_ptr, "fusion": fusion,
                  "fusion_ptr": fusion_ptr}
        return common.finish_step(state, params, momentum, queues, grads, optimizer, metrics,
                                  alpha, schedule, finite)

    return train_step
