"""Run as a script on 8 simulated CPU devices (``tests/test_parallel.py`` starts it): trains two
steps of a stage with the same global batch and seed under several meshes and batch semantics and
prints, as JSON, each run's losses and the largest parameter difference from a baseline.

    python tests/mesh_equivalence.py STAGE [full | bfloat16]
"""
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fine_jax import config as config_lib  # noqa: E402
from fine_jax import parallel, stages  # noqa: E402
from fine_jax.config import tiny_config  # noqa: E402
from fine_jax.models.fine import FashionFINE  # noqa: E402
from fine_jax.stages.common import create_state  # noqa: E402
from test_stages import tgir_batch  # noqa: E402
from test_train_step import make_batch  # noqa: E402

BG = 32


def setup(stage_name, dtype="float32"):
    # Smaller than the tiny size: the equivalence does not depend on depth, and compiling five
    # meshes' steps is most of this test's time.
    cfg = tiny_config(vocab_size=256, image_size=32, vision_depth=1, num_layers=2, fusion_layer=1,
                      intermediate_size=128, embed_dim=64)
    cfg.data.max_len = 16
    cfg.stage = stage_name
    cfg.model.dtype = dtype
    cfg.train.global_batch_size = BG
    cfg.loss.queue_size = 4 * BG
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    # SGD: the updated parameters differ exactly as the gradients do. (Adam's first step is about
    # lr * sign(g), which turns fp32 noise on gradients near zero into differences of order lr.)
    optimizer = optax.sgd(0.5)
    stage = stages.get(stage_name)
    make_queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    batches = []
    for seed in (0, 1):
        if stage_name == "tgir":
            batch = tgir_batch(cfg, seed)
        else:
            batch = make_batch(cfg, seed)
            batch["idx"] = (np.arange(BG) // 2 + 100 * seed).astype(np.int32)
        batches.append(batch)
    return cfg, model, loss_cfg, optimizer, stage, make_queues, batches


def train(stage_name, groups, mesh=None, fsdp_min_size=256, dtype="float32"):
    cfg, model, loss_cfg, optimizer, stage, make_queues, batches = setup(stage_name, dtype)
    step = stage.make_step(model, optimizer, loss_cfg, 10, groups=groups)
    init = lambda r: create_state(model, optimizer, r, make_queues)  # noqa: E731
    rng = jax.random.PRNGKey(0)
    if mesh is None:
        state, jstep = jax.jit(init)(rng), jax.jit(step)
        put = lambda b: b  # noqa: E731
    else:
        jinit, abstract = parallel.sharded_init(init, mesh, fsdp_min_size, rng)
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
        state = jinit(rng)
        repl = parallel.replicated(mesh)
        jstep = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                        out_shardings=(shardings, repl))
        put = lambda b: parallel.global_batch(b, mesh)  # noqa: E731
    losses = []
    for i, batch in enumerate(batches):
        state, metrics = jstep(state, put(batch), jax.random.PRNGKey(10 + i))
        losses.append({k: float(v) for k, v in metrics.items() if k.startswith("loss")})
    host = jax.device_get({k: state[k] for k in ("params", "momentum", "queues", "opt_state")})
    return losses, host, state


def sharded_fraction(state, axis="fsdp"):
    """Fraction of parameter elements whose array is split over ``axis``."""
    split = total = 0
    for x in jax.tree_util.tree_leaves(state["params"]):
        total += x.size
        if axis in str(x.sharding.spec):
            split += x.size
    return split / total


def check_restore(state, mesh, stage_name):
    """Saves a data2 x fsdp4 state with the trainer's Checkpointer and restores it onto data8 and
    onto one device; -> what was sharded and whether both restores are bit for bit the state."""
    import tempfile

    from fine_jax.checkpoint import Checkpointer

    cfg, model, loss_cfg, optimizer, stage, make_queues, _ = setup(stage_name)
    init = lambda r: create_state(model, optimizer, r, make_queues)  # noqa: E731
    host = jax.device_get(state)
    out = {"fsdp_fraction_saved": sharded_fraction(state)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, max_to_keep=1)
        ckpt.save(2, state, force=True)
        ckpt.wait()
        for name, target in (("data8", parallel.make_mesh(8, 1)),
                             ("one_device", parallel.make_mesh(1, 1, devices=jax.devices()[:1]))):
            _, abstract = parallel.sharded_init(init, target, 256, jax.random.PRNGKey(0))
            restored = ckpt.restore(2, abstract)
            same = all(np.array_equal(a, b) for a, b in zip(
                jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(jax.device_get(restored))))
            devices = {d.id for x in jax.tree_util.tree_leaves(restored) for d in x.sharding.device_set}
            out[name] = {"bitwise_equal": same, "devices": len(devices)}
        ckpt.close()
    return out


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def main(stage_name, full, dtype="float32"):
    assert jax.device_count() == 8, jax.devices()
    d8 = parallel.make_mesh(8, 1)
    d2f4 = parallel.make_mesh(2, 4)
    runs = {"sequential_8": (parallel.Groups(None, True, 8), None),
            "data2_fsdp4": (parallel.Groups(d2f4), d2f4)}
    if full:
        runs.update({"data8": (parallel.Groups(d8), d8),
                     "global_1": (None, None),
                     "global_data2_fsdp4": (parallel.Groups(d2f4, per_group=False), d2f4)})
    out = {}
    results, times = {}, {}
    for name, (g, m) in runs.items():
        t0 = time.time()
        results[name] = train(stage_name, g, m, dtype=dtype)
        times[name] = round(time.time() - t0, 1)
    out["seconds"] = times
    base = {"per_group": results["sequential_8"], "global": results.get("global_1")}
    for name, (losses, host, _) in results.items():
        ref = base["global" if name.startswith("global") else "per_group"]
        out[name] = {"losses": losses, "max_param_diff": max_diff(host["params"], ref[1]["params"]),
                     "max_state_diff": max_diff(host, ref[1])}
    if full:
        out["per_group_vs_global"] = max_diff(results["sequential_8"][1]["params"],
                                              results["global_1"][1]["params"])
    out["restore"] = check_restore(results["data2_fsdp4"][2], d2f4, stage_name)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    option = sys.argv[2] if len(sys.argv) > 2 else ""
    main(sys.argv[1], full=option == "full", dtype="bfloat16" if option == "bfloat16" else "float32")
