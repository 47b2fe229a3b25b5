"""The stage-1 train step: MAA pooling, temperature clamp, EMA and queues, compile-once, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fine_jax import config as config_lib
from fine_jax.config import tiny_config
from fine_jax.models.fine import MOMENTUM_MODULES, FashionFINE
from fine_jax.momentum import IDX_QUEUE_FILL
from fine_jax.stages import pretrain
from fine_jax.stages.common import create_state
from test_objectives import np_focal


def make_batch(cfg, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    b = batch or cfg.train.global_batch_size
    size, length, vocab = cfg.model.image_size, cfg.data.max_len, cfg.model.vocab_size
    ids = rng.integers(5, vocab, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[:, length // 2:] = 0  # right padding
    ids[mask == 0] = 0
    labels = np.full((b, length), -100, np.int32)
    labels[:, 3:6] = ids[:, 3:6]
    replace = np.zeros((b, length), np.int32)
    replace[:, 4] = 1
    return {
        "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
        "input_ids": ids, "attention_mask": mask, "mask_labels": labels,
        "replace_labels": replace, "idx": (np.arange(b) // 2).astype(np.int32),
    }


def build(cfg, optimizer=None, steps_per_epoch=100):
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer = optimizer or optax.adamw(1e-3, weight_decay=0.02)
    state = create_state(model, optimizer, jax.random.PRNGKey(0),
                         pretrain.make_queues(loss_cfg, cfg.model.embed_dim))
    step = pretrain.make_step(model, optimizer, loss_cfg, steps_per_epoch)
    return model, state, step


@pytest.fixture(scope="module")
def cfg():
    c = tiny_config(vocab_size=512)
    return c


def test_maa_weights_sum_to_one_over_local_tokens(cfg):
    model, state, _ = build(cfg)
    batch = make_batch(cfg)
    p = {"params": state["params"]}
    img = model.apply(p, batch["image"], method=FashionFINE.encode_image)
    txt = model.apply(p, batch["input_ids"], batch["attention_mask"], method=FashionFINE.encode_text)
    _, _, w_img = model.apply(p, img, method=FashionFINE.image_features)
    _, _, w_txt = model.apply(p, txt, batch["attention_mask"], method=FashionFINE.text_features)
    n_patches = (cfg.model.image_size // cfg.model.patch_size) ** 2
    assert w_img.shape == (8, n_patches)  # CLS excluded
    assert w_txt.shape == (8, cfg.data.max_len - 2)  # [CLS] and the symbol slot excluded
    np.testing.assert_allclose(w_img.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w_txt.sum(-1), 1.0, rtol=1e-5)
    # Reference behaviour: padding takes part in the softmax (method_spec §10 B1).
    assert np.all(np.asarray(w_txt)[:, cfg.data.max_len // 2:] > 0)


def test_masked_pooling_fix_gives_padding_no_weight(cfg):
    c = tiny_config(vocab_size=512, mask_padding_in_pooling=True)
    model, state, _ = build(c)
    batch = make_batch(c)
    p = {"params": state["params"]}
    txt = model.apply(p, batch["input_ids"], batch["attention_mask"], method=FashionFINE.encode_text)
    _, _, w = model.apply(p, txt, batch["attention_mask"], method=FashionFINE.text_features)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(w)[:, c.data.max_len // 2 - 2:] == 0)


def test_symbol_one_way_hides_the_symbol_from_the_caption_only(cfg):
    c = tiny_config(vocab_size=512, symbol_one_way=True, hidden_dropout=0.0,
                    attention_dropout=0.0)
    model, state, _ = build(c)
    p = {"params": state["params"]}
    ids = np.asarray(make_batch(c)["input_ids"]).copy()
    mask = np.ones_like(ids)
    ids[:, 1] = 3  # a symbol at position 1
    other = ids.copy()
    other[:, 1] = 7  # another symbol
    words = ids.copy()
    words[:, 1] = 200  # a word, as in every evaluation caption

    def states(x, model=model):
        return np.asarray(model.apply(p, jnp.asarray(x), jnp.asarray(mask),
                                      method=FashionFINE.encode_text))

    a, b = states(ids), states(other)
    # The caption's states, [CLS] included, do not depend on which symbol is there ...
    np.testing.assert_allclose(np.delete(a, 1, axis=1), np.delete(b, 1, axis=1), atol=1e-5)
    # ... while the symbol's own state does, and reads the caption.
    assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-3
    changed = ids.copy()
    changed[:, 3] = 201
    assert np.abs(states(changed)[:, 1] - a[:, 1]).max() > 1e-3
    # Without a symbol at position 1 the flag changes nothing; with one, the reference model's
    # caption states do depend on the symbol.
    ref = FashionFINE(config_lib.model_config(tiny_config(vocab_size=512, hidden_dropout=0.0,
                                                          attention_dropout=0.0)))
    np.testing.assert_allclose(states(words), states(words, ref), atol=1e-6)
    assert np.abs(np.delete(states(ids, ref) - states(other, ref), 1, axis=1)).max() > 1e-3


def test_momentum_covers_exactly_six_modules(cfg):
    _, state, _ = build(cfg)
    assert set(state["momentum"]) == set(MOMENTUM_MODULES)
    assert state["queues"]["image"].shape == (cfg.loss.queue_size, cfg.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(state["queues"]["text"], axis=1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(state["queues"]["idx"]) == IDX_QUEUE_FILL)


def test_temperature_is_clamped_and_written_back(cfg):
    model, state, step = build(cfg, optimizer=optax.sgd(0.0))
    state["params"]["temp"] = jnp.asarray(0.9)
    state, metrics = jax.jit(step)(state, make_batch(cfg), jax.random.PRNGKey(1))
    assert float(metrics["temp"]) == pytest.approx(0.5)
    assert float(state["params"]["temp"]) == pytest.approx(0.5)
    state["params"]["temp"] = jnp.asarray(1e-5)
    state, metrics = jax.jit(step)(state, make_batch(cfg), jax.random.PRNGKey(1))
    assert float(state["params"]["temp"]) == pytest.approx(0.001)


def test_ema_and_queues_after_three_steps(cfg):
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    model, state, step = build(c)
    m = c.loss.momentum
    jstep = jax.jit(step)
    online = [state["params"]]
    momentum = [state["momentum"]]
    batches = [make_batch(c, seed=s) for s in range(3)]
    for i, batch in enumerate(batches):
        state, _ = jstep(state, batch, jax.random.PRNGKey(10 + i))
        online.append(state["params"])
    # Expected EMA, applied before each step's momentum forward with the pre-step online weights
    # (the temperature clamp is a no-op at its initial value).
    expected = momentum[0]
    expected_per_step = []
    for k in range(3):
        expected = jax.tree_util.tree_map(lambda a, b: m * np.asarray(a) + (1 - m) * np.asarray(b),
                                          expected, {n: online[k][n] for n in MOMENTUM_MODULES})
        expected_per_step.append(expected)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           state["momentum"], expected_per_step[-1])
    # Queue rows [kB, (k+1)B) hold step k's momentum features of the batch, then idx; ptr = 3B.
    b = c.train.global_batch_size
    q = state["queues"]
    assert int(q["ptr"]) == 3 * b
    for k, batch in enumerate(batches):
        mp = {"params": {**online[k], **expected_per_step[k]}}
        img = model.apply(mp, batch["image"], method=FashionFINE.encode_image)
        txt = model.apply(mp, batch["input_ids"], batch["attention_mask"],
                          method=FashionFINE.encode_text)
        g_v = model.apply(mp, img, method=FashionFINE.image_global)
        g_t = model.apply(mp, txt, method=FashionFINE.text_global)
        np.testing.assert_allclose(q["image"][k * b:(k + 1) * b], g_v, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(q["text"][k * b:(k + 1) * b], g_t, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(q["idx"][k * b:(k + 1) * b], batch["idx"])
    assert np.all(np.asarray(q["idx"][3 * b:]) == IDX_QUEUE_FILL)


def test_a_non_finite_step_changes_neither_weights_moments_nor_queues(cfg):
    """A NaN in the batch: the parameters, AdamW moments, queues and pointer stay as they were
    (the NaN momentum features are not enqueued), the momentum copies take their usual EMA step
    towards the unchanged parameters and stay finite, and the next finite step trains on."""
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    _, state, step = build(c)
    jstep = jax.jit(step)
    state, _ = jstep(state, make_batch(c, seed=0), jax.random.PRNGKey(0))
    before = jax.device_get(state)
    bad = make_batch(c, seed=1)
    bad["image"][0, 0, 0, 0] = np.nan
    state, metrics = jstep(state, bad, jax.random.PRNGKey(1))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    for part in ("params", "opt_state", "queues"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, after[part], before[part])
    assert int(after["step"]) == int(before["step"]) + 1
    m = c.loss.momentum
    jax.tree_util.tree_map(
        lambda new, old, online: np.testing.assert_allclose(new, m * old + (1 - m) * online,
                                                            rtol=1e-6, atol=1e-7),
        after["momentum"], before["momentum"],
        {k: before["params"][k] for k in before["momentum"]})
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(after))
    state, metrics = jstep(state, make_batch(c, seed=2), jax.random.PRNGKey(2))
    assert float(metrics["nonfinite"]) == 0.0
    assert int(state["queues"]["ptr"]) == 2 * c.train.global_batch_size


def test_queue_pointer_wraps(cfg):
    c = tiny_config(vocab_size=512)
    c.loss.queue_size = 16
    _, state, step = build(c)
    jstep = jax.jit(step)
    for i in range(3):
        state, _ = jstep(state, make_batch(c, seed=i), jax.random.PRNGKey(i))
    assert int(state["queues"]["ptr"]) == (3 * 8) % 16


def test_step_compiles_once(cfg):
    model, state, step = build(cfg)
    traces = []

    def counted(s, b, r):
        traces.append(1)
        return step(s, b, r)

    jstep = jax.jit(counted, donate_argnums=0)
    for i in range(4):
        state, metrics = jstep(state, make_batch(cfg, seed=i), jax.random.PRNGKey(i))
    jax.block_until_ready(metrics)
    assert len(traces) == 1


def test_loss_goes_down_on_a_fixed_batch(cfg):
    model, state, step = build(cfg, optimizer=optax.adamw(5e-4, weight_decay=0.02))
    jstep = jax.jit(step, donate_argnums=0)
    batch = make_batch(cfg)
    losses = []
    for i in range(25):
        state, metrics = jstep(state, batch, jax.random.PRNGKey(i))
        losses.append({k: float(v) for k, v in metrics.items()})
    first, last = losses[0], losses[-1]
    assert np.isfinite(last["loss"])
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert last["loss_mlm"] < first["loss_mlm"]
    assert last["loss_itc"] < first["loss_itc"]


def test_scratch_warmup_uses_online_keys_and_ignores_the_queue(cfg):
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    c.loss.scratch_warmup_steps = 2
    model, state, step = build(c)
    jstep = jax.jit(step)
    batch = make_batch(c)
    before = state["params"]
    other = dict(state, queues=dict(state["queues"], image=-state["queues"]["image"],
                                    text=-state["queues"]["text"]))
    s1, m1 = jstep(state, batch, jax.random.PRNGKey(0))
    s2, m2 = jstep(other, batch, jax.random.PRNGKey(0))
    # During the warm-up the queue takes no part in the loss ...
    np.testing.assert_allclose(m1["loss_itc"], m2["loss_itc"], rtol=1e-6)
    assert float(m1["alpha"]) == 0.0
    # ... the momentum modules track the online weights (coefficient 0) ...
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                           s1["momentum"], {k: before[k] for k in MOMENTUM_MODULES})
    # ... and the queue is still filled.
    assert int(s1["queues"]["ptr"]) == c.train.global_batch_size
    # After the warm-up the full objective runs again: the queue matters.
    s1, _ = jstep(s1, batch, jax.random.PRNGKey(1))
    s3, m3 = jstep(s1, batch, jax.random.PRNGKey(2))
    s4, m4 = jstep(dict(s1, queues=dict(s1["queues"], text=-s1["queues"]["text"])), batch,
                   jax.random.PRNGKey(2))
    assert not np.isclose(float(m3["loss_itc"]), float(m4["loss_itc"]))


def test_warmup_for_the_whole_run_skips_the_momentum_forward_with_the_same_result(cfg):
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    c.loss.scratch_warmup_steps = 10
    model = FashionFINE(config_lib.model_config(c))
    loss_cfg = config_lib.loss_config(c)
    optimizer = optax.adamw(1e-3, weight_decay=0.02)
    state = create_state(model, optimizer, jax.random.PRNGKey(0),
                         pretrain.make_queues(loss_cfg, c.model.embed_dim))
    full = jax.jit(pretrain.make_step(model, optimizer, loss_cfg, 100))
    short = jax.jit(pretrain.make_step(model, optimizer, loss_cfg, 100, total_steps=10))
    # The shortcut really leaves out the momentum towers: the compiled step does less work.
    batch = make_batch(c)
    rng = jax.random.PRNGKey(3)
    flops = [f.lower(state, batch, rng).compile().cost_analysis()["flops"] for f in (full, short)]
    assert flops[1] < 0.95 * flops[0]
    s_full, s_short = state, state
    for i in range(3):
        s_full, m_full = full(s_full, make_batch(c, seed=i), jax.random.PRNGKey(i))
        s_short, m_short = short(s_short, make_batch(c, seed=i), jax.random.PRNGKey(i))
        np.testing.assert_allclose(m_full["loss"], m_short["loss"], rtol=1e-5)
    # Two programs, two fusions: AdamW's first steps move a weight by about lr * sign(g), so fp32
    # rounding on a gradient near zero can move it by a few percent of lr (1e-3) more or less.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           s_full, s_short)


def test_scratch_warmup_can_keep_the_queue_in_the_softmax(cfg):
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    c.loss.scratch_warmup_steps = 5
    c.loss.scratch_warmup_queue = True
    model, state, step = build(c)
    jstep = jax.jit(step)
    batch = make_batch(c)
    other = dict(state, queues=dict(state["queues"], text=-state["queues"]["text"]))
    s1, m1 = jstep(state, batch, jax.random.PRNGKey(0))
    _, m2 = jstep(other, batch, jax.random.PRNGKey(0))
    assert not np.isclose(float(m1["loss_itc"]), float(m2["loss_itc"]))
    # Still the warm-up otherwise: no distillation, momentum = online weights.
    assert float(m1["alpha"]) == 0.0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                           s1["momentum"], {k: state["params"][k] for k in MOMENTUM_MODULES})


def test_scratch_warmup_maa_keys_contrast_the_maa_features_of_both_sides(cfg):
    c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    c.loss.scratch_warmup_steps = 1
    c.loss.scratch_warmup_maa_keys = True
    model, state, step = build(c)
    jstep = jax.jit(step)
    batch = make_batch(c)
    p = {"params": state["params"]}
    img = model.apply(p, batch["image"], method=FashionFINE.encode_image)
    txt = model.apply(p, batch["input_ids"], batch["attention_mask"], method=FashionFINE.encode_text)
    z_v = np.asarray(model.apply(p, img, method=FashionFINE.image_features)[1], np.float64)
    z_t = np.asarray(model.apply(p, txt, batch["attention_mask"],
                                 method=FashionFINE.text_features)[1], np.float64)
    temp = float(state["params"]["temp"])
    gt = (batch["idx"][:, None] == batch["idx"][None, :]).astype(np.float64)
    gt /= gt.sum(1, keepdims=True)
    sim = z_v @ z_t.T / temp  # the queue is out of the softmax during the warm-up
    expected = (np_focal(sim, gt, c.loss.alpha_focal, c.loss.gamma_focal)
                + np_focal(sim.T, gt, c.loss.alpha_focal, c.loss.gamma_focal)) / 2
    s1, m1 = jstep(state, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(m1["loss_itc"]), expected, rtol=1e-4)
    # The default keys (stop-gradient CLS features) give another loss on the same state.
    c0 = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
    c0.loss.scratch_warmup_steps = 1
    _, _, step0 = build(c0)
    jstep0 = jax.jit(step0)
    _, m0 = jstep0(state, batch, jax.random.PRNGKey(0))
    assert abs(float(m0["loss_itc"]) - expected) > 1e-3
    # After the warm-up the flag changes nothing: momentum keys and the queue, as in the reference.
    s2, m2 = jstep(s1, batch, jax.random.PRNGKey(1))
    _, m3 = jstep0(s1, batch, jax.random.PRNGKey(1))
    np.testing.assert_allclose(float(m2["loss"]), float(m3["loss"]), rtol=1e-6)


def test_scratch_warmup_random_negatives_then_hard_ones_and_alpha_ramps_after_it(cfg):
    def make(random_negatives):
        c = tiny_config(vocab_size=512, hidden_dropout=0.0, attention_dropout=0.0)
        c.loss.scratch_warmup_steps = 2
        c.loss.scratch_warmup_random_negatives = random_negatives
        _, state, step = build(c)  # 100 steps per epoch
        return c, state, jax.jit(step)

    c, state, hard = make(False)
    _, _, rand = make(True)
    batch, key = make_batch(c), jax.random.PRNGKey(0)
    # A warm-up step: the same keys and ITC, other negatives, so another ITM loss ...
    _, m_hard = hard(state, batch, key)
    s1, m_rand = rand(state, batch, key)
    np.testing.assert_allclose(m_hard["loss_itc"], m_rand["loss_itc"], rtol=1e-6)
    assert abs(float(m_hard["loss_itm"]) - float(m_rand["loss_itm"])) > 1e-4
    alphas = [float(m_rand["alpha"])]
    for i in range(1, 4):
        s_next, m_rand = rand(s1, make_batch(c, seed=i), jax.random.PRNGKey(i))
        if i >= 2:  # ... after it, the hard negatives of the reference.
            _, m_hard = hard(s1, make_batch(c, seed=i), jax.random.PRNGKey(i))
            np.testing.assert_allclose(m_hard["loss"], m_rand["loss"], rtol=1e-6)
        alphas.append(float(m_rand["alpha"]))
        s1 = s_next
    # Distillation is off in the warm-up, then alpha ramps from 0 over the epoch after it.
    assert alphas == pytest.approx([0.0, 0.0, 0.0, 0.004])


@pytest.mark.parametrize("flag", ["scratch_warmup_queue", "scratch_warmup_maa_keys",
                                  "scratch_warmup_random_negatives"])
def test_warmup_options_without_the_warmup_are_a_config_error(flag):
    from fine_jax import config as config_lib

    c = config_lib.base_config()
    c.loss[flag] = True
    with pytest.raises(config_lib.ConfigError, match="scratch_warmup_steps"):
        config_lib.validate(c)
    c.loss.scratch_warmup_steps = 10
    config_lib.validate(c)
