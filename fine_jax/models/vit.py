"""Vision Transformer in the timm/DeiT layout used by ALBEF and Fashion-FINE (method_spec §1.2).

Parameter names follow the reference state_dict (``patch_embed.proj``, ``blocks_<i>.attn.qkv``,
``blocks_<i>.mlp.fc1`` ...) so that weight conversion is a rename plus a transpose.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from fine_jax.data.image import CLIP_MEAN, CLIP_STD
from fine_jax.models.layers import (dense, dot_product_attention, gelu, merge_heads, scan_layers,
                                    split_heads, torch_default_bias, torch_default_kernel, trunc_normal)

Dtype = Any


def normalize_images(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 images -> float32 ``(x / 255 - CLIP_MEAN) / CLIP_STD``, the same float32 operations
    as the host transform (``fine_jax.data.image.normalize``); float images pass unchanged (they
    are normalised already). The pipelines send uint8, a quarter of the bytes of float32."""
    if images.dtype != jnp.uint8:
        return images
    x = images.astype(jnp.float32) / jnp.float32(255.0)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


class ViTAttention(nn.Module):
    width: int
    heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        linear = lambda n, name: dense(n, kernel_init=trunc_normal(0.02),
                                       bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)
        qkv = linear(3 * self.width, "qkv")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads),
                                    split_heads(v, self.heads), None, None, True, self.attention)
        return linear(self.width, "proj")(merge_heads(out))


class ViTMlp(nn.Module):
    width: int
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        linear = lambda n, name: dense(n, kernel_init=trunc_normal(0.02),
                                       bias_init=nn.initializers.zeros, dtype=self.dtype, name=name)
        return linear(self.width, "fc2")(gelu(linear(self.hidden, "fc1")(x)))


class ViTBlock(nn.Module):
    width: int
    heads: int
    mlp_hidden: int
    ln_eps: float
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x):
        ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=name)
        x = x + ViTAttention(self.width, self.heads, self.dtype, self.attention,
                             name="attn")(ln("norm1")(x))
        x = x + ViTMlp(self.width, self.mlp_hidden, self.dtype, name="mlp")(ln("norm2")(x))
        return x


class PatchEmbed(nn.Module):
    width: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        fan_in = 3 * p * p
        # timm leaves the patch Conv2d at PyTorch's default init.
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=torch_default_kernel(), bias_init=torch_default_bias(fan_in),
                    dtype=self.dtype, name="proj")(images)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class VisionTransformer(nn.Module):
    """Images (B, H, W, 3), uint8 or normalised float -> all tokens (B, 1 + (H/p)*(W/p), width);
    index 0 is CLS."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # or "fused" (layers.dot_product_attention)
    remat: bool = False  # recompute each block's activations in the backward pass
    scan: bool = False  # run the blocks as one lax.scan (layers.scan_layers)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(self, images):
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(f"ViT expects {self.image_size}x{self.image_size} images, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        x = PatchEmbed(self.width, self.patch_size, self.dtype, name="patch_embed")(
            normalize_images(images).astype(self.dtype))
        b = x.shape[0]
        cls = self.param("cls_token", trunc_normal(0.02), (1, 1, self.width))
        pos = self.param("pos_embed", trunc_normal(0.02), (1, self.num_patches + 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        hidden = int(self.width * self.mlp_ratio)
        if self.scan and not self.is_initializing():
            block = ViTBlock(self.width, self.heads, hidden, self.ln_eps, self.dtype, self.attention,
                             parent=None)  # unbound: applied as a function of each block's params
            x = scan_layers(block, [self.variables["params"][f"blocks_{i}"]
                                    for i in range(self.depth)], x, remat=self.remat)
        else:
            block = nn.remat(ViTBlock) if self.remat else ViTBlock
            for i in range(self.depth):
                x = block(self.width, self.heads, hidden, self.ln_eps, self.dtype, self.attention,
                          name=f"blocks_{i}")(x)
        return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(x)
