"""Loss functions of Fashion-FINE as pure functions on arrays (method_spec §3, §4).

Each takes plain arrays and returns a scalar loss (fp32); none of them touches parameters, so each
is tested directly against a NumPy transcription of its formula.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

IGNORE_LABEL = -100


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective's settings with the reference values as defaults (method_spec §3-§5,
    §8.1); the one source of the ``loss`` config block's defaults."""

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
    # The embedded set only: also exclude the products of the positive's twin group (which
    # differ from it in one local detail) from ITM negative sampling, so that with twin-grouped
    # batches the hard negatives are drawn from the rest of the batch. Implies
    # itm_exclude_same_product. Off = reference.
    itm_exclude_twins: bool = False
    # method_spec §10 B5 (stage 1): ITC, the symbol loss and ITM read the uncorrupted text, and
    # MLM / RTP run their own fusion pass on the corrupted text, as ALBEF does (one more text
    # forward and one more fusion pass per pair). Off = reference (all on the corrupted text).
    clean_itc_itm_text: bool = False
    # ITM negatives: "hard" draws each negative from the softmax of the online similarities
    # (HNM, the reference); "random" draws it uniformly from the other items of the local batch
    # (the ablation of hard-negative mining). Both honour the two exclusions above.
    itm_negatives: str = "hard"
    # method_spec §10 B3 (stage 2): keep product ids in an idx queue and use product-id ITC
    # targets, as stage 1 does, so an older copy of the same product is not a negative.
    # Off = reference (diagonal targets, no idx queue).
    retrieval_idx_queue: bool = False
    # method_spec §10 B7 (stage 3): the momentum query feature uses the momentum
    # combine_text_proj. Off = reference (the online one).
    tgir_momentum_head_fix: bool = False
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
    # During that warm-up, draw the ITM negatives uniformly from the batch instead of by
    # similarity. A random fusion encoder cannot tell a hard negative (by then the ITC ranks the
    # batch well) from the positive, so the ITM loss never leaves its chance value; uniform
    # negatives differ in category or colour, which a fusion encoder learns to reject first.
    scratch_warmup_random_negatives: bool = False
    # Run the MLM head (its 30,522-word decoder is most of a small model's step) only on the
    # positions that carry an MLM target: they are gathered into a static buffer of
    # ceil(mlm_max_fraction x local batch x text length) rows. The loss is the same as on every
    # position; a batch with more targets than the buffer holds takes the full computation (both
    # are compiled, a conditional picks one). Off: every position, as the reference.
    mlm_gather: bool = True
    mlm_max_fraction: float = 0.25
    # Where a batch that overflows the gathered buffer is caught. "host": the step holds the
    # gathered head only, and the trainer counts each batch's targets on the host and runs a batch
    # that overflows with a second, every-position step (compiled when first needed); a step
    # handed an overflowing batch by anything else returns a NaN loss (so the non-finite guard
    # skips it) rather than a truncated one. "step": inside the compiled step (the conditional
    # above), which costs the tiny CPU step about 5-6 % even when never taken (it splits the
    # backward pass). The loss is the same either way, rounded differently. A multi-process job
    # uses "step" (every process would have to agree on the step of every batch).
    mlm_overflow: str = "host"


def idx_targets(idx: jax.Array, idx_all: jax.Array) -> jax.Array:
    """Stage-1 ground truth: y_bj = 1[idx_b == idx_all_j] / sum_j' 1[idx_b == idx_all_j'].

    idx (B,), idx_all (B + Q,) -> (B, B + Q). Every item of the same product, in the batch or in the
    queue, is a positive (method_spec §3.1).
    """
    pos = (idx[:, None] == idx_all[None, :]).astype(jnp.float32)
    return pos / pos.sum(axis=1, keepdims=True)


def diagonal_targets(batch: int, columns: int) -> jax.Array:
    """Stage-2 ground truth: one-hot on column b of B + Q columns."""
    return jax.nn.one_hot(jnp.arange(batch), columns, dtype=jnp.float32)


def focal_soft_cross_entropy(logits: jax.Array, targets: jax.Array, alpha_focal: float,
                             gamma: float) -> jax.Array:
    """-(1/B) sum_b sum_j alpha_f (1 - p_bj)^gamma y_bj log p_bj, with p = softmax(logits).

    The focal factor is not detached: gradients flow through it, as in the reference.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    per_row = -(alpha_focal * (1.0 - p) ** gamma * targets * logp).sum(axis=-1)
    return per_row.mean()


def distilled_targets(momentum_logits: jax.Array, ground_truth: jax.Array, alpha) -> jax.Array:
    """y = alpha * softmax(s_m) + (1 - alpha) * y_gt, with no gradient through the momentum part."""
    soft = jax.nn.softmax(jax.lax.stop_gradient(momentum_logits).astype(jnp.float32), axis=-1)
    return alpha * soft + (1.0 - alpha) * ground_truth


def focal_itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, ground_truth, alpha, alpha_focal: float,
                   gamma: float):
    """Focal ITC with momentum distillation (method_spec §3.1). All sims already divided by tau.

    Returns (loss, (loss_i2t, loss_t2i)); loss = (L_i2t + L_t2i) / 2.
    """
    y_i2t = distilled_targets(sim_i2t_m, ground_truth, alpha)
    y_t2i = distilled_targets(sim_t2i_m, ground_truth, alpha)
    l_i2t = focal_soft_cross_entropy(sim_i2t, y_i2t, alpha_focal, gamma)
    l_t2i = focal_soft_cross_entropy(sim_t2i, y_t2i, alpha_focal, gamma)
    return (l_i2t + l_t2i) / 2.0, (l_i2t, l_t2i)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-(1/B) sum_b sum_j y_bj log softmax(logits)_bj (the TGIR / plain ITC loss)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(targets * logp).sum(axis=-1).mean()


def hard_negative_logits(sim: jax.Array, exclude: jax.Array | None = None,
                         hard: bool = True) -> jax.Array:
    """Sampling logits for ITM negatives from a (B, B) similarity block.

    The reference sets the diagonal to -1000, softmaxes, then zeroes the diagonal; sampling from
    that is sampling from softmax over j != b, i.e. logits with the diagonal at -inf. ``exclude``
    (B, B) bool additionally removes pairs (same product, method_spec §10 B4 fix). ``hard=False``
    gives every allowed item the same logit: uniform random negatives.
    """
    b = sim.shape[0]
    drop = jnp.eye(b, dtype=bool)
    if exclude is not None:
        drop = drop | exclude
    # ``hard`` may be traced (the from-scratch warm-up switches it on at a step).
    scores = jnp.where(hard, jax.lax.stop_gradient(sim).astype(jnp.float32), 0.0)
    logits = jnp.where(drop, -jnp.inf, scores)
    # A row with nothing left to draw (every other item is the same product) falls back to
    # "any other item", so sampling stays defined.
    empty = jnp.all(drop, axis=1, keepdims=True)
    fallback = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, 0.0)
    return jnp.where(empty, fallback, logits)


def sample_hard_negatives(rng: jax.Array, sim_i2t: jax.Array, sim_t2i: jax.Array,
                          exclude: jax.Array | None = None, hard: bool = True):
    """One negative per sample from the local batch (method_spec §3.2).

    sim_i2t / sim_t2i: (B, B) online similarities (first B columns). Returns
    (neg_image_for_text (B,), neg_text_for_image (B,)) indices. ``hard=False``: uniform draws.
    """
    k_img, k_txt = jax.random.split(rng)
    neg_image = jax.random.categorical(k_img, hard_negative_logits(sim_t2i, exclude, hard), axis=-1)
    neg_text = jax.random.categorical(k_txt, hard_negative_logits(sim_i2t, exclude, hard), axis=-1)
    return neg_image, neg_text


def itm_loss(itm_logits: jax.Array, batch: int) -> jax.Array:
    """Cross-entropy over 3B pairs: B positives (label 1) then 2B negatives (label 0)."""
    labels = jnp.concatenate([jnp.ones((batch,), jnp.int32), jnp.zeros((2 * batch,), jnp.int32)])
    logp = jax.nn.log_softmax(itm_logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()


def symbol_loss(symbol_feature: jax.Array, image_feature: jax.Array) -> jax.Array:
    """mean_b (1 - cos(s_b, z_v,b)) / 2; both inputs are unit vectors (method_spec §4.3)."""
    cos = (symbol_feature.astype(jnp.float32) * image_feature.astype(jnp.float32)).sum(-1)
    return (1.0 - (1.0 + cos) / 2.0).mean()


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE_LABEL):
    """Token cross-entropy averaged over labelled positions (PyTorch ignore_index semantics).

    With no labelled position at all PyTorch returns NaN; this returns 0 so that a batch without
    targets does not poison training.
    """
    valid = labels != ignore
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return jnp.where(count > 0, (nll * valid).sum() / jnp.maximum(count, 1), 0.0)


def mlm_loss(mlm_logits: jax.Array, mask_labels: jax.Array) -> jax.Array:
    return masked_cross_entropy(mlm_logits, mask_labels)


def mlm_buffer_rows(batch: int, length: int, fraction: float) -> int:
    """Rows of the gathered MLM buffer for a (batch, length) text batch."""
    return max(1, min(batch * length, math.ceil(fraction * batch * length)))


MLM_OVERFLOW = ("step", "host")


def mlm_batch_fits(mask_labels, group_batch: int, rows: int) -> bool:
    """Host check for ``loss.mlm_overflow="host"``: True when every group of ``group_batch``
    consecutive examples of ``mask_labels`` (a NumPy (B, L) array) has at most ``rows`` MLM
    targets, so that the gathered head computes the whole loss."""
    import numpy as np

    labels = np.asarray(mask_labels)
    counts = (labels != IGNORE_LABEL).reshape(-1, group_batch * labels.shape[1]).sum(axis=1)
    return bool((counts <= rows).all())


def gathered_mlm_loss(head: Callable[[jax.Array], jax.Array], states: jax.Array,
                      mask_labels: jax.Array, rows: int, fallback: bool = True) -> jax.Array:
    """:func:`mlm_loss` of ``head(states)`` with the head run on the labelled positions only.

    states (B, L, D), mask_labels (B, L); ``head`` maps (..., D) -> (..., V) position by position.
    The labelled positions are gathered (in order) into ``rows`` rows; unused rows are padded with
    position 0 and an ignored label. When a batch has more labelled positions than ``rows``, the
    head runs on every position instead, so the loss is always the full computation's.
    ``fallback=False`` leaves that branch out: the caller checks that the targets fit
    (:func:`mlm_batch_fits`); a batch that does not gets a NaN loss, never a truncated one.
    """
    flat_states = states.reshape(-1, states.shape[-1])
    flat_labels = mask_labels.reshape(-1)
    valid = flat_labels != IGNORE_LABEL
    count = valid.sum()

    def gathered():
        (pick,) = jnp.nonzero(valid, size=rows, fill_value=0)
        labels = jnp.where(jnp.arange(rows) < count, flat_labels[pick], IGNORE_LABEL)
        return masked_cross_entropy(head(flat_states[pick]), labels)

    def every_position():
        return masked_cross_entropy(head(flat_states), flat_labels)

    if rows >= flat_labels.shape[0]:
        return every_position()
    if not fallback:
        return jnp.where(count <= rows, gathered(), jnp.nan)
    # The fallback is rematerialised: differentiating a conditional keeps the residuals of both
    # branches, and this branch's (B*L, V) logits would otherwise be zero-filled and carried
    # through every step that never takes it (measured: a (B*L, V) memset and copy per step).
    return jax.lax.cond(count <= rows, gathered, jax.checkpoint(every_position))


def rtp_loss(rtp_logits: jax.Array, replace_labels: jax.Array) -> jax.Array:
    """Replaced-token prediction over all B x L positions, padding included (method_spec §10 B9)."""
    logp = jax.nn.log_softmax(rtp_logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, replace_labels[..., None].astype(jnp.int32), axis=-1).mean()


def distill_alpha(step: jax.Array, steps_per_epoch: int, alpha: float, warm_up: bool = True):
    """alpha_i = alpha * min(1, i / iters_per_epoch) in epoch 0, then alpha (method_spec §3.1)."""
    if not warm_up:
        return jnp.asarray(alpha, jnp.float32)
    in_epoch0 = step < steps_per_epoch
    ramp = alpha * jnp.minimum(1.0, step.astype(jnp.float32) / steps_per_epoch)
    return jnp.where(in_epoch0, ramp, alpha).astype(jnp.float32)
