"""Reading and writing weight files: PyTorch pickles, safetensors, Hugging Face model folders.

Everything here returns or takes plain ``{name: numpy array}`` dicts. torch is imported inside the
two functions that need it (reading a pickle, writing a ``.pth``), so importing fine_jax never
imports torch; it comes with ``pip install -e ".[torch]"``.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping

import numpy as np

TORCH_HINT = ('PyTorch is needed to read and write .pth/.bin files: pip install -e ".[torch]" '
              "(the CPU wheel torch==2.13.0 is enough)")
# Keys under which training scripts (ALBEF, FashionSAP, Fashion-FINE, timm/DeiT) nest the weights.
_WRAPPER_KEYS = ("model", "state_dict", "module")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class WeightsFileError(ValueError):
    """A weight file that is missing, unreadable or not a state_dict."""


def _import_torch():
    try:
        import torch
    except ImportError:
        raise WeightsFileError(TORCH_HINT) from None
    return torch


def _tensor_to_numpy(name: str, value) -> np.ndarray:
    torch = _import_torch()
    if not isinstance(value, torch.Tensor):
        raise WeightsFileError(f"{name} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
    return value.numpy()


def unwrap_state_dict(obj, source: str = "the file") -> dict:
    """The parameter dict inside a training checkpoint (``{"model": ...}`` and similar wrappers).

    A leading ``module.`` on every key (DistributedDataParallel) is removed.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{source} holds no state_dict (a dict of named tensors)")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def read_torch_file(path: pathlib.Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """A ``torch.save`` file -> {name: array}.

    Loads with ``weights_only=True`` (no code from the file runs) unless ``trust_pickle``: some
    training checkpoints pickle other objects (an argparse Namespace, say) beside the weights.
    """
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises many kinds; all mean "cannot read this file"
        hint = ("" if trust_pickle else "\nIf the file comes from a source you trust and pickles "
                "objects besides tensors, pass --trust_pickle.")
        raise WeightsFileError(f"cannot read {path} with torch.load: {e}{hint}") from None
    state_dict = unwrap_state_dict(obj, str(path))
    return {name: _tensor_to_numpy(name, value) for name, value in state_dict.items()}


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise WeightsFileError(f"cannot read {path} as safetensors: {e}") from None


def _read_hf_folder(folder: pathlib.Path, trust_pickle: bool) -> dict[str, np.ndarray]:
    """A Hugging Face model folder: model.safetensors (single or sharded) or pytorch_model.bin."""
    for name in _HF_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(read_safetensors(folder / shard))
            return out
        return read_weights(path, trust_pickle)
    raise WeightsFileError(f"{folder} holds none of {', '.join(_HF_WEIGHT_FILES)}")


def read_weights(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """{name: array} from a ``.pth``/``.bin``/``.pt`` pickle, a ``.safetensors`` file or an HF folder."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        return _read_hf_folder(path, trust_pickle)
    if not path.is_file():
        raise WeightsFileError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path, trust_pickle)


def write_torch_file(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                     wrap_key: str | None = "model", overwrite: bool = False) -> pathlib.Path:
    """Writes ``{wrap_key: state_dict}`` (the reference's checkpoint format) with ``torch.save``.

    Written to a temporary file beside ``path`` and renamed into place, so a failure never leaves
    a half-written file under the final name.
    """
    torch = _import_torch()
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.from_numpy(np.asarray(a, order="C")) for name, a in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({wrap_key: tensors} if wrap_key else tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None,
                      overwrite: bool = False) -> pathlib.Path:
    """Writes ``arrays`` (and string ``metadata``) as a ``.safetensors`` file, through a temporary
    file beside ``path`` renamed into place, so a failure never leaves a half-written file."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({name: np.ascontiguousarray(a) for name, a in arrays.items()}, str(tmp),
                  metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
