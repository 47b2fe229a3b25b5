"""EMA update and feature queues (method_spec §1.6-§1.7) against NumPy, leaf by leaf."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fine_jax.momentum import (
    IDX_QUEUE_FILL,
    ema_update,
    enqueue,
    enqueue_rows,
    init_queues,
    init_tgir_queues,
)


def _tree(rng, scale=1.0, dtype=np.float32):
    return {
        "visual_encoder": {"kernel": (rng.normal(size=(3, 4)) * scale).astype(dtype),
                           "bias": (rng.normal(size=(4,)) * scale).astype(dtype)},
        "text_proj": {"kernel": (rng.normal(size=(4, 2)) * scale).astype(dtype)},
        "temp_like": np.asarray(rng.normal() * scale, dtype),
    }


@pytest.mark.parametrize("m", [0.995, 0.5, 0.0, 1.0])
def test_ema_update_matches_numpy_leaf_by_leaf(m):
    rng = np.random.default_rng(0)
    momentum, online = _tree(rng), _tree(rng, scale=3.0)
    # Online modules without a momentum copy (MAA, heads, temp) must be ignored, not required.
    online["maa"] = {"W_v": rng.normal(size=(4, 4)).astype(np.float32)}
    online["itm_head"] = {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}

    out = ema_update(jax.tree_util.tree_map(jnp.asarray, momentum),
                     jax.tree_util.tree_map(jnp.asarray, online), m)
    expected = jax.tree_util.tree_map(
        lambda a, b: m * a.astype(np.float64) + (1.0 - m) * b.astype(np.float64),
        momentum, {k: online[k] for k in momentum})
    chex.assert_trees_all_equal_structs(out, momentum)
    chex.assert_trees_all_equal_shapes(out, momentum)
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
    if m == 0.0:
        chex.assert_trees_all_close(out, {k: online[k] for k in momentum})
    if m == 1.0:
        chex.assert_trees_all_close(out, momentum)


def test_ema_update_keeps_momentum_dtypes_and_jits():
    rng = np.random.default_rng(1)
    momentum = jax.tree_util.tree_map(jnp.asarray, _tree(rng))
    # A bf16 online tree still gives fp32 momentum weights: the EMA accumulates in their dtype.
    online = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(rng))
    out = jax.jit(ema_update)(momentum, online, jnp.float32(0.995))
    chex.assert_trees_all_equal_dtypes(out, momentum)
    expected = jax.tree_util.tree_map(
        lambda a, b: 0.995 * np.asarray(a, np.float64) + 0.005 * np.asarray(b.astype(jnp.float32),
                                                                            np.float64),
        momentum, online)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(out)


def test_ema_update_needs_every_momentum_module_online():
    rng = np.random.default_rng(2)
    momentum = _tree(rng)
    online = {k: v for k, v in _tree(rng).items() if k != "text_proj"}
    with pytest.raises(KeyError, match="text_proj"):
        ema_update(momentum, online, 0.995)


def _unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_init_queues():
    q = init_queues(jax.random.PRNGKey(0), 16, 8)
    chex.assert_shape([q["image"], q["text"]], (16, 8))
    chex.assert_shape(q["idx"], (16,))
    chex.assert_shape(q["ptr"], ())
    chex.assert_type([q["image"], q["text"]], jnp.float32)
    chex.assert_type([q["idx"], q["ptr"]], jnp.int32)
    chex.assert_trees_all_close(jnp.linalg.norm(q["image"], axis=1), jnp.ones(16), rtol=1e-5)
    chex.assert_trees_all_close(jnp.linalg.norm(q["text"], axis=1), jnp.ones(16), rtol=1e-5)
    assert (np.asarray(q["idx"]) == IDX_QUEUE_FILL).all() and int(q["ptr"]) == 0
    assert not np.allclose(q["image"], q["text"])  # two independent draws
    assert "idx" not in init_queues(jax.random.PRNGKey(0), 16, 8, with_idx=False)


def test_enqueue_writes_at_pointer_and_wraps():
    size, dim, batch = 12, 4, 4
    rng = np.random.default_rng(3)
    q = init_queues(jax.random.PRNGKey(1), size, dim)
    ref = {k: np.array(v) for k, v in q.items()}
    step = jax.jit(enqueue)
    writes = []
    for t in range(5):  # 5 writes of 4 rows into 12: the pointer wraps after the third
        img, txt = _unit_rows(rng, batch, dim), _unit_rows(rng, batch, dim)
        writes.append(img)
        idx = rng.integers(0, 1000, size=batch).astype(np.int32)
        q = step(q, jnp.asarray(img), jnp.asarray(txt), jnp.asarray(idx))
        p = int(ref["ptr"])
        ref["image"][p : p + batch] = img
        ref["text"][p : p + batch] = txt
        ref["idx"][p : p + batch] = idx
        ref["ptr"] = np.asarray((p + batch) % size, np.int32)
        chex.assert_trees_all_close(q, ref)
        chex.assert_type(q["ptr"], jnp.int32)
        assert int(q["ptr"]) == [4, 8, 0, 4, 8][t]
    # The two writes after the wrap overwrote the oldest rows; the last block still holds the third.
    chex.assert_trees_all_close(q["image"][0:4], writes[3])
    chex.assert_trees_all_close(q["image"][4:8], writes[4])
    chex.assert_trees_all_close(q["image"][8:12], writes[2])


def test_enqueue_without_idx_queue_and_missing_idx():
    rng = np.random.default_rng(4)
    q = init_queues(jax.random.PRNGKey(2), 8, 4, with_idx=False)
    img, txt = _unit_rows(rng, 4, 4), _unit_rows(rng, 4, 4)
    out = enqueue(q, jnp.asarray(img), jnp.asarray(txt))
    assert set(out) == {"image", "text", "ptr"}
    chex.assert_trees_all_close(out["image"][:4], img)
    chex.assert_trees_all_close(out["text"][:4], txt)
    chex.assert_trees_all_close(out["image"][4:], q["image"][4:])
    assert int(out["ptr"]) == 4
    with pytest.raises(ValueError, match="idx"):
        enqueue(init_queues(jax.random.PRNGKey(2), 8, 4), jnp.asarray(img), jnp.asarray(txt))


def test_enqueue_casts_features_to_the_queue_dtype():
    # Under bf16 compute the momentum features arrive in bf16; the queue stays fp32.
    q = init_queues(jax.random.PRNGKey(3), 8, 4)
    feats = jnp.full((2, 4), 0.5, jnp.bfloat16)
    out = enqueue(q, feats, feats, jnp.arange(2))
    chex.assert_trees_all_equal_dtypes(out, q)
    chex.assert_trees_all_close(out["image"][:2], jnp.full((2, 4), 0.5, jnp.float32))


def test_init_tgir_queues():
    q = init_tgir_queues(jax.random.PRNGKey(0), 32, 8)
    assert set(q) == {"image", "fusion", "image_ptr", "fusion_ptr"}
    chex.assert_shape([q["image"], q["fusion"]], (32, 8))
    chex.assert_shape([q["image_ptr"], q["fusion_ptr"]], ())
    chex.assert_type([q["image_ptr"], q["fusion_ptr"]], jnp.int32)
    for name in ("image", "fusion"):
        chex.assert_trees_all_close(jnp.linalg.norm(q[name], axis=1), jnp.ones(32), rtol=1e-5)
    assert int(q["image_ptr"]) == 0 and int(q["fusion_ptr"]) == 0
    assert not np.allclose(q["image"], q["fusion"])


def test_enqueue_rows_two_pointers_wrap_independently():
    # Stage 3: the image queue takes [target; reference] = 2B rows per step, the fusion queue B rows,
    # each at its own pointer.
    size, dim, b = 16, 4, 2
    rng = np.random.default_rng(5)
    q = init_tgir_queues(jax.random.PRNGKey(4), size, dim)
    ref = {k: np.array(v) for k, v in q.items()}
    write = jax.jit(enqueue_rows)
    image_ptrs, fusion_ptrs = [], []
    for _ in range(6):
        image_rows = _unit_rows(rng, 2 * b, dim)
        fusion_rows = _unit_rows(rng, b, dim)
        q["image"], q["image_ptr"] = write(q["image"], q["image_ptr"], jnp.asarray(image_rows))
        q["fusion"], q["fusion_ptr"] = write(q["fusion"], q["fusion_ptr"], jnp.asarray(fusion_rows))
        p = int(ref["image_ptr"])
        ref["image"][p : p + 2 * b] = image_rows
        ref["image_ptr"] = np.asarray((p + 2 * b) % size, np.int32)
        p = int(ref["fusion_ptr"])
        ref["fusion"][p : p + b] = fusion_rows
        ref["fusion_ptr"] = np.asarray((p + b) % size, np.int32)
        chex.assert_trees_all_close(q, ref)
        chex.assert_type([q["image_ptr"], q["fusion_ptr"]], jnp.int32)
        image_ptrs.append(int(q["image_ptr"]))
        fusion_ptrs.append(int(q["fusion_ptr"]))
    assert image_ptrs == [4, 8, 12, 0, 4, 8]  # back to 0 exactly at Q
    assert fusion_ptrs == [2, 4, 6, 8, 10, 12]
