"""Learning-rate schedule values (method_spec §8.3) and the weight-decay mask (§8.2)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fine_jax.optim import OptimConfig, ScheduleConfig, make_optimizer, reference_lr, weight_decay_mask

STAGE1 = ScheduleConfig(peak_lr=6e-5, warmup_lr=1e-5, min_lr=1e-5, warmup_units=5,
                        warmup_unit_iters=100, epochs=10)
IPE = 2035  # 260,480 / 128


@pytest.mark.parametrize("it,expected", [
    (0, 1e-5), (1, 1e-5), (100, 1e-5), (101, 2e-5), (200, 2e-5), (201, 3e-5), (301, 4e-5),
    (401, 5e-5), (500, 5e-5), (501, 6e-5), (2034, 6e-5),
])
def test_stage1_epoch0_warmup(it, expected):
    assert float(reference_lr(it, IPE, STAGE1)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("epoch,expected", [
    (1, 5.88e-5), (2, 5.52e-5), (3, 4.97e-5), (4, 4.27e-5), (5, 3.50e-5), (6, 2.73e-5),
    (7, 2.03e-5), (8, 1.48e-5), (9, 1.12e-5),
])
def test_stage1_cosine_per_epoch(epoch, expected):
    first, last = epoch * IPE, (epoch + 1) * IPE - 1
    assert float(reference_lr(first, IPE, STAGE1)) == pytest.approx(expected, abs=6e-8)
    assert float(reference_lr(last, IPE, STAGE1)) == pytest.approx(expected, abs=6e-8)


def test_stage2_warmup_one_unit():
    cfg = ScheduleConfig(peak_lr=1e-5, warmup_lr=1e-6, min_lr=1e-6, warmup_units=1,
                         warmup_unit_iters=100, epochs=30)
    assert float(reference_lr(100, 469, cfg)) == pytest.approx(1e-6)
    assert float(reference_lr(101, 469, cfg)) == pytest.approx(1e-5)


def test_schedule_is_jittable():
    f = jax.jit(lambda s: reference_lr(s, IPE, STAGE1))
    lr = f(jnp.asarray(150))
    chex.assert_shape(lr, ())
    chex.assert_type(lr, jnp.float32)
    assert float(lr) == pytest.approx(2e-5)
    # Element-wise over a vector of steps, as a logger evaluating many steps at once would use it.
    steps = jnp.asarray([0, 101, 501, IPE, 10 * IPE])
    chex.assert_trees_all_close(reference_lr(steps, IPE, STAGE1),
                                jnp.asarray([1e-5, 2e-5, 6e-5, 5.88e-5, 1e-5]), rtol=2e-3)


def test_weight_decay_mask_follows_reference_groups():
    params = {"temp": jnp.zeros(()), "W_v": jnp.zeros((4, 1)),
              "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros((4,))},
              "LayerNorm": {"scale": jnp.zeros((4,)), "bias": jnp.zeros((4,))},
              "pos_embed": jnp.zeros((1, 5, 4)), "conv": {"kernel": jnp.zeros((3, 4, 4))}}
    # Same tree, so a parameter missing from (or added to) the mask would fail too.
    chex.assert_trees_all_equal(weight_decay_mask(params), {
        "temp": True, "W_v": True, "dense": {"kernel": True, "bias": False},
        "LayerNorm": {"scale": False, "bias": False}, "pos_embed": True, "conv": {"kernel": True}})


def test_make_optimizer_decays_the_masked_params_at_the_scheduled_lr():
    # With zero gradients Adam's step is exactly 0, so one update is pure decoupled weight decay:
    # p <- p * (1 - lr_0 * wd) where the mask says decay (the 0-d temperature included, B13), and
    # p unchanged for biases and LayerNorm scales. lr_0 is the schedule's first value, warmup_lr.
    cfg = OptimConfig(lr=0.4, warmup_lr=0.1, min_lr=0.1, weight_decay=0.5)
    opt, schedule = make_optimizer(cfg, steps_per_epoch=50)
    rng = np.random.default_rng(0)
    params = {"temp": jnp.asarray(0.07, jnp.float32),
              "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
              "LayerNorm": {"scale": jnp.ones((3,), jnp.float32)}}
    state = opt.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, state, params)
    assert float(schedule(0)) == pytest.approx(0.1)
    factor = 1.0 - 0.1 * 0.5
    expected = {"temp": params["temp"] * factor,
                "dense": {"kernel": params["dense"]["kernel"] * factor, "bias": params["dense"]["bias"]},
                "LayerNorm": {"scale": params["LayerNorm"]["scale"]}}
    new = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
    chex.assert_trees_all_close(new, expected, rtol=1e-6)


def test_lr_scales_multiply_the_matching_parameters_updates_only():
    # The same gradients through the plain optimiser and through one with a 3x multiplier on the
    # fusion layer and the ITM head: those updates are exactly 3 times, every other one the same.
    params = {"text_encoder": {"layer_1": {"kernel": jnp.full((2, 3), 0.5)},
                               "layer_2": {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.zeros(3)}},
              "itm_head": {"kernel": jnp.ones((3, 2))}, "temp": jnp.asarray(0.07)}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3), params)
    plain, _ = make_optimizer(OptimConfig(lr=0.1, warmup_lr=0.1, min_lr=0.1), 10)
    scaled, _ = make_optimizer(OptimConfig(lr=0.1, warmup_lr=0.1, min_lr=0.1,
                                           lr_scales="text_encoder/layer_2|itm_head=3"), 10)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    expected = jax.tree_util.tree_map(lambda u: u, u_plain)
    expected["text_encoder"]["layer_2"] = jax.tree_util.tree_map(
        lambda u: 3 * u, u_plain["text_encoder"]["layer_2"])
    expected["itm_head"]["kernel"] = 3 * u_plain["itm_head"]["kernel"]
    chex.assert_trees_all_close(u_scaled, expected, rtol=1e-6)
    assert float(jnp.abs(u_plain["itm_head"]["kernel"]).min()) > 0  # a real update was scaled


def test_lr_scales_first_matching_pattern_wins():
    params = {"a": {"b": jnp.ones(1)}, "c": jnp.ones(1)}
    from fine_jax.optim import lr_scale_tree
    assert lr_scale_tree(params, "a/b=2, a=5,c=0.5") == {"a": {"b": 2.0}, "c": 0.5}


@pytest.mark.parametrize("text", ["layer_2", "=2", "layer_2=two", "layer_[=2"])
def test_malformed_lr_scales_name_the_form(text):
    with pytest.raises(ValueError, match="PATTERN=SCALE"):
        make_optimizer(OptimConfig(lr_scales=text), 10)
