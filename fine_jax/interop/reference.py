"""Reference PyTorch state_dicts <-> the fine_jax weights tree (pure numpy; torch is not needed).

The weights tree is what a converted checkpoint holds::

    {"params":   every online parameter of the layout's model variant (VARIANT_MODULES),
     "momentum": the six EMA modules of MOMENTUM_MODULES,
     "queues":   stage 1: {"image": (Q, E), "text": (Q, E), "idx": (Q,), "ptr": ()}
                 stage 2: {"image", "text", "ptr"}
                 stage 3: {"image": (Q, E), "fusion": (Q, E), "image_ptr": (), "fusion_ptr": ()}}

Conversion runs in two steps. :func:`plan_conversion` matches keys, checks every shape against the
model config and transposes (no copies for float32 inputs, so it is cheap at any size); it reports
what was mapped, what the file lacks and what it has beyond the model. :func:`fill_missing` then
completes the tree. What a checkpoint does not provide keeps a documented initial value:

* parameters: fine_jax's own initialisation (the reference's initialisers, method_spec §1.9) with
  ``PRNGKey(seed)``, which is what the reference's ``load_state_dict(strict=False)`` leaves in place;
* momentum parameters: a copy of the online parameter after conversion (the reference copies the
  online weights into the momentum modules when it builds the model);
* queues: random normal rows, normalised, idx -100, pointer 0 (``momentum.init_queues``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fine_jax.interop.keymap import (Entry, format_path, get_path, has_path, param_entries,
                                     uncovered)
from fine_jax.interop.layouts import Layout, LayoutError, detect_layout, get_layout
from fine_jax.interop.posembed import interpolate_pos_embed
from fine_jax.models.fine import (MOMENTUM_MODULES, VARIANT_MODULES, FashionFINE, ModelConfig,
                                  init_params)
from fine_jax.momentum import init_queues, init_tgir_queues

WEIGHT_PARTS = ("params", "momentum", "queues")

# HF's MLM head ties ``predictions.bias`` to ``predictions.decoder.bias``: both keys are saved and
# always hold the same values.
TIED_KEYS = {"decoder_layer.predictions.bias": "decoder_layer.predictions.decoder.bias"}
# Buffers of the BERT embeddings (online, momentum): 0 .. max_positions-1, nothing to convert.
POSITION_IDS = {"params": "text_encoder.embeddings.position_ids",
                "momentum": "text_encoder_m.embeddings.position_ids"}


class ConversionError(ValueError):
    """The file does not fit the model: the message names every offending key."""


@dataclasses.dataclass
class ConversionReport:
    layout: str
    mapped: list[str] = dataclasses.field(default_factory=list)
    interpolated: list[str] = dataclasses.field(default_factory=list)
    filled: list[str] = dataclasses.field(default_factory=list)  # fine_jax subtrees kept at init
    missing: list[str] = dataclasses.field(default_factory=list)  # layout keys the file lacks
    unused: list[str] = dataclasses.field(default_factory=list)  # file keys with no place
    ignored: list[str] = dataclasses.field(default_factory=list)  # file keys the reference drops

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unused

    def lines(self) -> list[str]:
        out = [f"layout: {self.layout}", f"mapped: {len(self.mapped)} arrays"]
        for title, items in (("position embeddings interpolated", self.interpolated),
                             ("missing from the file (keep their initial value)", self.missing),
                             ("unused keys of the file (dropped)", self.unused),
                             ("ignored keys (the reference drops them too)", self.ignored),
                             ("not provided by this layout (keep their initial value)", self.filled)):
            if items:
                out.append(f"{title}: {len(items)}")
                out.extend(f"  {item}" for item in items)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Plan:
    """A matched and shape-checked conversion, before the missing parts are filled."""

    layout: Layout
    abstract: dict  # the complete weights tree as ShapeDtypeStructs
    arrays: dict  # full path -> converted array
    report: ConversionReport


# ------------------------------------------------------------------------------------------------
# Shapes and entries
# ------------------------------------------------------------------------------------------------
def abstract_params(model_config: ModelConfig) -> dict:
    """The parameter tree of a model config, as shapes (nothing is allocated)."""
    model = FashionFINE(model_config)
    return jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))


def abstract_queues(variant: str, queue_size: int, embed_dim: int) -> dict:
    """The queues of a model variant's train state, as ShapeDtypeStructs."""
    sds = jax.ShapeDtypeStruct
    queue, pointer = sds((queue_size, embed_dim), jnp.float32), sds((), jnp.int32)
    if variant == "tgir":
        return {"image": queue, "fusion": queue, "image_ptr": pointer, "fusion_ptr": pointer}
    queues = {"image": queue, "text": queue, "ptr": pointer}
    if variant == "pretrain":
        queues["idx"] = sds((queue_size,), jnp.int32)
    return queues


def abstract_weights(params: Mapping, queue_size: int, embed_dim: int, layout: Layout) -> dict:
    """The weights tree a layout converts into, as ShapeDtypeStructs."""
    return {
        "params": params,
        "momentum": {name: params[name] for name in MOMENTUM_MODULES},
        "queues": abstract_queues(layout.variant, queue_size, embed_dim),
    }


def layout_entries(layout: Layout, weights: Mapping) -> list[Entry]:
    """Every key of ``layout`` for a weights tree (arrays or shapes), with its place in the tree."""
    params = {k: v for k, v in weights["params"].items() if k not in layout.lacks}
    momentum = {k: v for k, v in weights["momentum"].items() if k not in layout.lacks_momentum}
    return (param_entries(params, "params") + param_entries(momentum, "momentum", "_m")
            + list(layout.buffers))


def _queue_size(state_dict: Mapping, default: int) -> int:
    for key in ("image_queue", "text_queue", "fusion_queue", "idx_queue"):
        if key in state_dict and np.ndim(state_dict[key]) == 2:
            return int(np.shape(state_dict[key])[1])
    return default


# ------------------------------------------------------------------------------------------------
# Reference -> fine_jax
# ------------------------------------------------------------------------------------------------
class ArrayError(ConversionError):
    """One array that does not fit the model config (its shape, or integers that are not)."""


def convert_array(entry: Entry, value, fine_shape: tuple) -> tuple[np.ndarray, bool]:
    """-> (the fine_jax array of one entry, whether its position grid was interpolated).

    Raises :class:`ArrayError` naming the key, the file's shape and the shape the config needs.
    """
    expected = entry.transform.reference_shape(fine_shape)
    shape = tuple(np.shape(value))
    if shape != expected and entry.resizable and len(shape) == 3 and shape[::2] == expected[::2]:
        return entry.transform.to_fine(interpolate_pos_embed(np.asarray(value), expected[1])), True
    if shape != expected:
        raise ArrayError(f"{entry.key}: the file has {shape}, the model config needs {expected} "
                         f"(fine_jax {format_path(entry.path)} {tuple(fine_shape)})")
    try:
        return entry.transform.to_fine(value), False
    except ValueError as e:  # an index queue or pointer that does not hold int32 integers
        raise ArrayError(f"{entry.key}: {e}") from None


def convert_entries(state_dict: Mapping, entries, abstract: Mapping, report: ConversionReport,
                    errors: list, key_in_file=lambda key: key) -> dict:
    """Converts every entry whose key the file has; records mapped/missing/interpolated keys in
    ``report`` and shape mismatches in ``errors``. Returns {full path: array}."""
    arrays = {}
    for entry in entries:
        key = key_in_file(entry.key)
        if key not in state_dict:
            report.missing.append(key)
            continue
        try:
            array, resized = convert_array(entry, state_dict[key], get_path(abstract, entry.path).shape)
        except ArrayError as e:
            errors.append(str(e))
            continue
        if resized:
            report.interpolated.append(f"{key}: {np.shape(state_dict[key])[1]} -> "
                                       f"{array.shape[1]} tokens")
        arrays[entry.path] = array
        report.mapped.append(key)
    return arrays


def _check_buffers(state_dict: Mapping, params: Mapping, consumed: set, errors: list) -> None:
    """position_ids (shape only: the values are 0..P-1 by construction) and the tied MLM bias."""
    if "text_encoder" in params:
        positions = params["text_encoder"]["embeddings"]["position_embeddings"]["embedding"].shape[0]
        for key in POSITION_IDS.values():
            if key in state_dict:
                consumed.add(key)
                if tuple(np.shape(state_dict[key])) != (1, positions):
                    errors.append(f"{key}: the file has {tuple(np.shape(state_dict[key]))}, the model "
                                  f"config needs {(1, positions)}")
    for alias, key in TIED_KEYS.items():
        if alias in state_dict and key in state_dict:
            consumed.add(alias)
            if not np.array_equal(np.asarray(state_dict[alias]), np.asarray(state_dict[key])):
                errors.append(f"{alias} differs from {key}; the reference ties the two")


def plan_conversion(state_dict: Mapping, model_config: ModelConfig, layout: str | None = None,
                    queue_size: int = 65536, params: Mapping | None = None) -> Plan:
    """Matches the keys of a reference state_dict and converts what fits the model config.

    ``layout`` is detected from the keys when not given. ``queue_size`` is used only when the file
    holds no queue. ``params`` (the abstract parameter tree) saves recomputing it. Raises
    :class:`ConversionError` listing every array whose shape does not fit.
    """
    layout = get_layout(layout) if layout else detect_layout(state_dict.keys())
    state_dict = layout.normalise(state_dict)
    model_config = dataclasses.replace(model_config, variant=layout.variant)
    params = params if params is not None else abstract_params(model_config)
    abstract = abstract_weights(params, _queue_size(state_dict, queue_size), model_config.embed_dim,
                                layout)
    report = ConversionReport(layout=layout.name)
    errors = []
    entries = [e for e in layout_entries(layout, abstract)
               if e.key in state_dict or e.key not in layout.optional]
    arrays = convert_entries(state_dict, entries, abstract, report, errors)
    consumed = {e.key for e in entries if e.key in state_dict}
    missing_paths = {e.path for e in entries if e.key not in state_dict}
    _check_buffers(state_dict, params, consumed, errors)
    if errors:
        raise ConversionError(f"{len(errors)} arrays of the {layout.name} checkpoint do not fit the "
                              "model config (shapes in the reference layout; the model sizes come "
                              "from --config):\n  " + first_lines(errors))
    for key in sorted(set(state_dict) - consumed):
        (report.ignored if layout.is_ignored(key) else report.unused).append(key)
    report.filled = uncovered(traverse_util.flatten_dict(abstract), set(arrays) | missing_paths)
    return Plan(layout, abstract, arrays, report)


def first_lines(lines: list[str], count: int = 20) -> str:
    """The first ``count`` lines of a list of problems, indented, and how many more there are."""
    more = f"\n  ... and {len(lines) - count} more" if len(lines) > count else ""
    return "\n  ".join(lines[:count]) + more


def check_complete(report: ConversionReport, allow_partial: bool) -> None:
    """Refuses a partial load unless asked: missing and unused keys are listed by name."""
    if report.complete or allow_partial:
        return
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} keys of the {report.layout} layout are missing from the "
                     "file:\n  " + "\n  ".join(report.missing))
    if report.unused:
        parts.append(f"{len(report.unused)} keys of the file have no place in the model:\n  "
                     + "\n  ".join(report.unused))
    raise ConversionError("\n".join(parts) + "\nRefusing a partial load; pass --allow_partial to "
                          "convert anyway (missing arrays keep their initial value, unused keys "
                          "are dropped), or --layout to choose another layout.")


@functools.lru_cache(maxsize=4)
def _initializer(model_config: ModelConfig):
    """The jitted ``init_params`` of a model config, compiled once per process."""
    return jax.jit(functools.partial(init_params, FashionFINE(model_config)))


def fill_missing(plan: Plan, model_config: ModelConfig, seed: int = 0) -> dict:
    """The complete weights tree (numpy): converted arrays plus the documented initial values."""
    flat_abstract = traverse_util.flatten_dict(plan.abstract)
    flat = dict(plan.arrays)
    todo = [p for p in flat_abstract if p not in flat]
    key = jax.random.PRNGKey(seed)
    if any(p[0] == "params" for p in todo):
        init = traverse_util.flatten_dict(jax.device_get(_initializer(model_config)(key)))
        flat.update({p: np.asarray(init[p[1:]]) for p in todo if p[0] == "params"})
    for p in todo:
        if p[0] == "momentum":
            flat[p] = np.array(flat[("params",) + p[1:]])
    if any(p[0] == "queues" for p in todo):
        q, e = flat_abstract[("queues", "image")].shape
        k = jax.random.fold_in(key, 1)
        fresh = jax.device_get(init_tgir_queues(k, q, e) if plan.layout.variant == "tgir"
                               else init_queues(k, q, e))
        flat.update({p: np.asarray(fresh[p[1]]) for p in todo if p[0] == "queues"})
    return traverse_util.unflatten_dict(flat)


def convert_state_dict(state_dict: Mapping, model_config: ModelConfig, layout: str | None = None,
                       allow_partial: bool = False, seed: int = 0,
                       queue_size: int = 65536) -> tuple[dict, ConversionReport]:
    """A reference state_dict -> (complete fine_jax weights tree, report)."""
    plan = plan_conversion(state_dict, model_config, layout, queue_size)
    check_complete(plan.report, allow_partial)
    model_config = dataclasses.replace(model_config, variant=plan.layout.variant)
    return fill_missing(plan, model_config, seed), plan.report


# ------------------------------------------------------------------------------------------------
# fine_jax -> reference
# ------------------------------------------------------------------------------------------------
def export_state_dict(weights: Mapping, layout: str = "pretrain") -> dict[str, np.ndarray]:
    """A weights tree -> the reference state_dict of ``layout`` (names, shapes, dtypes)."""
    layout_ = get_layout(layout)
    if not layout_.exportable:
        raise LayoutError(f"fine_jax does not write the {layout} layout; choose one of "
                          "pretrain, retrieval, tgir")
    weights = {part: weights.get(part, {}) for part in WEIGHT_PARTS}
    needed = [m for m in VARIANT_MODULES[layout_.variant] if m not in layout_.lacks]
    absent = [m for m in needed if m not in weights["params"]]
    if absent:
        raise ConversionError(
            f"the checkpoint has no {', '.join(absent)}, which a {layout} state_dict holds (it is "
            f"a {layout_.variant} model's checkpoint only if it has them); choose another --layout")
    state_dict = {}
    for entry in layout_entries(layout_, weights):
        if not has_path(weights, entry.path):
            raise ConversionError(
                f"the checkpoint has no {format_path(entry.path)}, which the {layout} layout needs "
                f"for {entry.key}: a {layout} state_dict needs a checkpoint of that stage (a stage-3 "
                "run, or weights converted from a stage-3 file), so choose another --layout")
        # np.asarray(order="C"), unlike np.ascontiguousarray, keeps 0-d arrays (temp) 0-d.
        state_dict[entry.key] = np.asarray(entry.transform.to_reference(
            get_path(weights, entry.path)), order="C")
    for part, key in POSITION_IDS.items():
        tower = weights[part].get("text_encoder")
        if tower is not None:
            positions = tower["embeddings"]["position_embeddings"]["embedding"].shape[0]
            state_dict[key] = np.arange(positions, dtype=np.int64)[None]
    for alias, key in TIED_KEYS.items():
        if key in state_dict:
            state_dict[alias] = state_dict[key].copy()
    return state_dict

