"""Analytic FLOP count of the three stages' training steps, and model FLOP utilisation (MFU).

The count covers the matrix products: every dense layer, convolution and attention product of
both momentum forwards and of the online forward and backward passes, the fusion passes over the
positives and the hard negatives, the heads and the contrastive logits against the queue. Element-
wise work (LayerNorm, softmax, GELU, the optimiser) is left out, as is usual for MFU: it is a few
per cent of a step and does not run on the matrix units the peak refers to.

A product ``A (m, k) @ B (k, n)`` costs ``2 m k n`` forward. Its backward costs ``2 m k n`` for
each operand that needs a gradient: a dense layer on activations pays twice (weights and input),
the patch embedding on the raw images and the contrastive logits against the (stop-gradient)
momentum keys and queue pay once, and the momentum forwards pay nothing. So the count is exact for
the products, not the usual "3 x forward" estimate.

``step_flops(cfg)`` returns the total for one optimiser step over ``train.global_batch_size``
pairs, with a breakdown by part; ``tests/test_flops.py`` checks it against XLA's own count
(``jax.jit(...).lower(...).compile().cost_analysis()``) on the tiny size.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Tally:
    """FLOPs by part; ``add(name, m, k, n, grads)`` books one product run ``count`` times."""

    parts: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, m: float, k: float, n: float, grads: int, count: float = 1.0):
        flops = 2.0 * m * k * n * (1 + grads) * count
        self.parts[name] = self.parts.get(name, 0.0) + flops

    def merge(self, other: "Tally", prefix: str = "", scale: float = 1.0):
        for k, v in other.parts.items():
            key = prefix + k
            self.parts[key] = self.parts.get(key, 0.0) + v * scale

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))


# Gradient flags: how many operands of a product need a gradient.
NO_GRAD, ONE, BOTH = 0, 1, 2


def _w(train: bool, input_grad: bool = True) -> int:
    """Backward factor of a dense layer: weights and input when training, none otherwise."""
    if not train:
        return NO_GRAD
    return BOTH if input_grad else ONE


def vit(m, train: bool) -> Tally:
    """One image through the ViT (patch embedding, blocks)."""
    t = Tally()
    p = m.patch_size
    patches = (m.image_size // p) ** 2
    n, d = patches + 1, m.vision_width
    hidden = int(d * m.vision_mlp_ratio)
    t.add("patch_embed", patches, 3 * p * p, d, _w(train, input_grad=False))
    for _ in range(m.vision_depth):
        t.add("attention", n, d, 3 * d, _w(train))          # qkv
        t.add("attention", n, d, n, _w(train))              # q k^T, all heads together
        t.add("attention", n, n, d, _w(train))              # probs v
        t.add("attention", n, d, d, _w(train))              # proj
        t.add("mlp", n, d, hidden, _w(train))
        t.add("mlp", n, hidden, d, _w(train))
    return t


def _bert_layer(t: Tally, m, length: int, train: bool, image_tokens: int = 0):
    h, inter = m.hidden_size, m.intermediate_size
    t.add("self_attention", length, h, 3 * h, _w(train))
    t.add("self_attention", length, h, length, _w(train))
    t.add("self_attention", length, length, h, _w(train))
    t.add("self_attention", length, h, h, _w(train))
    if image_tokens:
        t.add("cross_attention", length, h, h, _w(train))                  # query
        t.add("cross_attention", image_tokens, m.vision_width, 2 * h, _w(train))  # key, value
        t.add("cross_attention", length, h, image_tokens, _w(train))
        t.add("cross_attention", length, image_tokens, h, _w(train))
        t.add("cross_attention", length, h, h, _w(train))                  # output
    t.add("ffn", length, h, inter, _w(train))
    t.add("ffn", length, inter, h, _w(train))


def bert_text(m, length: int, train: bool) -> Tally:
    """One caption through the text-mode layers."""
    t = Tally()
    for _ in range(m.fusion_layer):
        _bert_layer(t, m, length, train)
    return t


def bert_fusion(m, length: int, train: bool) -> Tally:
    """One (text, image) pair through the fusion layers."""
    t = Tally()
    for _ in range(m.num_layers - m.fusion_layer):
        _bert_layer(t, m, length, train, image_tokens=m.num_image_tokens)
    return t


def _projection(t: Tally, name: str, m, rows: float, width: int, train: bool):
    """combine_*_proj . *_proj on ``rows`` vectors."""
    t.add(name, rows, width, m.embed_dim, _w(train))
    t.add(name, rows, m.embed_dim, m.embed_dim, _w(train))


def _maa(t: Tally, m, tokens: int, train: bool):
    """The adapter: scores (dense + tanh + w) and the weighted sum."""
    d = m.hidden_size
    t.add("maa", tokens, d, d, _w(train))
    t.add("maa", tokens, d, 1, _w(train))
    t.add("maa", 1, tokens, d, _w(train))


def features(m, length: int, train: bool, symbol: bool) -> Tally:
    """Per pair: global and MAA features of both modalities, and the symbol feature."""
    t = Tally()
    patches = m.num_image_tokens - 1
    local_text = length - m.text_local_start
    _projection(t, "projections", m, 2, m.vision_width, train)  # CLS and MAA-pooled image
    _projection(t, "projections", m, 2, m.hidden_size, train)
    _maa(t, m, patches, train)
    _maa(t, m, local_text, train)
    if symbol:
        _projection(t, "projections", m, 2, m.hidden_size, train)  # symbol slot and phrase
        h = m.hidden_size
        t.add("phrase", local_text, h * (1 + 2 + 3), h, _w(train))  # uni/bi/tri-gram convs
    return t


def mlm_rows(cfg, batch: int) -> int:
    """Rows the MLM head runs on for ``batch`` captions: every position, or the gathered buffer
    (``loss.mlm_gather``; the step takes every position only for a batch that overflows it)."""
    from fine_jax.objectives import mlm_buffer_rows
    length = int(cfg.data.max_len)
    if cfg.loss.get("mlm_gather", False):
        return mlm_buffer_rows(batch, length, cfg.loss.mlm_max_fraction)
    return batch * length


def contrastive(t: Tally, rows: float, columns: float, e: int, grad_sims: int, no_grad_sims: int):
    """``grad_sims`` matrices with a gradient into the queries only, ``no_grad_sims`` without."""
    t.add("contrastive", rows, e, columns, ONE, count=grad_sims)
    t.add("contrastive", rows, e, columns, NO_GRAD, count=no_grad_sims)


def step_flops(cfg, batch: int | None = None) -> Tally:
    """The FLOPs of one training step of ``cfg.stage`` over ``batch`` pairs (default the global
    batch), with the reference objective (no from-scratch warm-up shortcut)."""
    m = _model_config(cfg)
    b = int(cfg.train.global_batch_size if batch is None else batch)
    length = int(cfg.data.max_len)
    q, e = int(cfg.loss.queue_size), m.embed_dim
    t = Tally()
    if cfg.stage in ("pretrain", "retrieval"):
        t.merge(vit(m, True), "vit/", b)
        t.merge(bert_text(m, length, True), "text/", b)
        t.merge(features(m, length, True, symbol=cfg.stage == "pretrain"), "heads/", b)
        t.merge(vit(m, False), "momentum/vit/", b)
        t.merge(bert_text(m, length, False), "momentum/text/", b)
        mom = Tally()
        _projection(mom, "projections", m, 1, m.vision_width, False)
        _projection(mom, "projections", m, 1, m.hidden_size, False)
        t.merge(mom, "momentum/", b)
        t.merge(bert_fusion(m, length, True), "fusion/", 3 * b)  # positives + 2 negatives
        heads = Tally()
        heads.add("itm", 3 * b, m.hidden_size, 2, _w(True))
        if cfg.stage == "pretrain":
            h = m.hidden_size
            if cfg.loss.get("clean_itc_itm_text", False):  # MLM / RTP read the corrupted text
                t.merge(bert_text(m, length, True), "text/", b)
                t.merge(bert_fusion(m, length, True), "fusion/", b)
            rows = mlm_rows(cfg, b)
            heads.add("mlm", rows, h, h, _w(True))
            heads.add("mlm", rows, h, m.vocab_size, _w(True))
            heads.add("rtp", b * length, h, h, _w(True))
            heads.add("rtp", b * length, h, m.replace_kind_num, _w(True))
            # The decoders' bias gradients, a row of ones times the output gradient
            # (models.layers.add_bias): one product each, in the backward pass.
            heads.add("mlm_bias_grad", 1, rows, m.vocab_size, NO_GRAD)
            heads.add("rtp_bias_grad", 1, b * length, m.replace_kind_num, NO_GRAD)
        t.merge(heads, "heads/")
        contrastive(t, b, b + q, e, grad_sims=2, no_grad_sims=2)
    elif cfg.stage == "tgir":
        # Online: reference and target images, the query's text and fusion passes, projections.
        t.merge(vit(m, True), "vit/", 2 * b)
        t.merge(bert_text(m, length, True), "text/", b)
        t.merge(bert_fusion(m, length, True), "fusion/", b)
        on = Tally()
        _projection(on, "projections", m, 1, m.hidden_size, True)   # query
        _projection(on, "projections", m, 1, m.vision_width, True)  # target
        t.merge(on, "heads/", b)
        t.merge(vit(m, False), "momentum/vit/", 2 * b)
        t.merge(bert_text(m, length, False), "momentum/text/", b)
        t.merge(bert_fusion(m, length, False), "momentum/fusion/", b)
        mom = Tally()
        _projection(mom, "projections", m, 1, m.hidden_size, False)
        _projection(mom, "projections", m, 2, m.vision_width, False)
        t.merge(mom, "momentum/", b)
        # f against [t_m; r_m; image queue], t against [f_m; fusion queue], and both momentum twins.
        contrastive(t, b, 2 * b + q, e, grad_sims=1, no_grad_sims=1)
        contrastive(t, b, b + q, e, grad_sims=1, no_grad_sims=1)
    else:
        raise ValueError(f"no FLOP count for stage {cfg.stage!r}")
    return t


def _model_config(cfg):
    from fine_jax.models.fine import ModelConfig
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in cfg.model.to_dict().items() if k in fields})


def summary(t: Tally, top: int = 6) -> str:
    """'12.3 GFLOP/step: vit 40%, fusion 25%, ...' grouped by the first part of each name."""
    groups: dict[str, float] = {}
    for k, v in t.parts.items():
        head = k.split("/")[0] if not k.startswith("momentum/") else "momentum"
        groups[head] = groups.get(head, 0.0) + v
    total = t.total
    items = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return f"{total / 1e9:.3g} GFLOP/step (" + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in items) + ")"


# ----------------------------------------------------------------------------------------------
# XLA's own count of the same products
# ----------------------------------------------------------------------------------------------

_TENSOR = re.compile(r"tensor<([0-9x]*)x?[a-z0-9]+>")
_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([0-9, ]*)\] x .*?: "
                  r"\((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")
_CONV = re.compile(r"stablehlo\.convolution.*?dim_numbers = \[[^\]]*\]x\[([^\]]*)\]->.*?"
                   r"feature_group_count = (\d+).*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> "
                   r"(tensor<[^>]*>)")


def _shape(tensor: str) -> list[int]:
    dims = _TENSOR.match(tensor).group(1)
    return [int(d) for d in dims.split("x") if d] if dims else []


def stablehlo_matmul_flops(text: str) -> float:
    """The FLOPs of every ``dot_general`` and ``convolution`` in a lowered StableHLO module
    (``jax.jit(f).lower(...).as_text()``): 2 x output elements x contracted elements. The same
    quantity :func:`step_flops` counts analytically, read off the program XLA is handed."""
    total = 0.0
    for line in text.splitlines():
        if "stablehlo.dot_general" in line:
            m = _DOT.search(line)
            if m is None:
                raise ValueError(f"cannot read the dot_general: {line.strip()[:200]}")
            lhs, out = _shape(m.group(2)), _shape(m.group(4))
            contracted = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i.strip())
            total += 2.0 * math.prod(out) * contracted
        elif "stablehlo.convolution" in line:
            m = _CONV.search(line)
            if m is None:
                raise ValueError(f"cannot read the convolution: {line.strip()[:200]}")
            labels = [x.strip() for x in m.group(1).split(",")]
            rhs, out = _shape(m.group(4)), _shape(m.group(5))
            per_output = math.prod(rhs) // rhs[labels.index("o")]
            total += 2.0 * math.prod(out) * per_output / int(m.group(2))
    return total


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s of the device, for MFU
# ----------------------------------------------------------------------------------------------

# Dense peak per chip, TFLOP/s, by substring of device_kind and the arithmetic of the products:
# "bf16" the matrix units' bf16 peak without sparsity, "tf32" NVIDIA's TF32 tensor-core peak,
# "fp32" true float32 (NVIDIA's CUDA cores). TPUs compute float32 products as bf16 passes: one
# at JAX's default precision, three at "tensorfloat32", six at "float32" (TPU_FP32_PASSES).
PEAK_TFLOPS = {
    "TPU v6": {"bf16": 918.0},
    "TPU v5p": {"bf16": 459.0},
    "TPU v5 lite": {"bf16": 197.0},
    "TPU v5e": {"bf16": 197.0},
    "TPU v4": {"bf16": 275.0},
    "TPU v3": {"bf16": 123.0},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # fp16 tensor cores; no bf16, no TF32
}
TPU_FP32_PASSES = {"default": 1, "bfloat16": 1, "tensorfloat32": 3, "float32": 6}


def _peak_class(dtype: str, precision: str, peaks: dict, tpu: bool) -> tuple[str, float]:
    """(label, divisor of the table entry) for products in ``dtype`` at ``precision``."""
    if dtype in ("bfloat16", "float16"):
        return "bf16", 1.0
    if tpu:
        passes = TPU_FP32_PASSES.get(precision, 1)
        return f"fp32 as {passes} bf16 pass{'es' if passes > 1 else ''}", float(passes)
    if precision == "bfloat16":
        return "bf16", 1.0
    if precision == "float32" or "tf32" not in peaks:  # JAX's default on NVIDIA is TF32
        return "fp32", 1.0
    return "tf32", 1.0


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the best of ``repeats`` square ``size`` matmuls on the first device (the CPU's
    peak: no table can know a CPU's cores and vector units). Accumulated in float32, as the
    model's bf16 products are (``fine_jax.models.layers.bf16_matmul``): on a CPU with AMX that
    is about five times the float32 peak, where a bf16-output product is slower than float32."""
    dt = jnp.dtype(dtype)
    x = jnp.ones((size, size), dt)
    f = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def device_peak_flops(device=None, dtype: str = "float32", precision: str = "default"
                      ) -> tuple[float, str]:
    """(peak FLOP/s of one device for products in ``dtype``, where the figure comes from).

    ``precision`` is the resolved ``model.matmul_precision``: how float32 products run (TF32 or
    true float32 on an NVIDIA GPU, one to six bf16 passes on a TPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    if device.platform != "cpu":
        for key, peaks in PEAK_TFLOPS.items():
            if key.lower() in kind.lower():
                tpu = device.platform == "tpu" or kind.lower().startswith("tpu")
                label, divisor = _peak_class(dtype, precision, peaks, tpu)
                entry = peaks["bf16"] if tpu or label == "bf16" else peaks[label]
                return entry / divisor * 1e12, f"{kind} {label} table"
    return measured_matmul_peak(dtype), f"measured {dtype} matmul on {kind or device.platform}"


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int,
        peak_per_device: float) -> float:
    """Model FLOPs per second over the devices' combined peak."""
    if seconds_per_step <= 0 or peak_per_device <= 0:
        return 0.0
    return flops_per_step / seconds_per_step / (num_devices * peak_per_device)
