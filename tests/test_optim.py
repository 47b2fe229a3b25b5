"""Learning-rate schedule values (method_spec §8.3) and the weight-decay mask (§8.2)."""
import jax
import jax.numpy as jnp
import pytest

from fine_jax.optim import ScheduleConfig, reference_lr, weight_decay_mask

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
    assert float(f(jnp.asarray(150))) == pytest.approx(2e-5)


def test_weight_decay_mask_follows_reference_groups():
    params = {"temp": jnp.zeros(()), "W_v": jnp.zeros((4, 1)),
              "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros((4,))},
              "LayerNorm": {"scale": jnp.zeros((4,)), "bias": jnp.zeros((4,))},
              "pos_embed": jnp.zeros((1, 5, 4)), "conv": {"kernel": jnp.zeros((3, 4, 4))}}
    mask = weight_decay_mask(params)
    assert mask["temp"] and mask["W_v"] and mask["pos_embed"] and mask["dense"]["kernel"]
    assert mask["conv"]["kernel"]
    assert not mask["dense"]["bias"] and not mask["LayerNorm"]["scale"]
    assert not mask["LayerNorm"]["bias"]
