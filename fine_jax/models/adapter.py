"""The modality-agnostic adapter (MAA, method_spec §2) and the n-gram phrase module (§4.2)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fine_jax.models.layers import dense, torch_default_bias, torch_default_kernel, trunc_normal

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """F.normalize semantics: x / max(||x||, eps)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=axis, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def mix_global_local(g: jax.Array, l: jax.Array, ratio: float) -> jax.Array:
    """z = norm((1 - ratio) * g + ratio * l) for already-normalised global g and local l."""
    return l2_normalize((1.0 - ratio) * g + ratio * l)


class AttentionPool(nn.Module):
    """e_i = w^T tanh(W_a h_i + b_a); a = softmax(e); l = sum_i a_i h_i.

    Shared by both modalities: one instance scores image patches and text tokens alike. Parameter
    names follow the reference (``att_layer_v``, ``W_v``).
    """

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None):
        """tokens (B, T, D); valid (B, T) 0/1 or None (no masking, the reference behaviour).

        Returns (pooled (B, D), weights (B, T)).
        """
        w = self.param("W_v", trunc_normal(0.02), (self.width, 1))
        h = dense(self.width, kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros,
                  dtype=self.dtype, name="att_layer_v")(tokens)
        scores = (jnp.tanh(h) @ w.astype(h.dtype))[..., 0].astype(jnp.float32)
        if valid is not None:
            scores = jnp.where(valid > 0, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1)
        # Broadcasting replaces the reference's expand(-1, -1, 768) (method_spec §10 B10).
        pooled = jnp.einsum("bt,btd->bd", weights.astype(tokens.dtype), tokens)
        return pooled, weights


class PhraseModule(nn.Module):
    """Dilated uni/bi/tri-gram convolutions, tanh, max over n-gram types, mean over positions.

    The bigram and trigram use dilation 2 with zero padding 1 and 2, so the output length equals the
    input length and the "bigram" at i mixes tokens i-1 and i+1 (method_spec §10 B14, reproduced).
    """

    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """tokens (B, T, D) -> (B, D). ``valid`` (B, T) restricts the mean to valid positions."""

        def conv(k, dilation, pad, name):
            fan_in = self.width * k
            return nn.Conv(self.width, (k,), kernel_dilation=(dilation,), padding=[(pad, pad)],
                           kernel_init=torch_default_kernel(), bias_init=torch_default_bias(fan_in),
                           dtype=self.dtype, name=name)

        uni = jnp.tanh(conv(1, 1, 0, "unigram_conv")(tokens))
        bi = jnp.tanh(conv(2, 2, 1, "bigram_conv")(tokens))
        tri = jnp.tanh(conv(3, 2, 2, "trigram_conv")(tokens))
        phrase = jnp.maximum(jnp.maximum(uni, bi), tri).astype(jnp.float32)
        if valid is None:
            return phrase.mean(axis=1).astype(tokens.dtype)
        valid = valid.astype(jnp.float32)[..., None]
        total = (phrase * valid).sum(axis=1)
        return (total / jnp.maximum(valid.sum(axis=1), 1.0)).astype(tokens.dtype)
