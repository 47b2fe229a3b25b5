"""Device mesh, FSDP shardings, the per-group loss, and multi-process start-up.

**Mesh.** One mesh with axes ``("data", "fsdp")`` (:func:`make_mesh`, sizes from the config's
``parallel`` block). The global batch is split over *both* axes, so every device holds
``global_batch / device_count`` examples. Parameters, momentum copies and optimiser moments are
sharded FSDP-style (:func:`fsdp_spec`): an array of at least ``fsdp_min_size`` elements is split
over the ``fsdp`` axis along its largest dimension that ``fsdp`` divides; smaller arrays (biases,
LayerNorms, the temperature), the queues and the step counter are replicated. The state is born
sharded: :func:`state_shardings` works on ``jax.eval_shape`` of the initialiser.

**Batch semantics.** The reference trains with DDP: each GPU contrasts *its own* batch against the
queue, draws its ITM hard negatives within that batch, takes per-GPU loss means, and DDP averages
the gradients; only the enqueue all-gathers the momentum features, in rank order (method_spec §1.7,
§3.2, §11.3). ``batch_semantics="per_group"`` (the default) computes exactly that with every device
as one group (``shard_map`` over the batch axes, :func:`grads`): the stage's loss runs on the
device's share of the batch, gradients and logged losses are averaged over the groups, and the
momentum features come back as one global array in device order for the enqueue.
``"global"`` treats the whole global batch as one contrastive batch instead: every example of
every device is an in-batch key and a hard-negative candidate, and the means run over the global
batch. On one device the two are the same computation.

**Multi-process.** :func:`initialize_distributed` starts JAX's multi-controller runtime: from the
environment on Cloud TPU VMs and under SLURM, or from explicit flags; each process then feeds its
own share of every global batch (:func:`global_batch`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SEMANTICS = ("per_group", "global")
# Below this many elements an array is replicated: splitting a bias or a LayerNorm saves nothing
# and costs a collective.
DEFAULT_FSDP_MIN_SIZE = 2 ** 16


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def mesh_shape(data: int = -1, fsdp: int = 1, num_devices: int | None = None) -> tuple[int, int]:
    """(data, fsdp) with ``data=-1`` filled in from the device count; raises ValueError when the
    sizes do not multiply to the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"parallel.fsdp={fsdp} must be a positive divisor of the {n} devices")
    if data in (-1, 0, None):
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"parallel.data={data} x parallel.fsdp={fsdp} = {data * fsdp} devices, "
                         f"but there are {n}; use parallel.data=-1 to fill in the data axis")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices (or ``devices``), with Auto axis types: the
    compiler propagates shardings between the explicit in/out shardings of each jitted step."""
    n = None if devices is None else len(devices)
    shape = mesh_shape(data, fsdp, n)
    kwargs = {} if devices is None else {"devices": devices}
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), **kwargs)


def mesh_from_config(cfg) -> Mesh:
    p = cfg.parallel
    return make_mesh(p.data, p.fsdp)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: all of them."""
    return tuple(mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax arrays split along the batch axes. Each process passes
    its own share; the global batch is the processes' shares in process order."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def fetch(tree):
    """The whole values of a tree of (possibly sharded, possibly multi-process) arrays as numpy.
    With several processes every process must call it (it gathers the other processes' shards)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


# ----------------------------------------------------------------------------------------------
# FSDP shardings
# ----------------------------------------------------------------------------------------------
def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """The rule: split over ``fsdp`` along the largest dimension it divides, when the array has at
    least ``min_size`` elements; otherwise replicate."""
    if fsdp <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


# Parts of the train state the FSDP rule applies to; the rest (queues, step) is replicated.
SHARDED_PARTS = ("params", "momentum", "opt_state")


def state_shardings(abstract_state, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """NamedShardings for every leaf of a train state (abstract or concrete)."""
    fsdp = mesh.shape.get("fsdp", 1)

    def part(name, tree):
        if name in SHARDED_PARTS:
            return jax.tree_util.tree_map(
                lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)
        return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P()), tree)

    return {name: part(name, tree) for name, tree in abstract_state.items()}


def with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying ``shardings``: the restore target of a checkpoint."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def sharded_init(init_fn: Callable, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE, *args):
    """-> (jitted ``init_fn`` whose outputs are born sharded, abstract state with shardings).

    The state's shapes come from ``jax.eval_shape``, so nothing is materialised whole on one
    device; a resume uses the abstract state as its restore target and never calls the init."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = state_shardings(abstract, mesh, min_size)
    return jax.jit(init_fn, out_shardings=shardings), with_shardings(abstract, shardings)


def describe_shardings(abstract_state) -> str:
    """One line: how many parameter elements are split over ``fsdp`` and how many replicated."""
    split = whole = 0
    for leaf in jax.tree_util.tree_leaves(abstract_state["params"]):
        spec = getattr(leaf.sharding, "spec", P())
        if any(s is not None for s in spec):
            split += math.prod(leaf.shape)
        else:
            whole += math.prod(leaf.shape)
    total = max(split + whole, 1)
    return (f"parameters: {split / 1e6:.2f}M split over fsdp ({100 * split / total:.0f}%), "
            f"{whole / 1e6:.2f}M replicated")


# ----------------------------------------------------------------------------------------------
# The per-group loss
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Groups:
    """How a step's loss is split into the reference's per-GPU groups.

    ``mesh`` given and ``per_group``: every device of the mesh is one group. ``mesh`` None and
    ``sequential > 1``: the batch is cut into ``sequential`` groups computed one after another on
    the device (the same numbers as that many devices; also a way to run a large global batch with
    the reference's per-GPU semantics on a small machine). Otherwise the whole batch is one group.
    """

    mesh: Mesh | None = None
    per_group: bool = True
    sequential: int = 1

    @property
    def axes(self) -> tuple[str, ...]:
        return batch_axes(self.mesh) if self.mesh is not None else ()

    @property
    def count(self) -> int:
        if not self.per_group:
            return 1
        if self.mesh is None:
            return self.sequential
        return int(np.prod([self.mesh.shape[a] for a in self.axes]))


def groups_from_config(cfg, mesh: Mesh) -> Groups:
    return Groups(mesh, per_group=cfg.parallel.batch_semantics == "per_group")


def grads(loss_fn: Callable, groups: Groups | None, params, momentum, queues, batch, rng,
          *scalars):
    """Gradients of a stage's loss under the batch semantics of ``groups``.

    ``loss_fn(params, momentum, queues, batch, rng, *scalars) -> (loss, (metrics, payload))``,
    where ``payload`` is a pytree of per-example arrays (leading axis: the batch, or a multiple of
    it) to enqueue. Returns ``(grads, metrics, payload)``: gradients and metrics averaged over the
    groups, the payload as one global array with the groups' rows in device order (the
    reference's ``concat_all_gather`` in rank order).

    Group ``g`` draws its random numbers from ``fold_in(rng, g)``; without groups (one device, or
    the global semantics) the loss sees ``fold_in(rng, 0)``, so one device gives the same numbers
    either way.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if groups is None or groups.count == 1:
        g, (metrics, payload) = grad_fn(params, momentum, queues, batch,
                                        jax.random.fold_in(rng, 0), *scalars)
        return g, metrics, payload
    if groups.mesh is None:
        return _sequential_groups(grad_fn, groups.count, params, momentum, queues, batch, rng,
                                  *scalars)
    axes = groups.axes

    def per_group(params, momentum, queues, batch, rng, *scalars):
        index = jax.lax.axis_index(axes)
        # Each group differentiates its own loss; pmean is DDP's gradient average.
        params = jax.lax.pcast(params, axes, to="varying")
        g, (metrics, payload) = grad_fn(params, momentum, queues, batch,
                                        jax.random.fold_in(rng, index), *scalars)
        return jax.lax.pmean(g, axes), jax.lax.pmean(metrics, axes), payload

    fn = jax.shard_map(per_group, mesh=groups.mesh,
                       in_specs=(P(), P(), P(), P(axes), P()) + (P(),) * len(scalars),
                       out_specs=(P(), P(), P(axes)))
    return fn(params, momentum, queues, batch, rng, *scalars)


def _sequential_groups(grad_fn, n: int, params, momentum, queues, batch, rng, *scalars):
    """:func:`grads` for ``n`` groups computed one after another (a scan over the groups that
    sums gradients and metrics, so memory does not grow with ``n``)."""
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    (size,) = sizes
    if size % n:
        raise ValueError(f"a batch of {size} cannot be cut into {n} equal groups")
    chunks = jax.tree_util.tree_map(lambda x: x.reshape((n, size // n) + x.shape[1:]), batch)

    def one(carry, xs):
        chunk, index = xs
        g, (metrics, payload) = grad_fn(params, momentum, queues, chunk,
                                        jax.random.fold_in(rng, index), *scalars)
        carry = jax.tree_util.tree_map(jnp.add, carry, (g, metrics))
        return carry, payload

    shapes = jax.eval_shape(lambda c: grad_fn(params, momentum, queues, c, rng, *scalars),
                            jax.tree_util.tree_map(lambda x: x[0], chunks))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1][0]))
    (g_sum, m_sum), payload = jax.lax.scan(one, zeros, (chunks, jnp.arange(n)))
    mean = functools.partial(jax.tree_util.tree_map, lambda x: x / n)
    payload = jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), payload)
    return mean(g_sum), mean(m_sum), payload


# ----------------------------------------------------------------------------------------------
# Multi-process start-up
# ----------------------------------------------------------------------------------------------
def detected_cluster() -> str | None:
    """"tpu" or "slurm" when this process runs where JAX can read the cluster from the
    environment, else None."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or \
            os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def _cpu_collectives() -> None:
    # CPU devices of different processes exchange collectives over gloo (tests, laptops, CPU
    # clusters); the setting affects only the CPU client, so it is harmless on GPU and TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids=None, log=print) -> bool:
    """Starts ``jax.distributed`` when the job has several processes; returns whether it did.

    ``mode``: ``"auto"`` initialises from the environment on a Cloud TPU VM slice or a SLURM job
    with several tasks, or from the explicit arguments when ``coordinator_address`` is given, and
    does nothing on a plain single host; ``"explicit"`` requires the three arguments; ``"none"``
    never initialises. Must run before anything else touches the devices.
    """
    if mode not in ("auto", "explicit", "none"):
        raise ValueError(f"--distributed={mode!r}: use auto, explicit or none")
    if mode == "none":
        return False
    explicit = coordinator_address or num_processes is not None or process_id is not None
    if mode == "explicit" or explicit:
        missing = [name for name, v in (("--coordinator_address", coordinator_address),
                                        ("--num_processes", num_processes),
                                        ("--process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"a multi-process start needs {', '.join(missing)} as well")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids)
    else:
        cluster = detected_cluster()
        if cluster is None:
            return False
        _cpu_collectives()
        jax.distributed.initialize()
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices")
    return True
