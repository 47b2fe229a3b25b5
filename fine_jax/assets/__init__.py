"""Files shipped with fine_jax.

* ``demo_vit.safetensors``: the embedded demo's ViT (64 px, patch 8, width 128, depth 2), in
  timm's names, which ``init.vit`` loads as it loads DeiT's weights. It is the demo's stand-in for
  the ImageNet-supervised DeiT that the reference's ViT starts from, made by
  ``python -m fine_jax.vit_pretrain --config=configs/demo.py
  --out=fine_jax/assets/demo_vit.safetensors --steps=6000 --redrawn=90000`` (16 minutes on a
  2-core CPU) from the embedded set's training split only; the file's metadata records how.
"""
import pathlib

DEMO_VIT = pathlib.Path(__file__).with_name("demo_vit.safetensors")
