"""The reference checkpoint layouts the converter reads (method_spec §1.1, §1.9, §5.3).

A layout says which parts of a fine_jax weights tree a checkpoint of that kind has, where its
buffers go, and which of its keys the reference itself throws away. It converts into the tree of
its stage's model variant (``Layout.variant``): stage 1's for ``pretrain``, ``fashionsap`` and
``albef``, stage 2's for ``retrieval`` and stage 3's (with its fusion queue) for ``tgir``. What a layout lacks keeps its
initial value (reported, not an error); a key the layout should have but the file does not is.

==========  =========================================================================================
pretrain    Fashion-FINE stage 1 (``model_pretrain.py``): everything, queues with ``idx_queue``.
retrieval   Stage 2 (``model_retrieval.py``): no phrase convs, MLM head, replace head or idx queue.
tgir        Stage 3 (``model_tgir.py``): no MAA, phrase convs, ITM/MLM/replace heads or text queue;
            an image queue and a fusion queue with a pointer each.
fashionsap  FashionSAP pre-training: the stage-1 names without the MAA and the phrase convs.
albef       ALBEF-4M/14M (``text_encoder.bert.*``): as the reference loads it, "bert." is removed
            from every key and ALBEF's own MLM head (``text_encoder.cls.*``) is dropped.
==========  =========================================================================================
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from fine_jax.interop.keymap import IDX_QUEUE, POINTER, QUEUE, Entry


class LayoutError(ValueError):
    """The file is not a state_dict of a known layout."""


_IMAGE_QUEUE = Entry("image_queue", ("queues", "image"), QUEUE)
_TEXT_QUEUE = Entry("text_queue", ("queues", "text"), QUEUE)
_IDX_QUEUE = Entry("idx_queue", ("queues", "idx"), IDX_QUEUE)
_QUEUE_PTR = Entry("queue_ptr", ("queues", "ptr"), POINTER)
_STAGE1_BUFFERS = (_IMAGE_QUEUE, _TEXT_QUEUE, _IDX_QUEUE, _QUEUE_PTR)
_TGIR_BUFFERS = (
    _IMAGE_QUEUE,
    Entry("img_queue_ptr", ("queues", "image_ptr"), POINTER),
    Entry("fusion_queue", ("queues", "fusion"), QUEUE),
    Entry("fusion_queue_ptr", ("queues", "fusion_ptr"), POINTER),
)
_HEADS = ("phrase_module", "decoder_layer", "replace_predict_layer")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    summary: str
    buffers: tuple[Entry, ...]
    # fine_jax modules (top-level parameter names) this layout does not have, online / momentum.
    lacks: tuple[str, ...] = ()
    lacks_momentum: tuple[str, ...] = ()
    # Reference keys that some files of this layout have and others do not.
    optional: tuple[str, ...] = ()
    # Keys the reference's own loading discards (regular expressions).
    ignored: tuple[str, ...] = ()
    # "bert." is removed from every key, as the reference does for ALBEF checkpoints.
    strip_bert: bool = False
    # Whether fine_jax can write this layout (the stage layouts of Fashion-FINE itself).
    exportable: bool = True
    # The fine_jax model variant (stage tree) the layout converts into.
    variant: str = "pretrain"

    def normalise(self, state_dict: Mapping) -> dict:
        if not self.strip_bert:
            return dict(state_dict)
        return {key.replace("bert.", ""): value for key, value in state_dict.items()}

    def is_ignored(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.ignored)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("pretrain", "Fashion-FINE stage 1 (pre-training)", _STAGE1_BUFFERS),
    Layout("retrieval", "Fashion-FINE stage 2 (retrieval fine-tuning)",
           (_IMAGE_QUEUE, _TEXT_QUEUE, _QUEUE_PTR), lacks=_HEADS, variant="retrieval"),
    Layout("tgir", "Fashion-FINE stage 3 (text-guided image retrieval)", _TGIR_BUFFERS,
           lacks=("maa", "itm_head") + _HEADS, variant="tgir"),
    Layout("fashionsap", "FashionSAP pre-training", _STAGE1_BUFFERS,
           lacks=("maa", "phrase_module"), optional=("idx_queue",), exportable=False),
    Layout("albef", "ALBEF-4M/14M", _STAGE1_BUFFERS,
           lacks=("combine_vision_proj", "combine_text_proj", "maa") + _HEADS,
           lacks_momentum=("combine_vision_proj", "combine_text_proj"), optional=("idx_queue",),
           ignored=(r"^text_encoder(_m)?\.cls\.",), strip_bert=True, exportable=False),
)}
EXPORT_LAYOUTS = tuple(name for name, layout in LAYOUTS.items() if layout.exportable)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}") from None


def detect_layout(keys) -> Layout:
    """The layout of a state_dict from its keys (method_spec §1.1 and §5.3 tell them apart)."""
    keys = set(keys)
    if any(k.startswith(("text_encoder.bert.", "text_encoder_m.bert.")) for k in keys):
        return LAYOUTS["albef"]
    if "fusion_queue" in keys:
        return LAYOUTS["tgir"]
    if "W_v" in keys:
        return LAYOUTS["pretrain" if "unigram_conv.weight" in keys else "retrieval"]
    if "combine_vision_proj.weight" in keys:
        return LAYOUTS["fashionsap"]
    sample = ", ".join(sorted(keys)[:8]) or "(no keys)"
    raise LayoutError(f"cannot tell the checkpoint layout from its keys ({sample}, ...); "
                      f"pass the layout explicitly, one of: {', '.join(LAYOUTS)}")
