"""Where a fresh training run takes its initial weights from: the ``init`` block of the config.

* ``init.checkpoint``: a weights checkpoint from ``python -m fine_jax.convert`` (or a training
  workdir). Its params, momentum parameters and, with ``init.queues``, queues replace the random
  ones; the run still starts at step 0 with a fresh optimiser, as the reference's stages 2 and 3
  start from a stage-1 checkpoint (method_spec §1.6-§1.7).
* ``init.bert`` / ``init.vit``: public tower weights (``fine_jax.interop.towers``); the momentum
  copies are then copies of the new online weights, as the reference builds them.

Resuming a workdir ignores all of this: its own checkpoint wins.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import traverse_util

from fine_jax.checkpoint import WeightsNotFound, read_weights
from fine_jax.config import ConfigError
from fine_jax.interop import io, towers
from fine_jax.interop.reference import ConversionError
from fine_jax.models.fine import momentum_subset

# Model settings that change what the weights compute without changing any shape.
ARCHITECTURE_FIELDS = ("vision_heads", "num_heads", "fusion_layer", "vision_ln_eps", "bert_ln_eps")


def requested(cfg) -> bool:
    init = cfg.get("init")
    return bool(init and (init.checkpoint or init.bert or init.vit))


def _check_shapes(name: str, ours, theirs) -> None:
    ours, theirs = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(theirs)
    problems = [f"{'/'.join(p)}: checkpoint {tuple(np.shape(theirs[p]))}, config "
                f"{tuple(np.shape(ours[p]))}" for p in sorted(set(ours) & set(theirs))
                if np.shape(ours[p]) != np.shape(theirs[p])]
    missing = [f"{'/'.join(p)}: not in the checkpoint" for p in sorted(set(ours) - set(theirs))]
    if problems or missing:
        raise ConfigError(f"init.checkpoint {name} do not fit the model config:\n  "
                          + "\n  ".join((problems + missing)[:30]))


def _check_architecture(cfg, info: dict) -> None:
    saved = info.get("config", {}).get("model", {})
    diff = [f"model.{f}: checkpoint {saved[f]}, config {cfg.model[f]}" for f in ARCHITECTURE_FIELDS
            if f in saved and saved[f] != cfg.model[f]]
    if diff:
        raise ConfigError("init.checkpoint was made for another model: " + "; ".join(diff))


def from_checkpoint(cfg, state: dict, log=print) -> dict:
    """``state`` with params, momentum (and queues) read from ``init.checkpoint``.

    Module by module and queue by queue, by name, as the reference's ``load_state_dict(...,
    strict=False)`` between stages: what the checkpoint has and this stage's model does not is
    dropped (stage 1's MLM head in stage 2), what this model has and the checkpoint does not
    keeps its fresh value and is listed (stage 3's fusion queue from a stage-1 checkpoint; its
    image-queue pointer, which the reference names differently per stage, starts at 0).
    A workdir gives its best evaluated step by default (``init.checkpoint_step``).
    """
    parts = ("params", "momentum", "queues") if cfg.init.queues else ("params", "momentum")
    step = str(cfg.init.checkpoint_step)
    try:
        weights, info = read_weights(cfg.init.checkpoint, parts,
                                     step=int(step) if step.isdigit() else step, log=log)
    except WeightsNotFound as e:
        raise ConfigError(f"init.checkpoint: {e}") from None
    _check_architecture(cfg, info)
    state = dict(state)
    kept = []
    for part in parts:
        if part not in weights:
            raise ConfigError(f"init.checkpoint {cfg.init.checkpoint} holds no {part}")
        ours, theirs = state[part], weights[part]
        taken = {k: theirs[k] for k in ours if k in theirs}
        if part == "queues":
            size = next(v.shape[0] for k, v in theirs.items() if np.ndim(v) >= 1)
            if size != cfg.loss.queue_size:
                raise ConfigError(
                    f"init.checkpoint has queues of {size} entries but loss.queue_size="
                    f"{cfg.loss.queue_size}; set --config.loss.queue_size={size} or start with fresh "
                    "queues: --config.init.queues=False")
        elif part == "params" and not taken:
            raise ConfigError(f"init.checkpoint {cfg.init.checkpoint} holds none of this model's "
                              "modules")
        _check_shapes(part, {k: ours[k] for k in taken}, taken)
        kept += [f"{part}/{k}" for k in ours if k not in theirs]
        state[part] = {**ours, **taken}
    log(f"initialised {', '.join(parts)} from {cfg.init.checkpoint}"
        + (f" (step {info['step']})" if info.get("step") is not None else ""))
    if kept:
        log(f"  not in the checkpoint, kept at their initial values: {', '.join(kept)}")
    return state


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _read_tower_file(spec: str, allow_download: bool) -> dict:
    """A local file or folder; a Hugging Face hub id only when downloads are allowed."""
    if pathlib.Path(spec).expanduser().exists():
        return io.read_weights(spec)
    if spec.startswith(("/", ".", "~")) or pathlib.Path(spec).suffix in _WEIGHT_SUFFIXES:
        raise ConfigError(f"{spec}: no such file or folder")
    if not allow_download:
        raise ConfigError(f"{spec} is not a local file or folder; to fetch it from the Hugging Face "
                          "hub, set --config.init.allow_download=True")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin"])
    return io.read_weights(folder)


def from_towers(cfg, state: dict, log=print) -> dict:
    """``state`` with the BERT and/or ViT tower filled from ``init.bert`` / ``init.vit``."""
    host = jax.device_get(state["params"])
    params = traverse_util.flatten_dict({"params": host})
    for spec, load in ((cfg.init.bert, towers.bert_tower), (cfg.init.vit, towers.vit_tower)):
        if not spec:
            continue
        try:
            arrays, report = load(_read_tower_file(spec, cfg.init.allow_download), host)
        except (ConversionError, io.WeightsFileError) as e:
            hint = ""
            if isinstance(e, ConversionError) and load is towers.vit_tower:
                hint = ("\n(to train the ViT from random weights instead, pass --config.init.vit= "
                        "with nothing after the =)")
            raise ConfigError(f"{spec}: {e}{hint}") from None
        params.update(arrays)
        log(f"initialised from {spec}:")
        for line in report.lines():
            log(f"  {line}")
    new_params = traverse_util.unflatten_dict(params)["params"]
    state = dict(state, params=new_params)
    state["momentum"] = jax.tree_util.tree_map(np.copy, momentum_subset(new_params))
    return state


def initialise(cfg, state: dict, log=print) -> dict:
    """Applies the ``init`` block to a freshly created train state (numpy leaves where replaced)."""
    if cfg.init.checkpoint:
        return from_checkpoint(cfg, state, log)
    return from_towers(cfg, state, log)
