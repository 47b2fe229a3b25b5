"""The Fashion-FINE model: towers, projections, adapter, phrase module and heads (method_spec §1).

One Flax module holds every online parameter. Its top-level parameter collections carry the
reference names (``visual_encoder``, ``text_encoder``, ``vision_proj`` ...), so the momentum copy is
simply the subset of the parameter dict named in :data:`MOMENTUM_MODULES`, and a momentum forward
is ``model.apply({"params": {**params, **momentum}}, ...)``.

Methods are small, composable pieces (``encode_image``, ``encode_text``, ``fuse``, ``image_features``
...) that the training step and the evaluation call through ``model.apply(..., method=...)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from fine_jax.models.adapter import AttentionPool, PhraseModule, l2_normalize, mix_global_local
from fine_jax.models.bert import XBert
from fine_jax.models.layers import ATTENTION_KINDS, WideDense, gelu, torch_dense
from fine_jax.models.vit import VisionTransformer

# The six modules with momentum (EMA) copies, method_spec §1.6. Nothing else has one.
MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj",
                    "combine_text_proj", "combine_vision_proj")

# The modules each stage's model has (method_spec §1.1, §5.3): the stage-2 retrieval model drops
# the phrase convolutions and the MLM / replace heads, the stage-3 TGIR model also the MAA and the
# ITM head. The parameter tree of a variant holds exactly these modules (and ``temp``).
VARIANT_MODULES = {
    "pretrain": MOMENTUM_MODULES + ("itm_head", "maa", "phrase_module", "decoder_layer",
                                    "replace_predict_layer"),
    "retrieval": MOMENTUM_MODULES + ("itm_head", "maa"),
    "tgir": MOMENTUM_MODULES,
}
VARIANTS = tuple(VARIANT_MODULES)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# ``model.dtype="auto"``: the compute dtype measured fastest on the platform (resolve_dtype).
AUTO_DTYPE = "auto"


def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU reports AMX bf16 tiles (Linux ``/proc/cpuinfo`` flag ``amx_bf16``)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, platform: str | None = None, amx_bf16: bool | None = None
                  ) -> tuple[str, str]:
    """``(compute dtype, why)`` for ``model.dtype``; ``"auto"`` picks per platform.

    * TPU and GPU: bfloat16 (the MXU and tensor cores run bf16 products accumulated in fp32; the
      parameters, softmax and losses stay fp32).
    * CPU with AMX-BF16: bfloat16. Measured at the reference size (ViT-B/16, BERT 6+6, stage 1,
      ``benchmarks/train_step.py``): 1.8 times the fp32 step's speed.
    * Other CPUs: float32 (without AMX a bf16 product is no faster than an fp32 one).

    Any other value is returned as it is. ``platform`` defaults to the first JAX device's,
    ``amx_bf16`` to :func:`cpu_has_amx_bf16`.
    """
    if dtype != AUTO_DTYPE:
        return dtype, "set in the config"
    platform = platform or jax.devices()[0].platform
    if platform in ("tpu", "gpu", "cuda", "rocm"):
        return "bfloat16", f"{platform}: bf16 products accumulated in fp32"
    if amx_bf16 is None:
        amx_bf16 = cpu_has_amx_bf16()
    if amx_bf16:
        return "bfloat16", "CPU with AMX-BF16: bf16 products accumulated in fp32"
    return "float32", "CPU without AMX-BF16"


# ``model.matmul_precision``: how float32 matrix products are computed (JAX's
# ``default_matmul_precision``). "default" leaves JAX's platform default; "auto" resolves per
# platform and dtype (resolve_matmul_precision).
MATMUL_PRECISIONS = ("auto", "default", "float32", "tensorfloat32", "bfloat16")


def resolve_matmul_precision(precision: str, dtype: str, platform: str | None = None
                             ) -> tuple[str, str]:
    """``(precision, why)`` for ``model.matmul_precision``; ``"auto"`` picks per platform.

    JAX computes float32 products at reduced precision by default where the hardware offers it:
    TF32 on NVIDIA GPUs from Ampere on, one bf16 pass on TPUs. The reference's PyTorch computes its
    float32 products in float32. So with ``model.dtype=float32`` on a GPU or TPU, ``auto`` is
    ``float32``: the reference's precision. On a CPU, XLA computes every float32 product in float32
    whatever the setting, so ``auto`` leaves JAX's default. With ``bfloat16`` the products of the
    towers and heads are bf16 (the setting concerns float32 inputs only) and ``auto`` leaves the
    few float32 products left (the contrastive logits) to the platform's default.
    Any other value is returned as it is. ``dtype`` is the resolved ``model.dtype``.
    """
    if precision != "auto":
        return precision, "set in the config"
    platform = platform or jax.devices()[0].platform
    if platform == "cpu":
        return "default", "CPU: float32 products are computed in float32 at every setting"
    if dtype != "float32":
        return "default", f"{platform}, model.dtype={dtype}: the towers' products are {dtype}"
    default = "one bf16 pass" if platform == "tpu" else "TF32 on NVIDIA GPUs from Ampere on"
    return "float32", (f"{platform}, model.dtype=float32: the reference's float32 products; JAX's "
                       f"default there, {default}, is faster and rounder")


def matmul_precision_scope(config: "ModelConfig"):
    """A context manager under which JAX traces float32 products at the config's
    ``matmul_precision`` (resolved for the first device's platform). Jitted functions take it
    at trace time and cache per precision, so it must surround the tracing call."""
    dtype = resolve_dtype(config.dtype)[0]
    precision = resolve_matmul_precision(config.matmul_precision, dtype)[0]
    return jax.default_matmul_precision(None if precision == "default" else precision)


def with_matmul_precision(fn, config: "ModelConfig"):
    """``fn`` traced under :func:`matmul_precision_scope`: wrap a function before ``jax.jit``."""

    def wrapped(*args, **kwargs):
        with matmul_precision_scope(config):
            return fn(*args, **kwargs)

    return wrapped


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every size and switch of the model, with the reference values as defaults.

    This dataclass is the one source of the ``model`` config block's defaults
    (``fine_jax.config.base_config`` is built from it) and of its checks (:meth:`validate`).
    """

    # Which stage's model (VARIANT_MODULES): "pretrain" (stage 1), "retrieval" (stage 2), "tgir".
    variant: str = "pretrain"
    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_ln_eps: float = 1e-6
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0  # its word-embedding row gets no gradient (padding_idx)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    bert_ln_eps: float = 1e-12
    embed_dim: int = 256
    replace_kind_num: int = 2
    temp_init: float = 0.07
    img_patch_ratio: float = 0.05
    text_patch_ratio: float = 0.25
    # Symbol feature mix, hard-coded in the reference (method_spec §4.3).
    symbol_ratio: float = 0.95
    # Text tokens excluded from the MAA/phrase pooling: [CLS] and the symbol slot (method_spec §2).
    text_local_start: int = 2
    # method_spec §10 B1: mask padding in MAA/phrase pooling. Off = reference behaviour.
    mask_padding_in_pooling: bool = False
    # The symbol token (ids 1-9 at position 1) is read by no other token in the text layers: its
    # state still attends to the whole caption (the symbol feature of the symbol loss), but the
    # caption's states, [CLS] included, cannot take the category from it. Off = reference (full
    # attention). A caption without a symbol at position 1, as every evaluation text, is unchanged.
    symbol_one_way: bool = False
    # Compute dtype of the towers and heads ("bfloat16": bf16 matmuls with fp32 parameters;
    # attention softmax, normalisations of features and every loss stay fp32). "auto": bfloat16
    # on TPUs, GPUs and CPUs with AMX-BF16, float32 on other CPUs (resolve_dtype).
    dtype: str = "float32"
    # Attention: "xla" (explicit products, fp32 softmax) or "fused" (jax.nn.dot_product_attention,
    # cuDNN's fused kernel on GPUs; where attention dropout is active the explicit path runs).
    attention: str = "xla"
    # Precision of float32 matrix products: "auto" (float32 on GPUs and TPUs with dtype float32,
    # the platform's default otherwise; resolve_matmul_precision), "default" (JAX's: TF32 on NVIDIA
    # GPUs, one bf16 pass on TPUs, float32 on CPUs), "float32", "tensorfloat32" or "bfloat16".
    matmul_precision: str = "auto"
    # Recompute each ViT block's and BERT layer's activations in the backward pass instead of
    # keeping them: less memory for a second forward of the encoders.
    remat: bool = False
    # Run the ViT blocks, the BERT text layers and the fusion layers as three lax.scans, each
    # layer compiled once instead of once per layer (compile time grows with one layer, not the
    # depth). Parameters stay stored layer by layer, so checkpoints do not depend on it.
    scan_layers: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the ``model.*`` keys of a combination the model cannot build."""
        if self.variant not in VARIANT_MODULES:
            raise ValueError(f"model.variant={self.variant!r}: use one of {', '.join(VARIANTS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} is not a multiple of "
                             f"model.patch_size={self.patch_size}")
        for width, heads in (("vision_width", "vision_heads"), ("hidden_size", "num_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if h < 1 or w % h:
                raise ValueError(f"model.{width}={w} is not divisible by model.{heads}={h}; choose "
                                 f"a head count that divides the width")
        if self.vision_width != self.hidden_size:
            # The MAA is shared by both modalities and pools at one width (method_spec §2).
            raise ValueError(f"model.vision_width={self.vision_width} must equal model.hidden_size="
                             f"{self.hidden_size}: the shared adapter pools both at one width")
        if not 0 <= self.fusion_layer <= self.num_layers:
            raise ValueError(f"model.fusion_layer={self.fusion_layer} must lie in [0, "
                             f"model.num_layers={self.num_layers}]")
        if not (0.0 <= self.img_patch_ratio <= 1.0 and 0.0 <= self.text_patch_ratio <= 1.0):
            raise ValueError("model.img_patch_ratio and model.text_patch_ratio must lie in [0, 1]")
        if self.vocab_size < 1:
            raise ValueError(f"model.vocab_size={self.vocab_size}: set it, or 0 to size it from "
                             "the dataset's vocab before building the model")
        if self.dtype not in _DTYPES and self.dtype != AUTO_DTYPE:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES) + [AUTO_DTYPE]}, got "
                             f"{self.dtype!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"model.matmul_precision={self.matmul_precision!r}: use one of "
                             f"{', '.join(MATMUL_PRECISIONS)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention={self.attention!r}: use one of "
                             f"{', '.join(ATTENTION_KINDS)}")

    @property
    def modules(self) -> tuple[str, ...]:
        return VARIANT_MODULES[self.variant]

    @property
    def compute_dtype(self):
        return _DTYPES[resolve_dtype(self.dtype)[0]]

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class PredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm(1e-12) -> decoder: the MLM head and the replace predictor."""

    hidden: int
    out: int
    ln_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = gelu(torch_dense(self.hidden, self.hidden, "dense", self.dtype)(x))
        x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm")(x)
        return WideDense(self.out, self.hidden, self.dtype, name="decoder")(x)


def vision_tower(c: ModelConfig) -> VisionTransformer:
    """The image encoder of a model config (also used alone by fine_jax.vit_pretrain)."""
    return VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_depth,
                             c.vision_heads, c.vision_mlp_ratio, c.vision_ln_eps, c.compute_dtype,
                             attention=c.attention, remat=c.remat, scan=c.scan_layers)


class FashionFINE(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        c.validate()
        dt = c.compute_dtype
        self.visual_encoder = vision_tower(c)
        self.text_encoder = XBert(c.vocab_size, c.hidden_size, c.num_layers, c.fusion_layer,
                                  c.num_heads, c.intermediate_size, c.max_position_embeddings,
                                  c.type_vocab_size, c.hidden_dropout, c.attention_dropout,
                                  c.bert_ln_eps, dt, c.pad_token_id,
                                  symbol_one_way=c.symbol_one_way, attention=c.attention,
                                  remat=c.remat, scan=c.scan_layers)
        self.vision_proj = torch_dense(c.embed_dim, c.vision_width, dtype=dt)
        self.text_proj = torch_dense(c.embed_dim, c.hidden_size, dtype=dt)
        self.combine_vision_proj = torch_dense(c.embed_dim, c.embed_dim, dtype=dt)
        self.combine_text_proj = torch_dense(c.embed_dim, c.embed_dim, dtype=dt)
        has = set(c.modules)
        if "itm_head" in has:
            self.itm_head = torch_dense(2, c.hidden_size, dtype=dt)
        if "maa" in has:
            self.maa = AttentionPool(c.hidden_size, dt)
        if "phrase_module" in has:
            self.phrase_module = PhraseModule(c.hidden_size, dt)
        if "decoder_layer" in has:
            self.decoder_layer = PredictionHead(c.hidden_size, c.vocab_size, c.bert_ln_eps, dt)
        if "replace_predict_layer" in has:
            self.replace_predict_layer = PredictionHead(c.hidden_size, c.replace_kind_num,
                                                        c.bert_ln_eps, dt)
        self.temp = self.param("temp", lambda _: jnp.asarray(c.temp_init, jnp.float32))

    # --- towers -------------------------------------------------------------------------------
    def encode_image(self, images, deterministic: bool = True):
        """(B, H, W, 3) images, uint8 (normalised here) or normalised float -> (B, N, D) ViT
        tokens (index 0 = CLS)."""
        return self.visual_encoder(images)

    def encode_text(self, input_ids, attention_mask, deterministic: bool = True):
        """Text-mode BERT: (B, L) -> (B, L, D)."""
        return self.text_encoder.text(input_ids, attention_mask, deterministic)

    def fuse(self, text_states, attention_mask, image_states, deterministic: bool = True):
        """Fusion-mode BERT: text states cross-attend to all image tokens -> (B, L, D)."""
        return self.text_encoder.fusion(text_states, attention_mask, image_states, deterministic)

    # --- projections and features -------------------------------------------------------------
    def project_image(self, x):
        """Pv = combine_vision_proj . vision_proj (no non-linearity between), not normalised."""
        return self.combine_vision_proj(self.vision_proj(x))

    def project_text(self, x):
        return self.combine_text_proj(self.text_proj(x))

    def text_pool_mask(self, attention_mask):
        return attention_mask[:, self.config.text_local_start:] if self.config.mask_padding_in_pooling \
            else None

    def image_features(self, image_states):
        """-> (g_v, z_v, maa_weights): global CLS feature and the MAA-integrated feature."""
        g = l2_normalize(self.project_image(image_states[:, 0]))
        pooled, weights = self.maa(image_states[:, 1:])
        local = l2_normalize(self.project_image(pooled))
        return g, mix_global_local(g, local, self.config.img_patch_ratio), weights

    def text_features(self, text_states, attention_mask):
        """-> (g_t, z_t, maa_weights). Local tokens are positions ``text_local_start ..`` (2..L-1)."""
        start = self.config.text_local_start
        g = l2_normalize(self.project_text(text_states[:, 0]))
        pooled, weights = self.maa(text_states[:, start:], self.text_pool_mask(attention_mask))
        local = l2_normalize(self.project_text(pooled))
        return g, mix_global_local(g, local, self.config.text_patch_ratio), weights

    def image_global(self, image_states):
        """Momentum path: CLS only, no MAA (method_spec §1.6)."""
        return l2_normalize(self.project_image(image_states[:, 0]))

    def text_global(self, text_states):
        return l2_normalize(self.project_text(text_states[:, 0]))

    def symbol_feature(self, text_states, attention_mask):
        """s = norm(0.95 * norm(Pt(h[:,1])) + 0.05 * norm(Pt(phrase(h[:,2:])))) (method_spec §4.3)."""
        c = self.config
        s_sym = l2_normalize(self.project_text(text_states[:, 1]))
        u = self.phrase_module(text_states[:, c.text_local_start:], self.text_pool_mask(attention_mask))
        s_phr = l2_normalize(self.project_text(u))
        return l2_normalize(c.symbol_ratio * s_sym + (1.0 - c.symbol_ratio) * s_phr)

    # --- heads ----------------------------------------------------------------------------------
    def itm_logits(self, fused):
        return self.itm_head(fused[:, 0]).astype(jnp.float32)

    def mlm_logits(self, fused):
        return self.decoder_layer(fused).astype(jnp.float32)

    def rtp_logits(self, fused):
        return self.replace_predict_layer(fused).astype(jnp.float32)

    def get_temp(self):
        return self.temp

    # --- inference API --------------------------------------------------------------------------
    def embed_images(self, images):
        """Images -> z_v, the MAA-integrated features the reference ranks by."""
        return self.image_features(self.encode_image(images))[1]

    def embed_texts(self, input_ids, attention_mask):
        return self.text_features(self.encode_text(input_ids, attention_mask), attention_mask)[1]

    def itm_score(self, images, input_ids, attention_mask):
        """The ITM match logit of (image, text) pairs, for re-ranking (as ALBEF's evaluation)."""
        img = self.encode_image(images)
        fused = self.fuse(self.encode_text(input_ids, attention_mask), attention_mask, img)
        return self.itm_logits(fused)[:, 1]

    def tgir_query(self, text_states, attention_mask, reference_image_states,
                   deterministic: bool = True):
        """Stage-3 query f = norm(Pt(fusion(text, reference image)[:, 0])) (method_spec §5.3)."""
        fused = self.fuse(text_states, attention_mask, reference_image_states, deterministic)
        return l2_normalize(self.project_text(fused[:, 0]))

    def embed_tgir_queries(self, images, input_ids, attention_mask):
        """Reference images + modification texts -> the TGIR query features f."""
        return self.tgir_query(self.encode_text(input_ids, attention_mask), attention_mask,
                               self.encode_image(images))

    def embed_gallery(self, images):
        """TGIR gallery features: the global CLS feature, no MAA (method_spec §5.3)."""
        return self.image_global(self.encode_image(images))

    def __call__(self, images, input_ids, attention_mask, deterministic: bool = True):
        """Touches every parameter of the variant once; used for initialisation."""
        has = set(self.config.modules)
        img = self.encode_image(images, deterministic)
        txt = self.encode_text(input_ids, attention_mask, deterministic)
        fused = self.fuse(txt, attention_mask, img, deterministic)
        out = dict(g_v=self.image_global(img), g_t=self.text_global(txt), temp=self.get_temp())
        if "maa" in has:
            out.update(z_v=self.image_features(img)[1], z_t=self.text_features(txt, attention_mask)[1])
        if "itm_head" in has:
            out["itm"] = self.itm_logits(fused)
        if "phrase_module" in has:
            out["sym"] = self.symbol_feature(txt, attention_mask)
        if "decoder_layer" in has:
            out["mlm"] = self.mlm_logits(fused)
        if "replace_predict_layer" in has:
            out["rtp"] = self.rtp_logits(fused)
        return out


def init_params(model: FashionFINE, rng: jax.Array, batch_size: int = 1, text_len: int = 8):
    """Initialise all parameters from shapes alone."""
    c = model.config
    images = jnp.zeros((batch_size, c.image_size, c.image_size, 3), jnp.float32)
    ids = jnp.zeros((batch_size, text_len), jnp.int32)
    mask = jnp.ones((batch_size, text_len), jnp.int32)
    return model.init(rng, images, ids, mask)["params"]


def momentum_subset(params) -> dict:
    """The parameters that have a momentum copy (a new dict sharing the leaves)."""
    return {name: params[name] for name in MOMENTUM_MODULES}
