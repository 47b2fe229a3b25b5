"""Device mesh and shardings.

Stage 1 trains data-parallel: the train state is replicated and the global batch is split along a
``data`` mesh axis. Each process contributes its local slice of the global batch, assembled with
``jax.make_array_from_process_local_data``. The contrastive loss sees the whole global batch as
the in-batch keys (on one device this is exactly the reference; on several it is the union of the
per-GPU batches the reference all-gathers into its queue).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    devices = np.asarray(jax.devices())
    return Mesh(devices, ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax arrays sharded along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
