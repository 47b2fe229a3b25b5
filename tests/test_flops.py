"""The analytic FLOP count (fine_jax.flops) against XLA's count of the same jitted steps."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax import flops, stages
from fine_jax.config import tiny_config
from fine_jax.models.fine import FashionFINE
from fine_jax.optim import make_optimizer
from fine_jax.stages.common import create_state


def _batch(cfg, b):
    rng = np.random.default_rng(0)
    s, length = cfg.model.image_size, cfg.data.max_len
    ids = rng.integers(100, 1000, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    if cfg.stage == "tgir":
        img = np.zeros((b, s, s, 3), np.float32)
        return {"reference_image": img, "target_image": img, "input_ids": ids,
                "attention_mask": mask}
    labels = np.where(rng.random((b, length)) < 0.15, ids, -100).astype(np.int32)
    return {"image": np.zeros((b, s, s, 3), np.float32), "input_ids": ids, "clean_ids": ids + 1,
            "attention_mask": mask, "mask_labels": labels,
            "replace_labels": np.zeros((b, length), np.int32), "idx": np.arange(b, dtype=np.int32)}


def _lowered(cfg):
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    stage = stages.get(cfg.stage)
    optimizer, schedule = make_optimizer(cfg.optim, steps_per_epoch=100)
    queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    state = jax.eval_shape(lambda r: create_state(model, optimizer, r, queues),
                           jax.random.PRNGKey(0))
    step = jax.jit(stage.make_step(model, optimizer, loss_cfg, 100, schedule, deterministic=True))
    return step.lower(state, _batch(cfg, cfg.train.global_batch_size), jax.random.PRNGKey(1))


def _config(stage, batch=8, **overrides):
    cfg = tiny_config()
    cfg.stage = stage
    cfg.train.global_batch_size = batch
    for key, value in overrides.items():
        block, name = key.split("__")
        cfg[block][name] = value
    return cfg


# (stage, batch, overrides, also compile for XLA's cost analysis)
CASES = [
    ("pretrain", 8, {}, True),
    ("pretrain", 8, dict(loss__mlm_gather=False), False),
    ("pretrain", 8, dict(loss__mlm_overflow="step"), False),
    ("pretrain", 4, dict(model__fusion_layer=1, data__max_len=24, loss__queue_size=64,
                         model__patch_size=8), False),
    ("pretrain", 4, dict(loss__clean_itc_itm_text=True), False),
    ("retrieval", 8, {}, True),
    ("retrieval", 6, dict(model__num_layers=3, loss__queue_size=96), False),
    ("tgir", 8, {}, True),
    ("tgir", 4, dict(data__max_len=20, model__vision_depth=3), False),
]


@pytest.mark.parametrize("stage,batch,overrides,compile_too", CASES)
def test_count_matches_the_products_xla_is_handed(stage, batch, overrides, compile_too):
    cfg = _config(stage, batch, **overrides)
    lowered = _lowered(cfg)
    count = flops.step_flops(cfg)
    in_program = costliest = count.total
    if cfg.stage == "pretrain" and cfg.loss.mlm_gather and cfg.loss.mlm_overflow == "step":
        # The program also holds the every-position MLM branch that an overflowing batch takes,
        # rematerialised: its forward runs once more inside the backward (a third of its count:
        # the forward plus a backward product per operand), and its decoder's bias gradient.
        full = flops.step_flops(_config(stage, batch, loss__mlm_gather=False, **overrides))
        assert full.parts["heads/mlm"] > count.parts["heads/mlm"]
        in_program += full.parts["heads/mlm"] * 4 / 3 + full.parts["heads/mlm_bias_grad"]
        costliest = full.total + full.parts["heads/mlm"] / 3
    assert in_program == pytest.approx(flops.stablehlo_matmul_flops(lowered.as_text()), rel=1e-9)
    if not compile_too:
        return
    # XLA's cost analysis of the compiled step (of a conditional, its costliest branch) also
    # counts the element-wise work (softmax, LayerNorm, GELU, AdamW): a few per cent more.
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 0.8 * cost["flops"] <= costliest <= cost["flops"]


def test_count_grows_with_what_the_step_does():
    base = flops.step_flops(_config("pretrain"))
    more_queue = flops.step_flops(_config("pretrain", loss__queue_size=2048))
    assert more_queue.total > base.total
    assert more_queue.parts["contrastive"] - base.parts["contrastive"] == pytest.approx(
        # 4 matrices of 8 queries x 1024 more keys x E 256; two of them also backward (x2)
        2 * 8 * 256 * 1024 * (2 * 2 + 2 * 1))
    with pytest.raises(ValueError, match="stage"):
        flops.step_flops(_config("nonsense"))


def test_stablehlo_parser_reads_dots_and_convolutions():
    def f(a, b, x, w):
        att = jnp.einsum("bqhd,bkhd->bhqk", a, b)
        conv = jax.lax.conv_general_dilated(x, w, (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return att.sum() + conv.sum()

    text = jax.jit(f).lower(jnp.ones((2, 5, 3, 4)), jnp.ones((2, 7, 3, 4)),
                            jnp.ones((2, 8, 8, 3)), jnp.ones((2, 2, 3, 6))).as_text()
    expected = 2 * (2 * 3 * 5 * 7) * 4 + 2 * (2 * 4 * 4 * 6) * (2 * 2 * 3)
    assert flops.stablehlo_matmul_flops(text) == expected


def test_peak_and_mfu():
    peak, source = flops.device_peak_flops(jax.devices()[0])
    assert peak > 1e8 and "measured" in source  # CPU: a measured matmul
    assert flops.mfu(1e9, 0.5, 2, 1e10) == pytest.approx(0.1)
    assert flops.mfu(1e9, 0.0, 1, 1e10) == 0.0

    class FakeGPU:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert flops.device_peak_flops(FakeGPU(), "bfloat16") == (989e12, "NVIDIA H100 80GB HBM3 bf16 table")
    # float32 products: TF32 at JAX's default, CUDA cores at model.matmul_precision=float32.
    assert flops.device_peak_flops(FakeGPU(), "float32") == (494.5e12,
                                                             "NVIDIA H100 80GB HBM3 tf32 table")
    assert flops.device_peak_flops(FakeGPU(), "float32", "float32")[0] == pytest.approx(66.9e12)

    class FakeTPU:
        platform, device_kind = "tpu", "TPU v4"

    # A TPU's float32 products are bf16 passes: one, three or six.
    for precision, passes in (("default", 1), ("tensorfloat32", 3), ("float32", 6)):
        peak, source = flops.device_peak_flops(FakeTPU(), "float32", precision)
        assert peak == pytest.approx(275e12 / passes) and f"{passes} bf16 pass" in source
    assert flops.device_peak_flops(FakeTPU(), "bfloat16", "float32")[0] == 275e12
