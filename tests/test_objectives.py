"""Each loss against an independent NumPy computation of its formula (method_spec §3-§4)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fine_jax import objectives as obj


def np_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def np_focal(logits, y, af, gamma):
    p = np_softmax(logits)
    return float(np.mean(np.sum(-af * (1 - p) ** gamma * y * np.log(p), axis=1)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_idx_targets_match_numpy(rng):
    idx = np.array([3, 5, 3, 7])
    idx_all = np.concatenate([idx, np.array([5, -100, 3, 9, 3])])
    expected = np.zeros((4, 9))
    for b in range(4):
        pos = idx_all == idx[b]
        expected[b, pos] = 1.0 / pos.sum()
    targets = obj.idx_targets(jnp.asarray(idx), jnp.asarray(idx_all))
    chex.assert_shape(targets, (4, 9))
    chex.assert_trees_all_close(targets, expected, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.15, 0.4])
def test_focal_itc_matches_numpy(rng, alpha):
    b, q = 4, 12
    s = {k: rng.normal(size=(b, b + q)) * 5 for k in ("i2t", "t2i", "i2t_m", "t2i_m")}
    idx = np.array([0, 1, 0, 2])
    idx_all = np.concatenate([idx, rng.integers(0, 4, size=q)])
    gt = (idx[:, None] == idx_all[None]).astype(float)
    gt /= gt.sum(1, keepdims=True)
    y_i2t = alpha * np_softmax(s["i2t_m"]) + (1 - alpha) * gt
    y_t2i = alpha * np_softmax(s["t2i_m"]) + (1 - alpha) * gt
    expected_i2t = np_focal(s["i2t"], y_i2t, 0.25, 2.0)
    expected_t2i = np_focal(s["t2i"], y_t2i, 0.25, 2.0)
    loss, (l_i2t, l_t2i) = obj.focal_itc_loss(
        *(jnp.asarray(s[k], jnp.float32) for k in ("i2t", "t2i", "i2t_m", "t2i_m")),
        jnp.asarray(gt, jnp.float32), alpha, 0.25, 2.0)
    chex.assert_shape([loss, l_i2t, l_t2i], ())
    chex.assert_trees_all_close((loss, (l_i2t, l_t2i)),
                                ((expected_i2t + expected_t2i) / 2, (expected_i2t, expected_t2i)),
                                rtol=1e-5)


def test_focal_gradient_flows_through_focal_factor(rng):
    logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    y = jnp.asarray(np_softmax(rng.normal(size=(3, 5))), jnp.float32)
    g = jax.grad(lambda x: obj.focal_soft_cross_entropy(x, y, 0.25, 2.0))(logits)
    # Numerical derivative of the full expression (focal factor not detached).
    eps = 1e-3
    num = np.zeros((3, 5))
    base = np.asarray(logits, np.float64)
    for i in range(3):
        for j in range(5):
            d = np.zeros_like(base)
            d[i, j] = eps
            num[i, j] = (np_focal(base + d, np.asarray(y), 0.25, 2) -
                         np_focal(base - d, np.asarray(y), 0.25, 2)) / (2 * eps)
    chex.assert_shape(g, (3, 5))
    chex.assert_trees_all_close(g, num, rtol=2e-3, atol=1e-5)


def test_itm_loss_matches_numpy(rng):
    b = 3
    logits = rng.normal(size=(3 * b, 2))
    labels = np.array([1] * b + [0] * 2 * b)
    p = np_softmax(logits)
    expected = -np.mean(np.log(p[np.arange(3 * b), labels]))
    np.testing.assert_allclose(obj.itm_loss(jnp.asarray(logits, jnp.float32), b), expected, rtol=1e-5)


def test_symbol_loss_matches_numpy(rng):
    s = rng.normal(size=(5, 8))
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    z = rng.normal(size=(5, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    expected = np.mean(1 - (1 + np.sum(s * z, 1)) / 2)
    np.testing.assert_allclose(obj.symbol_loss(jnp.asarray(s), jnp.asarray(z)), expected, rtol=1e-5)


def test_mlm_loss_ignores_unlabelled_positions(rng):
    logits = rng.normal(size=(2, 6, 11))
    labels = np.full((2, 6), -100)
    labels[0, 1], labels[0, 4], labels[1, 2] = 3, 7, 10
    p = np_softmax(logits)
    picks = [p[0, 1, 3], p[0, 4, 7], p[1, 2, 10]]
    expected = -np.mean(np.log(picks))
    np.testing.assert_allclose(obj.mlm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)),
                               expected, rtol=1e-5)
    # No labelled position at all: defined as 0 rather than NaN, and its gradient must not be NaN
    # either, or one such batch would still poison the parameters.
    none = jnp.full((2, 6), -100)
    loss, grad = jax.value_and_grad(obj.mlm_loss)(jnp.asarray(logits, jnp.float32), none)
    assert float(loss) == 0.0
    chex.assert_tree_all_finite(grad)
    chex.assert_trees_all_close(grad, jnp.zeros((2, 6, 11)))


@pytest.mark.parametrize("rows", [3, 5, 12, 30])
def test_gathered_mlm_loss_equals_the_full_computation(rng, rows):
    """The head on the gathered labelled positions gives the loss and gradients of the head on
    every position: with room to spare (12, 30), exactly full (5), and overflowing (3, which
    takes the every-position branch)."""
    states = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    labels = np.full((3, 4), -100)
    labels[0, 1], labels[0, 3], labels[1, 0], labels[2, 2], labels[2, 3] = 3, 7, 10, 0, 5
    labels = jnp.asarray(labels)

    def full(s, w):
        return obj.mlm_loss(jnp.tanh(s) @ w, labels)

    def gathered(s, w):
        return obj.gathered_mlm_loss(lambda x: jnp.tanh(x) @ w, s, labels, rows)

    want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(states, w)
    got, got_grads = jax.jit(jax.value_and_grad(gathered, argnums=(0, 1)))(states, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-6)
    # No labelled position at all: 0, with a zero (not NaN) gradient.
    none = jnp.full((3, 4), -100)
    loss, grad = jax.value_and_grad(
        lambda s: obj.gathered_mlm_loss(lambda x: x @ w, s, none, 4))(states)
    assert float(loss) == 0.0
    chex.assert_trees_all_close(grad, jnp.zeros_like(states))


def test_mlm_buffer_rows():
    assert obj.mlm_buffer_rows(8, 32, 0.25) == 64
    assert obj.mlm_buffer_rows(3, 7, 0.1) == 3  # ceil(2.1)
    assert obj.mlm_buffer_rows(2, 4, 1.0) == 8
    assert obj.mlm_buffer_rows(1, 1, 0.01) == 1


def test_rtp_loss_averages_every_position(rng):
    logits = rng.normal(size=(2, 5, 2))
    labels = rng.integers(0, 2, size=(2, 5))
    p = np_softmax(logits)
    expected = -np.mean(np.log(np.take_along_axis(p, labels[..., None], -1)))
    np.testing.assert_allclose(obj.rtp_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)),
                               expected, rtol=1e-5)


def test_hard_negatives_never_pick_the_diagonal(rng):
    b = 6
    sim = jnp.asarray(rng.normal(size=(b, b)) * 3, jnp.float32)
    for seed in range(20):
        neg_img, neg_txt = obj.sample_hard_negatives(jax.random.PRNGKey(seed), sim, sim)
        assert np.all(np.asarray(neg_img) != np.arange(b))
        assert np.all(np.asarray(neg_txt) != np.arange(b))


def test_hard_negative_distribution_is_softmax_without_diagonal(rng):
    b = 4
    sim = rng.normal(size=(b, b)).astype(np.float32)
    # Reference: diagonal -> -1000, softmax, zero the diagonal, multinomial (renormalised).
    w = sim.copy()
    np.fill_diagonal(w, -1000)
    w = np_softmax(w)
    np.fill_diagonal(w, 0)
    w /= w.sum(1, keepdims=True)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    draws = jax.vmap(lambda k: obj.sample_hard_negatives(k, jnp.asarray(sim), jnp.asarray(sim))[0])(keys)
    freq = np.stack([np.bincount(np.asarray(draws[:, r]), minlength=b) for r in range(b)]) / 4000
    np.testing.assert_allclose(freq, w, atol=0.03)


def test_hard_negatives_exclude_same_product():
    sim = jnp.zeros((4, 4))
    exclude = jnp.asarray(np.array([0, 0, 1, 1])[:, None] == np.array([0, 0, 1, 1])[None, :])
    for seed in range(10):
        neg, _ = obj.sample_hard_negatives(jax.random.PRNGKey(seed), sim, sim, exclude)
        assert np.all(np.asarray(neg)[:2] >= 2) and np.all(np.asarray(neg)[2:] < 2)


def test_itm_exclusions_follow_the_config():
    from fine_jax.stages.common import itm_exclusions

    batch = {"idx": jnp.asarray([4, 4, 7, 9]), "twin_group": jnp.asarray([4, 4, 7, 7])}
    assert itm_exclusions(batch, obj.LossConfig()) is None  # the reference: the diagonal only
    same_product = itm_exclusions(batch, obj.LossConfig(itm_exclude_same_product=True))
    np.testing.assert_array_equal(same_product, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0],
                                                 [0, 0, 0, 1]])
    twins = itm_exclusions(batch, obj.LossConfig(itm_exclude_twins=True))
    np.testing.assert_array_equal(twins, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    # The twin is the most similar item of every row; hard mining would draw it almost surely.
    sim = 50.0 * jnp.asarray(twins, jnp.float32)
    for seed in range(10):
        neg_img, neg_txt = obj.sample_hard_negatives(jax.random.PRNGKey(seed), sim, sim, twins)
        for neg in (np.asarray(neg_img), np.asarray(neg_txt)):
            assert np.all(neg[:2] >= 2) and np.all(neg[2:] < 2)
    with pytest.raises(ValueError, match="twin_group"):
        itm_exclusions({"idx": batch["idx"]}, obj.LossConfig(itm_exclude_twins=True))


def test_random_negatives_are_uniform_over_the_allowed_items():
    # A similarity that hard mining would follow almost surely: column 3 dominates every row.
    b = 4
    sim = np.zeros((b, b), np.float32)
    sim[:, 3] = 50.0
    exclude = jnp.asarray(np.array([0, 1, 2, 2])[:, None] == np.array([0, 1, 2, 2])[None, :])
    keys = jax.random.split(jax.random.PRNGKey(3), 3000)
    hard = jax.vmap(lambda k: obj.sample_hard_negatives(k, jnp.asarray(sim), jnp.asarray(sim))[0])(keys)
    rand = jax.vmap(lambda k: obj.sample_hard_negatives(k, jnp.asarray(sim), jnp.asarray(sim),
                                                        exclude, hard=False)[0])(keys)
    assert np.all(np.asarray(hard[:, 0]) == 3)
    freq = np.stack([np.bincount(np.asarray(rand[:, r]), minlength=b) for r in range(b)]) / 3000
    allowed = ~np.asarray(exclude)
    expected = allowed / allowed.sum(1, keepdims=True)
    np.testing.assert_allclose(freq, expected, atol=0.04)


def test_distill_alpha_ramps_over_epoch_zero():
    vals = [float(obj.distill_alpha(jnp.asarray(s), 100, 0.4)) for s in (0, 50, 99, 100, 250)]
    np.testing.assert_allclose(vals, [0.0, 0.2, 0.396, 0.4, 0.4], rtol=1e-6)
    assert float(obj.distill_alpha(jnp.asarray(0), 100, 0.4, warm_up=False)) == pytest.approx(0.4)


def test_soft_cross_entropy_matches_numpy(rng):
    logits = rng.normal(size=(3, 7))
    y = np_softmax(rng.normal(size=(3, 7)))
    expected = -np.mean(np.sum(y * np.log(np_softmax(logits)), 1))
    chex.assert_trees_all_close(obj.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(y)),
                                jnp.asarray(expected, jnp.float32), rtol=1e-5)


def test_losses_are_fp32_scalars_under_bf16_inputs(rng):
    # Under mixed precision the heads emit bf16; every loss still reduces in fp32 (module docstring).
    def bf16(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.bfloat16)

    b = 3
    unit = bf16(b, 8) / jnp.linalg.norm(bf16(b, 8), axis=-1, keepdims=True)
    gt = obj.diagonal_targets(b, b + 4).astype(jnp.bfloat16)
    losses = {
        "focal_itc": obj.focal_itc_loss(*(bf16(b, b + 4) for _ in range(4)), gt, 0.4, 0.25, 2.0),
        "soft_ce": obj.soft_cross_entropy(bf16(b, b + 4), gt),
        "itm": obj.itm_loss(bf16(3 * b, 2), b),
        "symbol": obj.symbol_loss(unit, unit),
        "mlm": obj.mlm_loss(bf16(b, 5, 11),
                            jnp.asarray(rng.integers(0, 11, size=(b, 5))).at[:, 0].set(-100)),
        "rtp": obj.rtp_loss(bf16(b, 5, 2), jnp.asarray(rng.integers(0, 2, size=(b, 5)))),
    }
    chex.assert_shape(jax.tree_util.tree_leaves(losses), ())
    chex.assert_type(jax.tree_util.tree_leaves(losses), jnp.float32)
    chex.assert_tree_all_finite(losses)


def test_mlm_batch_fits_counts_each_group_and_the_step_without_fallback_is_exact(rng):
    labels = np.full((4, 5), obj.IGNORE_LABEL)
    labels[0, :3] = 7  # group 0 (rows 0-1): 3 targets; group 1 (rows 2-3): 1 target
    labels[3, 0] = 9
    assert obj.mlm_batch_fits(labels, group_batch=2, rows=3)
    assert not obj.mlm_batch_fits(labels, group_batch=2, rows=2)
    assert obj.mlm_batch_fits(labels, group_batch=4, rows=4)
    assert not obj.mlm_batch_fits(labels, group_batch=4, rows=3)
    states = jnp.asarray(rng.standard_normal((4, 5, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 11)), jnp.float32)
    head = lambda x: jnp.tanh(x) @ w
    full = obj.mlm_loss(head(states), jnp.asarray(labels))
    for fallback in (True, False):
        got = obj.gathered_mlm_loss(head, states, jnp.asarray(labels), 4, fallback=fallback)
        np.testing.assert_allclose(got, full, rtol=1e-6)
    # Without the fallback, a batch that overflows the buffer gets a NaN loss, never a truncated one.
    assert np.isnan(obj.gathered_mlm_loss(head, states, jnp.asarray(labels), 3, fallback=False))
    np.testing.assert_allclose(obj.gathered_mlm_loss(head, states, jnp.asarray(labels), 3), full,
                               rtol=1e-6)
