"""Mesh, FSDP shardings and the per-group (reference) batch semantics.

The equivalence tests run ``tests/mesh_equivalence.py`` on 8 simulated CPU devices: the same two
training steps, same global batch and seed, computed per group on one device (the groups one after
another), on ``data=8`` and on ``data=2 x fsdp=4`` (parameters split), must agree within fp32
tolerance; the global-batch semantics on ``data=2 x fsdp=4`` must agree with the plain global
step on one device; and the two semantics must differ.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fine_jax import config as config_lib
from fine_jax import parallel
from fine_jax.config import tiny_config

HERE = pathlib.Path(__file__).resolve().parent


def test_fsdp_rule_splits_large_arrays_along_their_largest_divisible_dim():
    assert parallel.fsdp_spec((768, 3072), 4, 1024) == P(None, "fsdp")
    assert parallel.fsdp_spec((30522, 768), 4, 1024) == P(None, "fsdp")  # 30522 % 4 != 0
    assert parallel.fsdp_spec((3072, 768), 4, 1024) == P("fsdp", None)
    assert parallel.fsdp_spec((768,), 4, 1024) == P()  # below the size threshold
    assert parallel.fsdp_spec((7, 7, 7, 7), 4, 1) == P()  # nothing divisible
    assert parallel.fsdp_spec((768, 3072), 1, 1) == P()  # no fsdp axis
    assert parallel.fsdp_spec((), 4, 0) == P()


def test_mesh_shape_fills_the_data_axis_and_refuses_impossible_sizes():
    assert parallel.mesh_shape(-1, 4, 64) == (16, 4)
    assert parallel.mesh_shape(8, 1, 8) == (8, 1)
    with pytest.raises(ValueError, match="fsdp=3"):
        parallel.mesh_shape(-1, 3, 8)
    with pytest.raises(ValueError, match="data=4 x parallel.fsdp=4"):
        parallel.mesh_shape(4, 4, 8)


@pytest.mark.parametrize("override, message", [
    (dict(fsdp=3), "fsdp=3 must be a positive divisor"),
    (dict(data=3), "parallel.data=3"),
    (dict(batch_semantics="local"), "batch_semantics='local'"),
])
def test_impossible_parallel_configs_are_refused(override, message):
    cfg = tiny_config()
    cfg.parallel.update(override)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(cfg, num_devices=8)


def test_per_group_semantics_needs_two_examples_per_device():
    cfg = tiny_config()
    cfg.train.global_batch_size = 8
    cfg.loss.queue_size = 64
    with pytest.raises(config_lib.ConfigError, match="at least 2"):
        config_lib.validate(cfg, num_devices=8)
    cfg.parallel.batch_semantics = "global"
    config_lib.validate(cfg, num_devices=8)


def test_sequential_groups_on_one_device_equal_the_step_run_group_by_group():
    """``Groups(sequential=n)`` is n separate losses with their own random numbers, averaged:
    check it against computing each group's gradient by hand."""
    import jax.numpy as jnp

    def loss_fn(params, momentum, queues, batch, rng, scale):
        noise = jax.random.normal(rng, batch["x"].shape[:1])
        pred = batch["x"] @ params["w"] + noise[:, None] + queues["q"].sum()
        loss = scale * jnp.mean(pred ** 2)
        return loss, ({"loss": loss}, {"rows": pred})

    params = {"w": jnp.arange(6.0).reshape(3, 2) / 10}
    batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (8, 3))}
    queues, rng = {"q": jnp.ones((2,))}, jax.random.PRNGKey(7)
    g, m, payload = jax.jit(lambda *a: parallel.grads(loss_fn, parallel.Groups(None, True, 4), *a))(
        params, {}, queues, batch, rng, 2.0)
    parts = [jax.grad(loss_fn, has_aux=True)(params, {}, queues, {"x": batch["x"][2 * i:2 * i + 2]},
                                             jax.random.fold_in(rng, i), 2.0) for i in range(4)]
    np.testing.assert_allclose(g["w"], np.mean([p[0]["w"] for p in parts], 0), rtol=1e-6)
    np.testing.assert_allclose(m["loss"], np.mean([p[1][0]["loss"] for p in parts]), rtol=1e-6)
    np.testing.assert_allclose(payload["rows"],
                               np.concatenate([p[1][1]["rows"] for p in parts]), rtol=1e-6)
    whole, _ = jax.grad(loss_fn, has_aux=True)(params, {}, queues, batch,
                                               jax.random.fold_in(rng, 0), 2.0)
    assert not np.allclose(whole["w"], g["w"])  # one group is another computation


def run_equivalence(stage, full, option=""):
    # The script runs from tests/; the repository root makes fine_jax importable uninstalled too.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    # Compile time dominates these runs; optimisation level 0 halves it and changes no result
    # beyond fp32 rounding.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true")
    args = [sys.executable, str(HERE / "mesh_equivalence.py"), stage] + (["full"] if full else [])
    args += [option] if option else []
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_losses(a, b, rtol=2e-5):
    for step_a, step_b in zip(a, b):
        assert step_a.keys() == step_b.keys()
        for k in step_a:
            np.testing.assert_allclose(step_a[k], step_b[k], rtol=rtol, atol=1e-6, err_msg=k)


def test_stage1_same_results_on_one_device_data8_and_data2_fsdp4():
    out = run_equivalence("pretrain", full=True)
    base = out["sequential_8"]["losses"]
    for name in ("data8", "data2_fsdp4"):
        assert_same_losses(out[name]["losses"], base)
        assert out[name]["max_state_diff"] < 2e-5, (name, out[name]["max_state_diff"])
    # The global-batch flag on the mesh is the single-device global-batch step...
    assert_same_losses(out["global_data2_fsdp4"]["losses"], out["global_1"]["losses"])
    assert out["global_data2_fsdp4"]["max_state_diff"] < 2e-5
    # ... and a different computation from the reference's per-group one.
    assert out["per_group_vs_global"] > 1e-3
    assert abs(out["global_1"]["losses"][0]["loss_itc"] - base[0]["loss_itc"]) > 1e-3
    # The data2 x fsdp4 state was born split over fsdp, and its checkpoint restores bit for bit
    # onto another mesh shape and onto one device.
    restore = out["restore"]
    assert restore["fsdp_fraction_saved"] > 0.5
    assert restore["data8"] == {"bitwise_equal": True, "devices": 8}
    assert restore["one_device"] == {"bitwise_equal": True, "devices": 1}


def test_bf16_products_same_results_on_one_device_and_data2_fsdp4():
    """The bf16 products (float32 accumulation, weight gradients from operands transposed in
    memory) under FSDP sharding: the same step as the unsharded one, to float32 rounding."""
    out = run_equivalence("pretrain", full=False, option="bfloat16")
    assert_same_losses(out["data2_fsdp4"]["losses"], out["sequential_8"]["losses"], rtol=1e-4)
    assert out["data2_fsdp4"]["max_state_diff"] < 1e-4, out["data2_fsdp4"]["max_state_diff"]


def test_stage3_same_results_on_one_device_and_data2_fsdp4():
    """Stage 3 enqueues two banks, [t_m; r_m] group by group and f_m: the queues after two steps
    (compared in ``max_state_diff``) say the gathered order is the same."""
    out = run_equivalence("tgir", full=False)
    assert_same_losses(out["data2_fsdp4"]["losses"], out["sequential_8"]["losses"])
    assert out["data2_fsdp4"]["max_state_diff"] < 2e-5


def test_per_device_semantics_gathers_only_the_enqueued_features():
    """Hard negatives are drawn within each device's batch: under the per-group semantics the
    step's only all-gathers are the momentum features and product ids that every device enqueues,
    never the (B, L, D) text or (B, N, D) image states that the global-batch semantics gathers."""
    env = dict(os.environ)  # with the suite's fast-compile flags: the same gathers, half the time
    proc = subprocess.run([sys.executable, str(HERE / "collectives_probe.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    rank = lambda shape: shape.count(",") + 1  # noqa: E731
    assert out["per_group"] and all(rank(s) <= 2 for s in out["per_group"]), out["per_group"]
    assert any(rank(s) == 3 for s in out["global"]), out["global"]
