"""Public weights for the two towers: bert-base-uncased for BERT, a timm/DeiT ViT-B/16 for the ViT.

This is how ALBEF starts before any vision-language training: ``BertModel.from_pretrained`` fills
the embeddings and every layer's self-attention and FFN, so the fusion layers' cross-attention stays
at its initial value; the ViT is loaded from DeiT with its position embeddings resized to the
image grid (method_spec §1.2). Everything a tower file does not fill keeps fine_jax's
initialisation and is listed in the report.

BERT files may use the ``BertModel`` names (``embeddings.*``, ``encoder.layer.N.*``) or carry a
``bert.`` prefix (``BertForPreTraining``, ``BertForMaskedLM``); the original bert-base-uncased
``pytorch_model.bin`` still names LayerNorm parameters ``gamma``/``beta``. The ViT file uses timm's
names (``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight``, ...), the names the reference's
``visual_encoder`` has.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from flax import traverse_util

from fine_jax.interop.keymap import get_path, param_entries, uncovered
from fine_jax.interop.reference import (ConversionError, ConversionReport, convert_entries,
                                        first_lines)

# Keys of a tower file that have no place in fine_jax by design: classification / pre-training
# heads and buffers.
_BERT_IGNORED = (r"^pooler\.", r"^cls\.", r"position_ids$")
_VIT_IGNORED = (r"^head\.", r"^head_dist\.", r"^pre_logits\.")
_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def normalise_bert_keys(state_dict: Mapping) -> dict:
    """``bert.`` prefix removed, TF-era ``gamma``/``beta`` renamed to ``weight``/``bias``."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("bert."):] if key.startswith("bert.") else key
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    return out


def _load_tower(state_dict: Mapping, params: Mapping, module: str, tower: str, ignored,
                numbered: re.Pattern, count: int, skip=lambda key: False):
    """Maps the keys of one tower file into ``params[module]``; strict about everything else.

    ``numbered`` matches the file's layer/block index: those beyond the model's ``count`` are
    ignored (a 12-layer file can initialise a smaller model's first layers).
    """
    prefix = module + "."
    entries = [e for e in param_entries({module: params[module]}) if not skip(e.key)]
    report = ConversionReport(layout=tower)
    errors = []
    arrays = convert_entries(state_dict, entries, {"params": params}, report, errors,
                             key_in_file=lambda key: key[len(prefix):])
    for key in sorted(set(state_dict) - set(report.mapped)):
        layer = numbered.match(key)
        beyond = layer is not None and int(layer.group(1)) >= count
        (report.ignored if beyond or any(re.search(p, key) for p in ignored)
         else report.unused).append(key)
    if errors or report.missing or report.unused:
        raise ConversionError(_tower_error(tower, errors, report))
    report.filled = uncovered(traverse_util.flatten_dict({"params": params}), set(arrays))
    return arrays, report


def _tower_error(tower: str, errors: list, report: ConversionReport) -> str:
    parts = [f"the {tower} weights do not fit the model config:"]
    for title, items in (("arrays whose shape does not fit", errors), ("keys missing from the file", report.missing),
                         ("keys of the file with no place in the model", report.unused)):
        if items:
            parts.append(f"{len(items)} {title}:\n  " + first_lines(items))
    return "\n".join(parts)


def bert_tower(state_dict: Mapping, params: Mapping,
               cross_attention: bool = False) -> tuple[dict, ConversionReport]:
    """A bert-base-uncased style state_dict -> ({("params", "text_encoder", ...): array}, report).

    ``params`` is the model's (abstract) parameter tree. The fusion layers' cross-attention is
    filled only with ``cross_attention=True``, for files that have it (an xbert text encoder).
    """
    num_layers = sum(1 for name in params["text_encoder"] if name.startswith("layer_"))
    skip = (lambda key: False) if cross_attention else (lambda key: ".crossattention." in key)
    return _load_tower(normalise_bert_keys(state_dict), params, "text_encoder", "bert",
                       _BERT_IGNORED, _BERT_LAYER, num_layers, skip)


def vit_tower(state_dict: Mapping, params: Mapping) -> tuple[dict, ConversionReport]:
    """A timm/DeiT ViT state_dict -> ({("params", "visual_encoder", ...): array}, report)."""
    depth = sum(1 for name in params["visual_encoder"] if name.startswith("blocks_"))
    return _load_tower(dict(state_dict), params, "visual_encoder", "vit", _VIT_IGNORED, _VIT_BLOCK,
                       depth)


def vit_state_dict(vit: Mapping) -> dict:
    """fine_jax ViT parameters (``params["visual_encoder"]``) -> a timm-named state_dict that
    :func:`vit_tower` reads back into the same arrays (float32, timm's layouts)."""
    tree = {"params": {"visual_encoder": vit}}
    prefix = "visual_encoder."
    return {e.key[len(prefix):]: np.asarray(e.transform.to_reference(
                np.asarray(get_path(tree, e.path), np.float32)), order="C")
            for e in param_entries(tree["params"])}
