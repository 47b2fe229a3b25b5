"""Building blocks shared by the ViT and BERT towers.

Initialisers mirror the reference PyTorch code so that a model trained from scratch starts from the
same distribution: timm's truncated normal for the ViT, HF BERT's N(0, 0.02) for the text tower, and
PyTorch's default Linear/Conv init (kaiming-uniform with a=sqrt(5)) for modules the reference defines
directly on its model class.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# The reference adds (1 - mask) * -10000 to attention logits, not -inf: keep the same constant so
# fully-masked rows behave identically.
MASK_BIAS = -10000.0


def trunc_normal(std: float = 0.02) -> Callable:
    """timm's trunc_normal_(std) with bounds [-2, 2] in absolute units (not in stds)."""

    def init(key, shape, dtype=jnp.float32):
        lower, upper = -2.0 / std, 2.0 / std
        return std * jax.random.truncated_normal(key, lower, upper, shape, dtype)

    return init


def normal(std: float = 0.02) -> Callable:
    return nn.initializers.normal(stddev=std)


def torch_default_kernel() -> Callable:
    """PyTorch default weight init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Callable:
    """PyTorch default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, name: str | None = None, dtype: Dtype = jnp.float32,
                use_bias: bool = True) -> nn.Dense:
    """A Dense layer with PyTorch's default nn.Linear initialisation."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_default_kernel(),
                    bias_init=torch_default_bias(fan_in), dtype=dtype, name=name)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` over the last axis, whose bias gradient is a matrix product with a row of ones
    instead of a column sum: XLA's CPU backend sums a (rows, 30,522) gradient over its rows about
    1.5 times slower than the whole matmul of the MLM decoder's kernel gradient, while a
    vector-matrix product runs at matmul speed. Same value, same gradient up to summation order."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):
    rows = g.reshape(-1, g.shape[-1])
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    # HIGHEST: a full-precision sum where the default precision of an f32 product is lower (TPU).
    return g, jnp.dot(ones, rows, precision=jax.lax.Precision.HIGHEST)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class WideDense(nn.Module):
    """PyTorch's nn.Linear (default init) for a wide output such as the 30,522-word MLM decoder:
    the parameters of ``torch_dense`` (``kernel``, ``bias``), with the bias added by
    :func:`add_bias`."""

    features: int
    fan_in: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", torch_default_kernel(), (x.shape[-1], self.features))
        bias = self.param("bias", torch_default_bias(self.fan_in), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return add_bias(y, bias)


def gelu(x):
    # Exact (erf) GELU everywhere, as in PyTorch nn.GELU() and HF "gelu".
    return jax.nn.gelu(x, approximate=False)


def attention_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """(B, K) 0/1 key mask -> (B, 1, 1, K) additive bias, (1 - mask) * -10000 as in the reference."""
    return ((1.0 - mask.astype(dtype)) * MASK_BIAS)[:, None, None, :]


ATTENTION_KINDS = ("xla", "fused")


def dot_product_attention(q, k, v, bias, dropout: nn.Dropout | None, deterministic: bool,
                          kind: str = "xla"):
    """q: (B, Tq, H, d), k/v: (B, Tk, H, d), bias broadcastable to (B, H, Tq, Tk).

    The softmax runs in float32 whatever the compute dtype, as the reference runs in fp32.
    ``kind="fused"`` calls ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on a GPU where
    the shapes and dtype allow, else XLA's own), which has no attention dropout: a call that
    would drop attention probabilities (training with ``attention_dropout > 0``) takes the
    explicit path instead.
    """
    dropping = dropout is not None and not deterministic and dropout.rate > 0
    if kind == "fused" and not dropping:
        if bias is not None:
            bias = jnp.broadcast_to(bias, (q.shape[0], bias.shape[1], bias.shape[2],
                                           k.shape[1])).astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias)
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


def scan_layers(layer: nn.Module, params: list, x: jax.Array, *args, rng: jax.Array | None = None,
                remat: bool = False, **kwargs) -> jax.Array:
    """``x`` through ``layer`` once per entry of ``params`` (one layer's parameters each, the same
    structure), as one ``lax.scan`` over the stacked parameters: XLA compiles the layer once
    instead of once per layer (``model.scan_layers``).

    The parameters stay stored layer by layer (``blocks_<i>``, ``layer_<i>``), so checkpoints and
    weight conversion do not depend on the switch; they are stacked here, inside the
    differentiated function, at the cost of one copy of the layers' weights per call. ``layer`` is
    an unbound module, applied as a pure function; ``args``/``kwargs`` are the same for every layer.
    With ``rng``, each layer gets its own dropout key (other keys than the unrolled layers draw,
    the same distribution).
    """
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *params)
    keys = None if rng is None else jax.random.split(rng, len(params))

    def body(h, xs):
        p, key = xs
        rngs = None if key is None else {"dropout": key}
        return layer.apply({"params": p}, h, *args, rngs=rngs, **kwargs), None

    if remat:
        body = jax.checkpoint(body)
    x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x
