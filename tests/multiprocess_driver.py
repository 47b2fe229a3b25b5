"""One process of a multi-process training job on CPU (``tests/test_multiprocess.py`` starts two).

    python tests/multiprocess_driver.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR MAX_STEPS OUT

Starts ``jax.distributed`` over loopback with 2 CPU devices in this process, trains the embedded
set with ``fine_jax.trainer.run`` on a ``data=1 x fsdp=4`` mesh (so parameters are split across the
two processes), then restores the workdir's latest checkpoint onto the mesh again and writes, for
every array of the restored state, a digest of each of this process's shards (with the shard's
index) to OUT, with the metrics the run logged.
"""
import hashlib
import json
import os
import sys

# Optimisation level 0 halves the compile time, which is most of this job's time.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true")
# No persistent compilation cache: JAX writes it from process 0 only, so on a restart process 0
# would load the step while process 1 compiles it, and the first collective would wait on
# process 1 longer than gloo's 30 s rendezvous.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(process_id, num_processes, port, workdir, data_dir, max_steps, out):
    import jax
    import numpy as np

    from fine_jax import parallel

    parallel.initialize_distributed("explicit", f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes

    from fine_jax import config as config_lib
    from fine_jax import stages, trainer
    from fine_jax.checkpoint import Checkpointer
    from fine_jax.models.fine import FashionFINE
    from fine_jax.optim import make_optimizer
    from fine_jax.stages.common import create_state
    from test_train_job import tiny

    cfg = tiny("demo.py", data_dir, max_steps)
    cfg.init.vit_pretrain_steps = 0
    cfg.parallel.fsdp = 4  # parameters split over all four devices, across both processes
    cfg.parallel.fsdp_min_size = 1024
    cfg.eval.at_end = False
    cfg.eval.every_epochs = 0
    trainer.run(cfg, workdir)

    # Restore the latest checkpoint onto the mesh, as a resume does, and fingerprint the shards.
    cfg.model.vocab_size = json.load(open(os.path.join(workdir, "config.json")))["model"][
        "vocab_size"]
    mesh = parallel.mesh_from_config(cfg)
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer, _ = make_optimizer(cfg.optim, 10)
    make_queues = stages.get(cfg.stage).make_queues(loss_cfg, cfg.model.embed_dim)
    _, abstract = parallel.sharded_init(lambda r: create_state(model, optimizer, r, make_queues),
                                        mesh, cfg.parallel.fsdp_min_size, jax.random.PRNGKey(0))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    state = ckpt.restore(step, abstract)
    ckpt.close()
    shards = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        key = jax.tree_util.keystr(path)
        shards[key] = {
            "sharded": not leaf.sharding.is_fully_replicated,
            "shards": [[[[s.start, s.stop] for s in _slices(shard.index, leaf.shape)],
                        hashlib.sha1(np.ascontiguousarray(np.asarray(shard.data))).hexdigest()]
                       for shard in leaf.addressable_shards]}
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "step": step, "shards": shards}, f)


def _slices(index, shape):
    return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], int(a[5]), a[6])
