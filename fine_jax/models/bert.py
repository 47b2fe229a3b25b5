"""BERT split into text-mode and fusion-mode layers (ALBEF's xbert, method_spec §1.3).

Layers ``0 .. fusion_layer-1`` are plain post-LN BERT layers (self-attention + FFN). Layers
``fusion_layer .. num_layers-1`` add a cross-attention sub-block whose keys and values are the image
tokens. ``text()`` embeds token ids and runs the text layers; ``fusion()`` takes those text states
(it does not re-embed) and runs the fusion layers. Names follow the HF/xbert state_dict.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fine_jax.models.layers import (MASK_BIAS, attention_bias, dense, dot_product_attention, gelu,
                                    merge_heads, normal, scan_layers, split_heads)

Dtype = Any


class BertSelfAttention(nn.Module):
    """Q from ``x``, K/V from ``kv`` (``x`` itself for self-attention, image tokens for cross)."""

    hidden: int
    heads: int
    attn_dropout: float
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, kv, bias, deterministic: bool):
        linear = lambda name: dense(self.hidden, kernel_init=normal(0.02),
                                    bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)
        q = split_heads(linear("query")(x), self.heads)
        k = split_heads(linear("key")(kv), self.heads)
        v = split_heads(linear("value")(kv), self.heads)
        out = dot_product_attention(q, k, v, bias, nn.Dropout(self.attn_dropout), deterministic,
                                    self.attention)
        return merge_heads(out)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): the post-LN sub-block tail of BERT."""

    hidden: int
    dropout: float
    ln_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        x = dense(self.hidden, kernel_init=normal(0.02), bias_init=nn.initializers.zeros,
                  dtype=self.dtype, name="dense")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm")(x + residual)


class BertAttentionBlock(nn.Module):
    hidden: int
    heads: int
    attn_dropout: float
    dropout: float
    ln_eps: float
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, kv, bias, deterministic: bool):
        h = BertSelfAttention(self.hidden, self.heads, self.attn_dropout, self.dtype,
                              self.attention, name="self")(x, kv, bias, deterministic)
        return BertResidualOutput(self.hidden, self.dropout, self.ln_eps, self.dtype, name="output")(
            h, x, deterministic)


class BertLayer(nn.Module):
    hidden: int
    heads: int
    intermediate: int
    attn_dropout: float
    dropout: float
    ln_eps: float
    cross_attention: bool
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, self_bias, deterministic: bool, encoder=None, encoder_bias=None):
        block = lambda name: BertAttentionBlock(self.hidden, self.heads, self.attn_dropout,
                                                self.dropout, self.ln_eps, self.dtype,
                                                self.attention, name=name)
        x = block("attention")(x, x, self_bias, deterministic)
        if self.cross_attention:
            if encoder is None:
                raise ValueError("a fusion layer needs the image tokens (encoder states)")
            x = block("crossattention")(x, encoder, encoder_bias, deterministic)
        h = dense(self.intermediate, kernel_init=normal(0.02), bias_init=nn.initializers.zeros,
                  dtype=self.dtype, name="intermediate")(x)
        return BertResidualOutput(self.hidden, self.dropout, self.ln_eps, self.dtype, name="output")(
            gelu(h), x, deterministic)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    The reference's word embedding is ``nn.Embedding(..., padding_idx=pad_id)``: the [PAD] row
    never receives a gradient (its value is whatever it was initialised or loaded with). Here the
    lookups of ``pad_id`` are cut from the gradient, which gives that row exactly zero gradient
    however the [PAD] states are used later (the unmasked MAA pooling, the phrase convolutions
    and the replaced-token loss all read them).
    """

    vocab_size: int
    hidden: int
    max_positions: int
    type_vocab_size: int
    dropout: float
    ln_eps: float
    dtype: Dtype = jnp.float32
    pad_id: int | None = 0

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        seq_len = input_ids.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(f"text length {seq_len} exceeds max_position_embeddings "
                             f"{self.max_positions}")
        emb = lambda n, name: nn.Embed(n, self.hidden, embedding_init=normal(0.02), name=name)
        x = emb(self.vocab_size, "word_embeddings")(input_ids)
        if self.pad_id is not None:
            x = jnp.where((input_ids == self.pad_id)[..., None], jax.lax.stop_gradient(x), x)
        x = x + emb(self.max_positions, "position_embeddings")(jnp.arange(seq_len))[None]
        # Token types are all zero in every stage of the reference.
        x = x + emb(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(input_ids))
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm")(x.astype(self.dtype))
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


SYMBOL_IDS = (1, 9)  # first and last id of the category symbols in the vocab (method_spec §4.3)


def symbol_one_way_bias(input_ids: jax.Array) -> jax.Array:
    """(B, L) ids -> (B, 1, L, L) additive bias hiding key position 1 from every other query,
    for the rows whose position 1 holds a symbol token (``model.symbol_one_way``)."""
    n = input_ids.shape[1]
    if n < 2:
        return jnp.zeros((input_ids.shape[0], 1, n, n), jnp.float32)
    has_symbol = (input_ids[:, 1] >= SYMBOL_IDS[0]) & (input_ids[:, 1] <= SYMBOL_IDS[1])
    query, key = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    hidden = (key == 1) & (query != 1)
    return jnp.where(has_symbol[:, None, None, None] & hidden[None, None], MASK_BIAS, 0.0)


class XBert(nn.Module):
    vocab_size: int
    hidden: int
    num_layers: int
    fusion_layer: int
    heads: int
    intermediate: int
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    pad_id: int | None = 0
    symbol_one_way: bool = False
    attention: str = "xla"  # or "fused" (layers.dot_product_attention)
    remat: bool = False  # recompute each layer's activations in the backward pass
    scan: bool = False  # run the text layers and the fusion layers as two lax.scans

    def setup(self):
        self.embeddings = BertEmbeddings(self.vocab_size, self.hidden, self.max_positions,
                                         self.type_vocab_size, self.hidden_dropout, self.ln_eps,
                                         self.dtype, self.pad_id)
        # deterministic (argument 3, counting the module) is a Python bool: static under remat.
        layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        self.layers = [
            layer(self.hidden, self.heads, self.intermediate, self.attn_dropout,
                  self.hidden_dropout, self.ln_eps, cross_attention=i >= self.fusion_layer,
                  dtype=self.dtype, attention=self.attention, name=f"layer_{i}")
            for i in range(self.num_layers)
        ]

    def text(self, input_ids, attention_mask, deterministic: bool = True):
        """Text mode: (B, L) ids -> (B, L, hidden) text states."""
        x = self.embeddings(input_ids, deterministic)
        bias = attention_bias(attention_mask)
        if self.symbol_one_way:
            bias = bias + symbol_one_way_bias(input_ids)
        if self._scanning():
            return self._scan(range(self.fusion_layer), x, bias, deterministic)
        for layer in self.layers[: self.fusion_layer]:
            x = layer(x, bias, deterministic)
        return x

    def fusion(self, text_states, attention_mask, image_states, deterministic: bool = True):
        """Fusion mode: text states cross-attend to every image token (all-ones image mask)."""
        bias = attention_bias(attention_mask)
        x = text_states
        if self._scanning():
            return self._scan(range(self.fusion_layer, self.num_layers), x, bias, deterministic,
                              encoder=image_states, encoder_bias=None)
        for layer in self.layers[self.fusion_layer:]:
            x = layer(x, bias, deterministic, encoder=image_states, encoder_bias=None)
        return x

    def _scanning(self) -> bool:
        # Initialisation runs the layers one by one: that creates the per-layer parameters.
        return self.scan and not self.is_initializing()

    def _scan(self, indices, x, bias, deterministic, **kwargs):
        """Layers ``indices`` (all text or all fusion: one structure) as one lax.scan."""
        indices = list(indices)
        if not indices:
            return x
        layer = BertLayer(self.hidden, self.heads, self.intermediate, self.attn_dropout,
                          self.hidden_dropout, self.ln_eps,
                          cross_attention=indices[0] >= self.fusion_layer, dtype=self.dtype,
                          attention=self.attention, parent=None)  # unbound: applied as a function
        dropping = not deterministic and (self.hidden_dropout > 0 or self.attn_dropout > 0)
        return scan_layers(layer, [self.variables["params"][f"layer_{i}"] for i in indices], x,
                           bias, deterministic, rng=self.make_rng("dropout") if dropping else None,
                           remat=self.remat, **kwargs)

    def __call__(self, input_ids, attention_mask, image_states, deterministic: bool = True):
        return self.fusion(self.text(input_ids, attention_mask, deterministic), attention_mask,
                           image_states, deterministic)
