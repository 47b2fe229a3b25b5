"""What the three stages' training steps share: the train state, the temperature clamp, model
calls, the contrastive logits against [batch; queue], and ITM with in-batch hard negatives.

A train state is a plain dict pytree:

* ``step``      int32 scalar, optimiser updates done so far
* ``params``    online parameters (the modules of the stage's model variant)
* ``momentum``  EMA copies of the six modules of ``MOMENTUM_MODULES`` (method_spec §1.6)
* ``opt_state`` AdamW state
* ``queues``    the stage's feature queues and pointers (method_spec §1.7)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fine_jax import objectives as obj
from fine_jax.models.fine import FashionFINE, init_params, momentum_subset

# Added to the logits of queue columns that are switched off (not -inf: 0 * -inf is NaN).
QUEUE_MASK = -1e4


def create_state(model: FashionFINE, optimizer: optax.GradientTransformation, rng: jax.Array,
                 init_queues) -> dict:
    """Fresh state: random online params, momentum = copy of the six online modules, and the
    queues ``init_queues(rng)`` returns."""
    k_params, k_queue = jax.random.split(rng)
    params = init_params(model, k_params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "momentum": jax.tree_util.tree_map(jnp.copy, momentum_subset(params)),
        "opt_state": optimizer.init(params),
        "queues": init_queues(k_queue),
    }


def clamp_temperature(params: dict, lo: float, hi: float) -> dict:
    """The reference clamps tau in place at the start of every forward (method_spec §1.8)."""
    out = dict(params)
    out["temp"] = jnp.clip(params["temp"], lo, hi)
    return out


def make_apply(model: FashionFINE):
    """``apply(params, method, *args, rng=None, **kw)``: dropout runs only when ``rng`` is given."""

    def apply(p, method, *args, rng=None, **kwargs):
        rngs = {"dropout": rng} if rng is not None else None
        return model.apply({"params": p}, *args, method=method, rngs=rngs, **kwargs)

    return apply


def f32(x):
    return x.astype(jnp.float32)


def sims_against_bank(query: jax.Array, local_keys: jax.Array, queue: jax.Array, temp):
    """(B, E) queries against [local keys (B'); queue (Q)] -> (B, B' + Q) fp32 logits / tau.

    The reference concatenates the keys, a (B' + Q, E) copy of the whole queue every step. Here
    the queue (stored fp32, never cast) is multiplied in place and only the (B, B' + Q) logits
    are joined: the same numbers, without copying the queue.
    """
    q = f32(query)
    local = q @ f32(local_keys).T
    bank = q @ (queue if queue.dtype == jnp.float32 else f32(queue)).T
    return jnp.concatenate([local, bank], axis=1) / temp


def itm_exclusions(batch, loss_cfg) -> jax.Array | None:
    """(B, B) pairs left out of ITM negative sampling, or None (the reference: only the diagonal).

    ``itm_exclude_same_product`` (method_spec §10 B4 fix) leaves out the other images of the
    positive's product; ``itm_exclude_twins`` (embedded set) leaves out every product of its twin
    group as well, from the batch's ``twin_group`` ids.
    """
    if loss_cfg.itm_exclude_twins:
        if "twin_group" not in batch:
            raise ValueError("loss.itm_exclude_twins needs the batch's twin_group ids, which the "
                             "embedded set's pipelines add (data.source='synthetic')")
        g = batch["twin_group"]
        return g[:, None] == g[None, :]
    if loss_cfg.itm_exclude_same_product:
        idx = batch["idx"]
        return idx[:, None] == idx[None, :]
    return None


def itm_loss_with_hard_negatives(apply, params, txt, mask, img, sim_i2t_b, sim_t2i_b, rng,
                                 exclude=None, neg_image=None, neg_text=None, fuse_rng=None,
                                 hard: bool = True):
    """ITM over 3B pairs with one hard negative image per text and one hard negative text per
    image, drawn from the local batch (method_spec §3.2).

    ``sim_i2t_b`` / ``sim_t2i_b`` are the first B columns of the online similarity matrices.
    ``neg_image`` / ``neg_text`` (B,) replace the draw when given (to compare with the reference
    number for number). Pair order: (text_b, image_b) x B, (text_b, neg image) x B,
    (neg text, image_b) x B; labels 1 for the first B, 0 for the rest.

    Returns (loss, fused states of the positive pairs (B, L, D), (neg_image, neg_text)).
    """
    b = txt.shape[0]
    if neg_image is None or neg_text is None:
        drawn_img, drawn_txt = obj.sample_hard_negatives(rng, sim_i2t_b, sim_t2i_b, exclude,
                                                             hard)
        neg_image = drawn_img if neg_image is None else neg_image
        neg_text = drawn_txt if neg_text is None else neg_text
    txt_all = jnp.concatenate([txt, txt, txt[neg_text]], axis=0)
    mask_all = jnp.concatenate([mask, mask, mask[neg_text]], axis=0)
    img_all = jnp.concatenate([img, img[neg_image], img], axis=0)
    fused = apply(params, FashionFINE.fuse, txt_all, mask_all, img_all,
                  deterministic=fuse_rng is None, rng=fuse_rng)
    loss = obj.itm_loss(apply(params, FashionFINE.itm_logits, fused), b)
    return loss, fused[:b], (neg_image, neg_text)


def momentum_global_features(apply, params, momentum, images, ids, mask, rng=None):
    """g^m_v, g^m_t: the momentum towers' global CLS features, no MAA, no gradient (method_spec
    §1.6); the momentum BERT draws its own dropout mask when ``rng`` is given (B15)."""
    mparams = {**params, **momentum}
    img_m = apply(mparams, FashionFINE.encode_image, images)
    txt_m = apply(mparams, FashionFINE.encode_text, ids, mask, deterministic=rng is None, rng=rng)
    return (jax.lax.stop_gradient(apply(mparams, FashionFINE.image_global, img_m)),
            jax.lax.stop_gradient(apply(mparams, FashionFINE.text_global, txt_m)))


def step_is_finite(loss, grads) -> jax.Array:
    """True when the loss and every gradient are finite: the step may change the state.

    Read from the global gradient norm, which the step computes anyway for its metrics (the
    same expression in :func:`finish_step`, merged by XLA): a NaN or an infinity in any gradient
    makes it non-finite, so no separate pass over the gradients is needed (a per-leaf check cost
    about 300 extra kernels in the tiny step). It also treats a gradient whose norm overflows
    float32 (above about 1.8e19) as non-finite, which only ever happens in a diverged run.
    """
    return jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))


def finish_step(state: dict, params, momentum, queues, grads, optimizer, metrics: dict, alpha,
                schedule, finite):
    """The AdamW update after the loss and the enqueue; returns (new state, step metrics).

    ``finite`` is :func:`step_is_finite` of this step. A step whose loss or any gradient is not
    finite leaves the parameters and the optimiser moments as they were, the stages' enqueue
    writes nothing (``keep=finite``), and the metrics say ``nonfinite = 1`` (the trainer then
    stops or skips, ``train.on_nonfinite``). The momentum copies take their EMA step towards the
    unchanged parameters as in any step: finite, as both sides are. So no checkpoint can ever hold
    the NaNs of a diverged update.
    """

    def update():
        # Inside the branch, so that the AdamW update writes its results in place (computed
        # outside, the taken branch copies every updated array: measured 6 % of a tiny step).
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        return optax.apply_updates(params, updates), opt_state

    # A conditional, not an elementwise select per leaf: XLA would copy the whole chain of
    # per-leaf checks into every fused select (over 100,000 ops, most of the step's compile time).
    # The momentum copies and the queues stay out of it: passed through a conditional, the
    # updated and the previous copies would both have to live until it ran (0.84 GB more at the
    # reference size) and one of them be copied.
    new_params, opt_state = jax.lax.cond(finite, update,
                                         lambda: (state["params"], state["opt_state"]))
    new_state = {"params": new_params, "momentum": momentum, "opt_state": opt_state,
                 "queues": queues, "step": state["step"] + 1}
    out = dict(metrics, temp=params["temp"], alpha=alpha, grad_norm=optax.tree.norm(grads),
               nonfinite=1.0 - finite.astype(jnp.float32))
    if schedule is not None:
        out["lr"] = schedule(state["step"])
    return new_state, out
