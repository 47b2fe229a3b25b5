"""One orbax CheckpointManager per workdir: the train state plus the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a half-written checkpoint that a restart would pick up.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the state into the structure/shardings of ``abstract_state`` and, if given,
        moves ``data_iterator`` to the position saved with it."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is None:
            return
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = None


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a concrete state, for restore."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


# ----------------------------------------------------------------------------------------------
# Weights checkpoints: params, momentum, queues and extras, without optimiser or data state.
# What `python -m fine_jax.convert` writes and `init.checkpoint`, `fine_jax.export` and
# `fine_jax.api` read; the readers also take a training workdir (one of its steps).
# ----------------------------------------------------------------------------------------------
WEIGHTS_INFO = "fine_jax_weights.json"
WEIGHTS_ITEM = "weights"
WEIGHTS_FORMAT = "fine_jax_weights/1"


class WeightsNotFound(FileNotFoundError):
    """The path is neither a weights checkpoint nor a training workdir with checkpoints."""


def save_weights(directory: str | pathlib.Path, weights: dict, info: dict, overwrite: bool = False,
                 files: dict | None = None) -> pathlib.Path:
    """Writes ``weights`` (an orbax pytree checkpoint) and ``info`` (JSON) into ``directory``,
    with copies of ``files`` ({name in the checkpoint: source path}) beside them.

    Everything is written into a hidden sibling directory first and renamed into place at the
    end, so a failure or an interruption never leaves a half-written checkpoint under the name.
    """
    directory = pathlib.Path(directory).expanduser().absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass --overwrite to replace it")
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
            staging / WEIGHTS_ITEM, args=ocp.args.StandardSave(weights))
        (staging / WEIGHTS_INFO).write_text(json.dumps(dict(info, format=WEIGHTS_FORMAT), indent=1))
        for name, source in (files or {}).items():
            shutil.copyfile(source, staging / name)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


BEST_DIR = "best"  # WORKDIR/best: the best evaluated step, a weights checkpoint


def _training_steps(checkpoints: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def best_info(workdir: str | pathlib.Path) -> dict | None:
    """The info of a workdir's best checkpoint (step, criterion, value, results), or None."""
    info = pathlib.Path(workdir) / BEST_DIR / WEIGHTS_INFO
    return json.loads(info.read_text()) if info.is_file() else None


def locate_weights(path: str | pathlib.Path, step: int | str | None = None,
                   log=None) -> tuple[pathlib.Path, dict]:
    """-> (the orbax pytree directory to read, info) for a weights checkpoint or a workdir.

    For a training workdir ``step`` chooses: ``"best"`` (its best evaluated step, kept in
    ``WORKDIR/best``; the latest step when it has none), ``"latest"`` or None (the latest), or a
    step number. The info holds the workdir's ``config.json`` and the step. For a weights
    checkpoint ``step`` must be None or "best"/"latest"; the info is its ``fine_jax_weights.json``.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if (path / WEIGHTS_INFO).is_file():
        if step not in (None, "best", "latest"):
            raise WeightsNotFound(f"{path} is a weights checkpoint: it has no step {step}")
        return path / WEIGHTS_ITEM, json.loads((path / WEIGHTS_INFO).read_text())
    checkpoints = path / "checkpoints"
    steps = _training_steps(checkpoints) if checkpoints.is_dir() else []
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if step == "best" and (path / BEST_DIR / WEIGHTS_INFO).is_file():
        item, info = locate_weights(path / BEST_DIR)
        if log:
            log(f"{path}: the best checkpoint, step {info.get('step')} "
                f"({info.get('criterion')} = {info.get('value', float('nan')):.2f})")
        return item, dict(info, config=config or info.get("config", {}),
                          source={"workdir": str(path), "step": info.get("step"), "best": True})
    if not steps:
        raise WeightsNotFound(f"{path} is neither a fine_jax weights checkpoint (no {WEIGHTS_INFO}; "
                              "write one with python -m fine_jax.convert) nor a training workdir "
                              "with checkpoints")
    if step in (None, "best", "latest"):
        if step == "best" and log:
            log(f"{path} has no best checkpoint (it was never evaluated): using its latest step "
                f"{steps[-1]}")
        step = steps[-1]
    step = int(step)
    if step not in steps:
        raise WeightsNotFound(f"{checkpoints} has no step {step}; it has {steps}")
    return checkpoints / str(step) / "state", {"config": config, "source": {
        "workdir": str(path), "step": step}, "step": step}


def read_weights(path: str | pathlib.Path, parts=("params", "momentum", "queues", "extras"),
                 step: int | str | None = None, log=None) -> tuple[dict, dict]:
    """-> ({part: numpy tree} for the ``parts`` the checkpoint has, info); see ``locate_weights``.

    Only the requested parts are read from disk (a training state's optimiser moments are not).
    """
    item, info = locate_weights(path, step, log)
    handler = ocp.PyTreeCheckpointHandler()
    stored = handler.metadata(item).tree
    wanted = {part: stored[part] for part in parts if part in stored}
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    weights = handler.restore(item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    return weights, info
