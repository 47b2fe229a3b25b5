"""One orbax CheckpointManager per workdir: the train state plus the data iterator's position.

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted
save never leaves a half-written checkpoint that a restart would pick up.
"""
from __future__ import annotations

import pathlib

import grain
import jax
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
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state):
    """ShapeDtypeStructs (with shardings) of a concrete state, for restore."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
