"""Weights in and out of fine_jax: reference PyTorch checkpoints, public towers, exports.

* :mod:`~fine_jax.interop.keymap`: the name and array-layout correspondence between fine_jax
  parameters and the reference state_dict (pure numpy, any model size).
* :mod:`~fine_jax.interop.layouts`: the checkpoint layouts the converter knows (Fashion-FINE stages
  1-3, FashionSAP, ALBEF) and their detection from the keys.
* :mod:`~fine_jax.interop.reference`: reference state_dict <-> fine_jax weights tree.
* :mod:`~fine_jax.interop.towers`: bert-base-uncased and timm ViT weights for the two towers.
* :mod:`~fine_jax.interop.posembed`: bicubic resizing of ViT position embeddings.
* :mod:`~fine_jax.interop.io`: reading and writing ``.pth`` / ``.bin`` / ``.safetensors`` files. Only
  this module touches torch, and only inside the functions that need it.
* :mod:`~fine_jax.interop.initialize`: the ``init.*`` config options of a training run.
"""
