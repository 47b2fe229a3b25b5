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


# --- bf16 products with float32 accumulation ------------------------------------------------
#
# With ``model.dtype=bfloat16`` every matmul takes bf16 operands. Written as a plain bf16 dot, XLA
# rounds each product's output to bf16, and on CPU it runs the dot with Eigen, slower than float32
# (measured 250-300 GFLOP/s against 300-350 on this project's 2-core AVX-512/AMX machine). The
# same dot with a float32 output (``preferred_element_type``) is what a TPU's MXU and a GPU's
# tensor cores compute anyway, and on an x86 CPU with AMX, XLA hands it to YNNPACK: 0.9-1.8
# TFLOP/s for the model's shapes. YNNPACK takes the row-major forms ``A @ B`` and ``A @ B.T``
# but not ``A.T @ B``, the form of every weight gradient, and the dot that falls back to Eigen
# has no bf16 x bf16 -> f32 kernel at all (a runtime error). So the products below fix their own
# backward: each weight gradient transposes its operand into memory first (``_contiguous``).


def _contiguous(x: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """``x.transpose(perm)``, laid out in memory as such on CPU.

    XLA would otherwise fold the transpose into the consuming dot as a column-major operand, a
    form YNNPACK does not take. The flatten forces the physical transpose and the barrier keeps
    the simplifier from undoing it. On GPU and TPU the dot takes any layout: a plain transpose.
    """
    y = jnp.transpose(x, perm)
    if jax.default_backend() != "cpu":
        return y
    return jax.lax.optimization_barrier(y.reshape(-1)).reshape(y.shape)


def _swap_last(x: jax.Array) -> jax.Array:
    perm = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return _contiguous(x, perm)


def _f32_dot(a: jax.Array, b: jax.Array, b_transposed: bool) -> jax.Array:
    """``a (..., M, K) @ b (..., K, N)`` (or ``b (..., N, K)`` transposed), batched over the
    leading axes both share, accumulated and returned in float32."""
    batch = tuple(range(a.ndim - 2))
    contract_b = b.ndim - 1 if b_transposed else b.ndim - 2
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (contract_b,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., K) @ w (K, N)`` for a bf16 ``x``, accumulated in float32, rounded to bf16.

    ``w`` may be the float32 parameter itself: it is rounded to bf16 here and again in the
    backward pass, which then keeps the parameter, not a bf16 copy of every weight, and returns
    its gradient in float32."""
    x2 = x.reshape(-1, x.shape[-1])
    y = _f32_dot(x2, w.astype(x.dtype), False)
    return y.astype(x.dtype).reshape(x.shape[:-1] + (w.shape[1],))


def _bf16_matmul_fwd(x, w):
    return bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(res, g):
    x, w = res
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dx = _f32_dot(g2, w.astype(x.dtype), True).astype(x.dtype).reshape(x.shape)
    dw = _f32_dot(_swap_last(x2), g2, False).astype(w.dtype)
    return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _bf16_batched_product(b_transposed: bool, doc: str):
    """``a (..., M, K) @ b`` for bf16 operands, ``b (..., N, K)`` transposed or ``(..., K, N)``,
    accumulated and returned in float32; the backward pass keeps to YNNPACK's two forms."""

    @jax.custom_vjp
    def product(a, b):
        return _f32_dot(a, b, b_transposed)

    def fwd(a, b):
        return product(a, b), (a, b)

    def bwd(res, g):
        a, b = res
        g = g.astype(a.dtype)
        if b_transposed:  # y = a b^T: da = g b, db = g^T a
            da, db = _f32_dot(g, b, False), _f32_dot(_swap_last(g), a, False)
        else:  # y = a b: da = g b^T, db = a^T g
            da, db = _f32_dot(g, b, True), _f32_dot(_swap_last(a), g, False)
        return da.astype(a.dtype), db.astype(b.dtype)

    product.defvjp(fwd, bwd)
    product.__doc__ = doc
    return product


bf16_bmm_nt = _bf16_batched_product(
    True, "``a (..., M, K) @ b (..., N, K).T``, float32 out: attention's query-key logits.")
bf16_bmm = _bf16_batched_product(
    False, "``a (..., M, K) @ b (..., K, N)``, float32 out: attention's probabilities x values.")


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for ``nn.Dense(dot_general=...)``: a bf16 layer's product goes through
    :func:`bf16_matmul`; every other call (float32, other dimension numbers) is unchanged."""
    (lc, rc), (lb, rb) = dimension_numbers
    dense_form = (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) == ((lhs.ndim - 1,), (0,), (), ())
    if (dense_form and lhs.dtype == jnp.bfloat16 and rhs.ndim == 2
            and rhs.dtype in (jnp.bfloat16, jnp.float32) and preferred_element_type is None):
        return bf16_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def promote_all_but_kernel(inputs, kernel, bias=None, dtype=None, inexact=True):
    """``nn.Dense``'s dtype promotion, except that a bf16 layer leaves its float32 kernel to
    :func:`bf16_matmul`, which rounds it where it is used (no bf16 copy of the weights kept for
    the backward pass)."""
    promoted = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype, inexact=inexact)
    if promoted[0].dtype == jnp.bfloat16 and kernel.dtype == jnp.float32:
        promoted[1] = kernel
    return promoted


def dense(features: int, dtype: Dtype = jnp.float32, **kwargs) -> nn.Dense:
    """``nn.Dense`` whose bf16 product accumulates in float32 (:func:`dense_dot_general`)."""
    return nn.Dense(features, dtype=dtype, dot_general=dense_dot_general,
                    promote_dtype=promote_all_but_kernel, **kwargs)


def torch_dense(features: int, fan_in: int, name: str | None = None, dtype: Dtype = jnp.float32,
                use_bias: bool = True) -> nn.Dense:
    """A Dense layer with PyTorch's default nn.Linear initialisation."""
    return dense(features, dtype, use_bias=use_bias, kernel_init=torch_default_kernel(),
                 bias_init=torch_default_bias(fan_in), name=name)


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
        x, kernel, bias = promote_all_but_kernel(x, kernel, bias, dtype=self.dtype)
        y = dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return add_bias(y, bias)


def gelu(x):
    # Exact (erf) GELU everywhere, as in PyTorch nn.GELU() and HF "gelu"; computed in float32
    # (a bf16 erf is both rounder and, on CPU, about 4 times slower).
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


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
    if q.dtype == jnp.bfloat16:
        # (B, H, T, d) in memory, then bf16 products accumulated in float32 (see bf16_matmul).
        qh, kh, vh = (_contiguous(t, (0, 2, 1, 3)) for t in (q, k, v))
        logits = bf16_bmm_nt(qh, kh) * scale
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1)
        if dropout is not None:
            probs = dropout(probs, deterministic=deterministic)
        out = bf16_bmm(probs.astype(v.dtype), vh).astype(v.dtype)
        return jnp.transpose(out, (0, 2, 1, 3))
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
