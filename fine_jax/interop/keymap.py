"""How fine_jax parameter paths and array layouts correspond to the reference PyTorch state_dict.

The fine_jax modules carry the reference names (method_spec §1.1), so a parameter's reference key is
its Flax path with a handful of renames (``blocks_3`` -> ``blocks.3``, ``layer_7`` ->
``encoder.layer.7``, ``kernel``/``scale``/``embedding`` -> ``weight``, the MAA and phrase
convolutions at the top level, the HF names of the two prediction heads). Entries are generated
from a (possibly abstract) parameter tree, so the map holds at every model size.

Array layouts (method_spec §1.10): PyTorch Linear (out, in) is Flax Dense (in, out); Conv1d
(out, in, k) is Flax Conv (k, in, out); the patch Conv2d (out, in, kh, kw) is (kh, kw, in, out).
The reference keeps queues as (E, Q) columns, fine_jax as (Q, E) rows; ``idx_queue`` (1, Q) and the
pointers (1,) are int64 there and int32 here. Every transform is a transpose or an exact cast, so a
round trip reproduces every array bit for bit.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Converts one array between the reference layout and the fine_jax layout."""

    name: str
    to_fine: Callable[[np.ndarray], np.ndarray]
    to_reference: Callable[[np.ndarray], np.ndarray]
    reference_shape: Callable[[tuple], tuple]


def _float_permute(name: str, to_fine_axes=None, to_reference_axes=None) -> Transform:
    """A float32 transpose each way (``None``: same layout). Float32 input is not copied."""

    def to_fine(a):
        a = np.asarray(a, np.float32)
        return a if to_fine_axes is None else a.transpose(to_fine_axes)

    def to_reference(a):
        a = np.asarray(a, np.float32)
        return a if to_reference_axes is None else a.transpose(to_reference_axes)

    def reference_shape(shape):
        return tuple(shape) if to_reference_axes is None else tuple(shape[i] for i in to_reference_axes)

    return Transform(name, to_fine, to_reference, reference_shape)


def _int32(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got {a.dtype}")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what} holds values outside int32")
    return a.astype(np.int32)


SAME = _float_permute("same")
LINEAR = _float_permute("linear", (1, 0), (1, 0))
CONV1D = _float_permute("conv1d", (2, 1, 0), (2, 1, 0))
CONV2D = _float_permute("conv2d", (2, 3, 1, 0), (3, 2, 0, 1))
QUEUE = _float_permute("queue", (1, 0), (1, 0))
IDX_QUEUE = Transform(
    "idx_queue",
    lambda a: _int32(a, "idx_queue").reshape(-1),
    lambda a: np.asarray(a).astype(np.int64).reshape(1, -1),
    lambda shape: (1,) + tuple(shape))
POINTER = Transform(
    "pointer",
    lambda a: _int32(a, "queue pointer").reshape(()),
    lambda a: np.asarray(a).astype(np.int64).reshape(1),
    lambda shape: (1,))
_KERNELS = {2: LINEAR, 3: CONV1D, 4: CONV2D}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One reference key, where its array lives in the fine_jax tree, and how it is laid out.

    ``path`` starts with the tree part: ``params``, ``momentum``, ``queues`` or ``extras``.
    ``resizable`` marks ViT position embeddings, which are interpolated when the grid differs.
    """

    key: str
    path: Path
    transform: Transform
    resizable: bool = False


# Flax path (joined with "/") -> reference path, applied in order.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^maa/", ""),
    (r"^phrase_module/", ""),
    (r"^decoder_layer/(dense|LayerNorm)/", r"decoder_layer/predictions/transform/\1/"),
    (r"^decoder_layer/decoder/", "decoder_layer/predictions/decoder/"),
    (r"^replace_predict_layer/dense/", "replace_predict_layer/dense_layer/"),
    (r"^replace_predict_layer/LayerNorm/", "replace_predict_layer/norm_layer/"),
    (r"^replace_predict_layer/decoder/", "replace_predict_layer/predict_layer/"),
    (r"^visual_encoder/blocks_(\d+)/", r"visual_encoder/blocks/\1/"),
    (r"^text_encoder/layer_(\d+)/", r"text_encoder/encoder/layer/\1/"),
    (r"/intermediate/", "/intermediate/dense/"),
    (r"/(kernel|scale|embedding)$", "/weight"),
)


def reference_key(path: Path, module_suffix: str = "") -> str:
    """The reference key of a parameter at Flax ``path`` (module path, no tree part).

    ``module_suffix`` is appended to the top-level module name: ``_m`` names the momentum copy.
    """
    name = "/".join(path)
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    head, _, rest = name.partition("/")
    return (head + module_suffix + ("." + rest if rest else "")).replace("/", ".")


def _transform_for(path: Path, ndim: int) -> Transform:
    return _KERNELS[ndim] if path[-1] == "kernel" else SAME


def param_entries(tree: Mapping, part: str = "params", module_suffix: str = "") -> list[Entry]:
    """Entries for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    entries = []
    for path, leaf in traverse_util.flatten_dict(tree).items():
        entries.append(Entry(
            key=reference_key(path, module_suffix),
            path=(part,) + path,
            transform=_transform_for(path, len(leaf.shape)),
            resizable=path[0] == "visual_encoder" and path[-1] == "pos_embed"))
    return entries


def get_path(tree: Mapping, path: Path):
    for name in path:
        tree = tree[name]
    return tree


def has_path(tree: Mapping, path: Path) -> bool:
    try:
        get_path(tree, path)
    except (KeyError, TypeError):
        return False
    return True


def format_path(path: Path) -> str:
    return "/".join(path)


def uncovered(paths, covered) -> list[str]:
    """The largest subtrees of ``paths`` (full leaf paths) none of whose leaves is in ``covered``.

    Reports say "params/maa" rather than listing its three leaves, and
    "params/text_encoder/layer_6/crossattention" when the rest of that layer is there.
    """
    covered_prefixes = {path[:n] for path in covered for n in range(1, len(path) + 1)}
    groups = set()
    for path in paths:
        if path in covered:
            continue
        n = next(n for n in range(1, len(path) + 1) if path[:n] not in covered_prefixes)
        groups.add(path[:n])
    return sorted(format_path(g) for g in groups)
