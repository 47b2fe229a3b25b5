"""One orbax CheckpointManager per workdir: the train state plus the data iterator's position.

Orbax writes each step into a temporary directory (``<step>.orbax-checkpoint-tmp``) and renames it
when complete, so an interrupted save (a kill, a full disk) never leaves a half-written checkpoint
that a restart would pick up; the next start removes such leftovers. Only complete steps count:
:func:`complete_steps` lists them from the directory itself.

A save runs in the background. Its failure surfaces in the main thread at the next save, wait or
close, as :class:`CheckpointWriteError` (one line: the step, the directory, the reason, the last
complete step); older steps are removed only after a newer one is complete, so the last complete
checkpoint is never lost to a failed write.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written."""


class CheckpointRestoreError(RuntimeError):
    """A checkpoint could not be restored onto the current configuration."""


def complete_steps(directory: str | pathlib.Path) -> list[int]:
    """The complete (renamed into place) steps under a checkpoint directory, ascending."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return _training_steps(directory)


def short_reason(error: BaseException, limit: int = 300) -> str:
    """One line for an error of orbax, tensorstore or the OS: the OS error's text when there is
    one (tensorstore reports it as ``os_error_code``), else the first line of the message."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    text = str(error)
    code = re.search(r"os_error_code=['\"]?(\d+)", text)
    if code:
        return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    for cause in (error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.strerror:
            return short_reason(cause, limit)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


_OPEN: list["Checkpointer"] = []  # checkpointers not closed yet, for close_all


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._pending: int | None = None  # the step whose background write may still run
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))
        _OPEN.append(self)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has(self, step: int) -> bool:
        """Whether ``step`` is saved or being saved (a second save of it would be refused)."""
        return step == self._pending or (self.manager is not None and
                                         step in self.manager.all_steps())

    def last_complete(self) -> int | None:
        steps = complete_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
        """Starts writing ``step`` in the background; returns whether it did. A step that is
        already saved, or being saved, is kept as it is (False). A failure of the previous write,
        or of this one's start, raises :class:`CheckpointWriteError`."""
        if self.has(step):
            return False
        self.wait()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError:
            return False
        except Exception as e:  # noqa: BLE001 - any failure to write ends as one line
            raise self._write_error(step, e) from e
        if saved:
            self._pending = step
        return saved

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores the state into the structure/shardings of ``abstract_state`` and, if given,
        moves ``data_iterator`` to the position saved with it. A checkpoint that does not fit
        (another model size or queue, another stage) raises :class:`CheckpointRestoreError`."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            reason = short_reason(e).split(". ")[0].rstrip(".")  # without orbax's advice
            raise CheckpointRestoreError(
                f"could not restore step {step} from {self.directory} onto this configuration "
                f"({reason}); the checkpoint was written with another model or queue size (the "
                "workdir's config.json has its config): use a new --workdir, or that config"
            ) from e
        return restored["state"]

    def wait(self) -> None:
        """Waits for the background write; its failure raises :class:`CheckpointWriteError`."""
        if self.manager is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            raise self._write_error(step, e) from e
        self._pending = None

    def poll(self) -> None:
        """Surfaces a failed background write early, without waiting for one that runs."""
        in_progress = getattr(self.manager, "is_saving_in_progress", None)
        if self._pending is not None and in_progress is not None and not in_progress():
            self.wait()

    def close(self) -> None:
        """Waits for the background write and closes the manager; safe to call again, and after
        a failure (which it raises once, as :class:`CheckpointWriteError`)."""
        if self.manager is None:
            return
        try:
            self.wait()
        finally:
            manager, self.manager = self.manager, None
            if self in _OPEN:
                _OPEN.remove(self)
            try:
                manager.close()
            except Exception:  # noqa: BLE001 - the failure was raised by wait() above
                pass

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        last = self.last_complete()
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        tail = (f"the last complete checkpoint is step {last}" if last is not None else
                "there is no complete checkpoint yet")
        return CheckpointWriteError(f"could not write {what} to {self.directory}: "
                                    f"{short_reason(error)}; {tail}")


def close_all() -> None:
    """Closes every checkpointer still open, without raising: for a job's way out after another
    error, so that no write is left running."""
    for ckpt in list(_OPEN):
        try:
            ckpt.close()
        except Exception:  # noqa: BLE001
            pass


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
