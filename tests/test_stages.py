"""The three stages' steps against NumPy transcriptions of their formulas, number for number.

Each test runs a step in its deterministic mode (no dropout) with given ITM hard negatives, then
recomputes every loss term from the model's own features with plain NumPy: the default stage-1
objective (momentum keys, queue, product-id targets over batch and queue, distillation, symbol,
ITM pair order and labels, MLM, RTP), stage 2 (diagonal targets, ITC + ITM) and stage 3 (the TGIR
banks, the reference's momentum-head quirk and its fix, both queues).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fine_jax import config as config_lib
from fine_jax.config import tiny_config
from fine_jax.models.fine import MOMENTUM_MODULES, VARIANT_MODULES, FashionFINE
from fine_jax.momentum import ema_update
from fine_jax.stages import pretrain, retrieval, tgir
from fine_jax.stages.common import create_state
from test_objectives import np_focal, np_softmax
from test_train_step import make_batch

M = FashionFINE
B = 8


def build(stage_module, cfg, steps_per_epoch=10):
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer = optax.adamw(1e-3, weight_decay=0.02)
    state = create_state(model, optimizer, jax.random.PRNGKey(0),
                         stage_module.make_queues(loss_cfg, cfg.model.embed_dim))
    step = stage_module.make_step(model, optimizer, loss_cfg, steps_per_epoch,
                                  deterministic=True)
    return model, loss_cfg, state, jax.jit(step)


def stage_cfg(stage, **model):
    c = tiny_config(vocab_size=512, **model)
    c.stage = stage
    c.loss.queue_size = 32
    return c


def run(model, p, method, *args):
    return np.asarray(model.apply({"params": p}, *args, method=method), np.float64)


def np_ce(logits, labels):
    p = np_softmax(logits)
    return float(np.mean(-np.log(p[np.arange(len(labels)), labels])))


def np_itm(model, params, txt, mask, img, neg_image, neg_text):
    """The reference pair order: B positives, (text b, neg image), (neg text, image b)."""
    txt_all = np.concatenate([txt, txt, txt[neg_text]])
    mask_all = np.concatenate([mask, mask, mask[neg_text]])
    img_all = np.concatenate([img, img[neg_image], img])
    fused = model.apply({"params": params}, txt_all, mask_all, img_all, method=M.fuse)
    logits = run(model, params, M.itm_logits, fused)
    labels = np.array([1] * B + [0] * (2 * B))
    return np_ce(logits, labels), np.asarray(fused[:B])


def given_negatives(seed=0):
    rng = np.random.default_rng(seed)
    neg_image = np.array([(b + 1 + rng.integers(B - 1)) % B for b in range(B)], np.int32)
    neg_text = np.array([(b + 1 + rng.integers(B - 1)) % B for b in range(B)], np.int32)
    return neg_image, neg_text


def test_stage1_default_loss_matches_a_numpy_transcription():
    cfg = stage_cfg("pretrain")
    model, c, state, step = build(pretrain, cfg, steps_per_epoch=10)
    # A non-trivial queue: its ids repeat some of the batch's products (queue positives).
    batch = make_batch(cfg)
    queues = dict(state["queues"])
    queues["idx"] = queues["idx"].at[:6].set(jnp.asarray([0, 1, 1, 2, 3, 3]))
    state = dict(state, queues=queues, step=jnp.asarray(4, jnp.int32))  # alpha ramp 0.4 * 4 / 10
    neg_image, neg_text = given_negatives()
    batch = dict(batch, neg_image=neg_image, neg_text=neg_text)
    new_state, metrics = step(state, batch, jax.random.PRNGKey(3))

    params = state["params"]
    momentum = ema_update(state["momentum"], params, c.momentum)
    mp = {**params, **momentum}
    img = model.apply({"params": params}, batch["image"], method=M.encode_image)
    txt = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      method=M.encode_text)
    z_v = run(model, params, lambda m, x: m.image_features(x)[1], img)
    z_t = run(model, params, lambda m, x, k: m.text_features(x, k)[1], txt,
              batch["attention_mask"])
    g_v_m = run(model, mp, lambda m, x: m.image_global(m.encode_image(x)), batch["image"])
    g_t_m = run(model, mp, lambda m, i, k: m.text_global(m.encode_text(i, k)),
                batch["input_ids"], batch["attention_mask"])
    temp = float(params["temp"])
    q_img, q_txt = np.asarray(queues["image"], np.float64), np.asarray(queues["text"], np.float64)
    keys_t, keys_v = np.concatenate([g_t_m, q_txt]), np.concatenate([g_v_m, q_img])
    idx_all = np.concatenate([batch["idx"], np.asarray(queues["idx"])])
    pos = (batch["idx"][:, None] == idx_all[None, :]).astype(np.float64)
    y_gt = pos / pos.sum(1, keepdims=True)
    alpha = 0.4 * 4 / 10
    y_i2t = alpha * np_softmax(g_v_m @ keys_t.T / temp) + (1 - alpha) * y_gt
    y_t2i = alpha * np_softmax(g_t_m @ keys_v.T / temp) + (1 - alpha) * y_gt
    l_i2t = np_focal(z_v @ keys_t.T / temp, y_i2t, c.alpha_focal, c.gamma_focal)
    l_t2i = np_focal(z_t @ keys_v.T / temp, y_t2i, c.alpha_focal, c.gamma_focal)
    np.testing.assert_allclose(metrics["loss_i2t"], l_i2t, rtol=2e-4)
    np.testing.assert_allclose(metrics["loss_t2i"], l_t2i, rtol=2e-4)
    np.testing.assert_allclose(metrics["loss_itc"], (l_i2t + l_t2i) / 2, rtol=2e-4)

    sym = run(model, params, M.symbol_feature, txt, batch["attention_mask"])
    l_sym = float(np.mean(1 - (1 + np.sum(sym * z_v, -1)) / 2))
    np.testing.assert_allclose(metrics["loss_sym"], l_sym, rtol=1e-4, atol=1e-6)

    l_itm, fused = np_itm(model, params, np.asarray(txt), batch["attention_mask"],
                          np.asarray(img), neg_image, neg_text)
    np.testing.assert_allclose(metrics["loss_itm"], l_itm, rtol=1e-4)

    mlm = run(model, params, M.mlm_logits, fused).reshape(-1, cfg.model.vocab_size)
    labels = batch["mask_labels"].reshape(-1)
    keep = labels != -100
    l_mlm = np_ce(mlm[keep], labels[keep])
    rtp = run(model, params, M.rtp_logits, fused).reshape(-1, 2)
    l_rtp = np_ce(rtp, batch["replace_labels"].reshape(-1))
    np.testing.assert_allclose(metrics["loss_mlm"], l_mlm, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss_rtp"], l_rtp, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], (l_i2t + l_t2i) / 2 + l_itm + l_sym + l_mlm + l_rtp,
                               rtol=2e-4)
    # Enqueue after the loss: the momentum features and ids of the batch at the old pointer.
    chex.assert_trees_all_close(new_state["queues"]["image"][:B], g_v_m.astype(np.float32),
                                atol=1e-5)
    np.testing.assert_array_equal(new_state["queues"]["idx"][:B], batch["idx"])


def test_itm_pair_order_matters():
    """Swapping the two negative blocks changes the loss: the step's order is the reference's."""
    cfg = stage_cfg("pretrain")
    model, _, state, step = build(pretrain, cfg)
    batch = make_batch(cfg)
    neg_image, neg_text = given_negatives(1)
    _, metrics = step(state, dict(batch, neg_image=neg_image, neg_text=neg_text),
                      jax.random.PRNGKey(0))
    params = state["params"]
    img = np.asarray(model.apply({"params": params}, batch["image"], method=M.encode_image))
    txt = np.asarray(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                 method=M.encode_text))
    right, _ = np_itm(model, params, txt, batch["attention_mask"], img, neg_image, neg_text)
    wrong, _ = np_itm(model, params, txt, batch["attention_mask"], img, neg_text, neg_image)
    np.testing.assert_allclose(metrics["loss_itm"], right, rtol=1e-4)
    assert abs(float(metrics["loss_itm"]) - wrong) > 1e-4


def test_clean_text_fix_feeds_itc_and_itm_the_clean_text_and_mlm_the_corrupted():
    """loss.clean_itc_itm_text (B5 fix): ITC, symbol and ITM are the reference step's on the clean
    text; MLM and RTP are the reference step's on the corrupted text."""
    cfg = stage_cfg("pretrain")
    _, _, state, step = build(pretrain, cfg)
    cfg_fix = stage_cfg("pretrain")
    cfg_fix.loss.clean_itc_itm_text = True
    _, _, _, step_fix = build(pretrain, cfg_fix)
    batch = make_batch(cfg)
    neg_image, neg_text = given_negatives(3)
    batch = dict(batch, neg_image=neg_image, neg_text=neg_text)
    clean = np.asarray(batch["input_ids"])
    corrupted = np.where(np.asarray(batch["mask_labels"]) >= 0, 3, clean).astype(np.int32)
    assert (clean != corrupted).any()
    batch["input_ids"] = corrupted  # the labelled positions "masked" with id 3
    key = jax.random.PRNGKey(0)
    _, fixed = step_fix(state, dict(batch, clean_ids=clean), key)
    _, on_clean = step(state, dict(batch, input_ids=clean), key)
    _, on_corrupted = step(state, batch, key)
    for k in ("loss_itc", "loss_sym", "loss_itm"):
        np.testing.assert_allclose(fixed[k], on_clean[k], rtol=1e-5)
        assert abs(float(fixed[k]) - float(on_corrupted[k])) > 1e-6
    for k in ("loss_mlm", "loss_rtp"):
        np.testing.assert_allclose(fixed[k], on_corrupted[k], rtol=1e-5)


@pytest.mark.parametrize("stage_module", [pretrain, retrieval], ids=["stage1", "stage2"])
def test_itm_exclude_twins_draws_no_negative_from_the_twin_group(stage_module):
    """loss.itm_exclude_twins: rows 0-6 form one twin group, so each of them must take row 7 as
    its negative image and text; row 7 takes one of rows 0-6."""
    stage = "pretrain" if stage_module is pretrain else "retrieval"
    cfg = stage_cfg(stage)
    cfg.loss.itm_exclude_twins = True
    model, _, state, step = build(stage_module, cfg)
    batch = make_batch(cfg)
    if stage == "retrieval":
        batch = {k: v for k, v in batch.items() if k not in ("mask_labels", "replace_labels")}
    with pytest.raises(ValueError, match="twin_group"):
        step(state, batch, jax.random.PRNGKey(0))
    group = np.array([0] * (B - 1) + [B - 1], np.int32)
    params = state["params"]
    img = np.asarray(model.apply({"params": params}, batch["image"], method=M.encode_image))
    txt = np.asarray(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                 method=M.encode_text))
    allowed = []
    for k in range(B - 1):
        for j in range(B - 1):
            neg_image = np.array([B - 1] * (B - 1) + [k], np.int32)
            neg_text = np.array([B - 1] * (B - 1) + [j], np.int32)
            loss, _ = np_itm(model, params, txt, batch["attention_mask"], img, neg_image, neg_text)
            allowed.append(float(loss))
    for seed in range(3):
        _, metrics = step(state, dict(batch, twin_group=group), jax.random.PRNGKey(seed))
        assert np.min(np.abs(np.array(allowed) - float(metrics["loss_itm"]))) < 1e-4


def test_deterministic_step_is_repeatable_and_draws_ignore_the_rng_when_negatives_are_given():
    cfg = stage_cfg("pretrain", hidden_dropout=0.1, attention_dropout=0.1)
    _, _, state, step = build(pretrain, cfg)
    batch = make_batch(cfg)
    neg_image, neg_text = given_negatives(2)
    batch = dict(batch, neg_image=neg_image, neg_text=neg_text)
    _, a = step(state, batch, jax.random.PRNGKey(0))
    _, b = step(state, batch, jax.random.PRNGKey(1))
    chex.assert_trees_all_close(a, b)


def test_stage2_matches_a_numpy_transcription():
    cfg = stage_cfg("retrieval")
    model, c, state, step = build(retrieval, cfg, steps_per_epoch=10)
    assert set(state["params"]) == set(VARIANT_MODULES["retrieval"]) | {"temp"}
    assert set(state["queues"]) == {"image", "text", "ptr"}  # no idx queue (B3)
    batch = {k: v for k, v in make_batch(cfg).items() if k not in ("mask_labels", "replace_labels")}
    batch["idx"] = np.arange(B, dtype=np.int32)
    neg_image, neg_text = given_negatives(3)
    batch = dict(batch, neg_image=neg_image, neg_text=neg_text)
    state = dict(state, step=jnp.asarray(20, jnp.int32))  # past epoch 0: alpha = 0.4
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0))

    params = state["params"]
    mp = {**params, **ema_update(state["momentum"], params, c.momentum)}
    img = model.apply({"params": params}, batch["image"], method=M.encode_image)
    txt = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      method=M.encode_text)
    z_v = run(model, params, lambda m, x: m.image_features(x)[1], img)
    z_t = run(model, params, lambda m, x, k: m.text_features(x, k)[1], txt,
              batch["attention_mask"])
    g_v_m = run(model, mp, lambda m, x: m.image_global(m.encode_image(x)), batch["image"])
    g_t_m = run(model, mp, lambda m, i, k: m.text_global(m.encode_text(i, k)),
                batch["input_ids"], batch["attention_mask"])
    temp = float(params["temp"])
    q = state["queues"]
    keys_t = np.concatenate([g_t_m, np.asarray(q["text"], np.float64)])
    keys_v = np.concatenate([g_v_m, np.asarray(q["image"], np.float64)])
    y_gt = np.eye(B, len(keys_t))  # diagonal targets over [batch; queue]
    y_i2t = 0.4 * np_softmax(g_v_m @ keys_t.T / temp) + 0.6 * y_gt
    y_t2i = 0.4 * np_softmax(g_t_m @ keys_v.T / temp) + 0.6 * y_gt
    l_itc = (np_focal(z_v @ keys_t.T / temp, y_i2t, c.alpha_focal, c.gamma_focal)
             + np_focal(z_t @ keys_v.T / temp, y_t2i, c.alpha_focal, c.gamma_focal)) / 2
    l_itm, _ = np_itm(model, params, np.asarray(txt), batch["attention_mask"], np.asarray(img),
                      neg_image, neg_text)
    np.testing.assert_allclose(metrics["loss_itc"], l_itc, rtol=2e-4)
    np.testing.assert_allclose(metrics["loss_itm"], l_itm, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], l_itc + l_itm, rtol=2e-4)
    assert int(new_state["queues"]["ptr"]) == B


def test_stage2_idx_queue_fix_uses_product_targets():
    cfg = stage_cfg("retrieval")
    cfg.loss.retrieval_idx_queue = True
    _, _, state, step = build(retrieval, cfg)
    assert "idx" in state["queues"]
    batch = {k: v for k, v in make_batch(cfg).items() if k not in ("mask_labels", "replace_labels")}
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(new_state["queues"]["idx"][:B], batch["idx"])
    assert np.isfinite(float(metrics["loss"]))


def tgir_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    base = make_batch(cfg, seed)
    return {"reference_image": base["image"],
            "target_image": rng.normal(size=base["image"].shape).astype(np.float32),
            "input_ids": base["input_ids"], "attention_mask": base["attention_mask"]}


@pytest.mark.parametrize("fix", [False, True])
def test_stage3_matches_a_numpy_transcription(fix):
    cfg = stage_cfg("tgir")
    cfg.loss.tgir_momentum_head_fix = fix
    model, c, state, step = build(tgir, cfg, steps_per_epoch=10)
    assert set(state["params"]) == set(VARIANT_MODULES["tgir"]) | {"temp"}
    assert set(state["queues"]) == {"image", "fusion", "image_ptr", "fusion_ptr"}
    # Make the momentum copy differ from the online weights, so that the B7 quirk shows.
    momentum = jax.tree_util.tree_map(lambda x: x * 1.5, state["momentum"])
    state = dict(state, momentum=momentum, step=jnp.asarray(20, jnp.int32))
    batch = tgir_batch(cfg)
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0))

    params = state["params"]
    mom = ema_update(state["momentum"], params, c.momentum)
    mp = {**params, **mom}
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def query(p, head):
        txt = model.apply({"params": p}, ids, mask, method=M.encode_text)
        ref = model.apply({"params": p}, batch["reference_image"], method=M.encode_image)
        fused = model.apply({"params": p}, txt, mask, ref, method=M.fuse)
        x = run(model, p, lambda m, h: m.text_proj(h), fused[:, 0])
        k, bias = (np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64))
        y = x @ k + bias
        return y / np.linalg.norm(y, axis=-1, keepdims=True)

    f = query(params, params["combine_text_proj"])
    f_m = query(mp, (mom if fix else params)["combine_text_proj"])  # B7: online head by default
    gal = lambda p, x: run(model, p, lambda m, i: m.image_global(m.encode_image(i)), x)
    t, t_m, r_m = (gal(params, batch["target_image"]), gal(mp, batch["target_image"]),
                   gal(mp, batch["reference_image"]))
    temp = float(params["temp"])
    q = state["queues"]
    image_bank = np.concatenate([t_m, r_m, np.asarray(q["image"], np.float64)])
    fusion_bank = np.concatenate([f_m, np.asarray(q["fusion"], np.float64)])
    y_f2i = 0.4 * np_softmax(f_m @ image_bank.T / temp) + 0.6 * np.eye(B, len(image_bank))
    y_i2f = 0.4 * np_softmax(t_m @ fusion_bank.T / temp) + 0.6 * np.eye(B, len(fusion_bank))
    ce = lambda logits, y: float(np.mean(-np.sum(y * np.log(np_softmax(logits)), -1)))
    l_f2i, l_i2f = ce(f @ image_bank.T / temp, y_f2i), ce(t @ fusion_bank.T / temp, y_i2f)
    np.testing.assert_allclose(metrics["loss_f2i"], l_f2i, rtol=2e-4)
    np.testing.assert_allclose(metrics["loss_i2f"], l_i2f, rtol=2e-4)
    np.testing.assert_allclose(metrics["loss"], (l_f2i + l_i2f) / 2, rtol=2e-4)
    nq = new_state["queues"]
    assert int(nq["image_ptr"]) == 2 * B and int(nq["fusion_ptr"]) == B
    chex.assert_trees_all_close(nq["image"][:2 * B], np.concatenate([t_m, r_m]).astype(np.float32),
                                atol=1e-5)
    chex.assert_trees_all_close(nq["fusion"][:B], f_m.astype(np.float32), atol=1e-5)


def test_stage3_learns_on_a_fixed_batch():
    cfg = stage_cfg("tgir")
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer = optax.adamw(1e-3)
    state = create_state(model, optimizer, jax.random.PRNGKey(0),
                         tgir.make_queues(loss_cfg, cfg.model.embed_dim))
    step = jax.jit(tgir.make_step(model, optimizer, loss_cfg, 100), donate_argnums=0)
    batch = tgir_batch(cfg)
    losses = []
    for i in range(12):
        state, metrics = step(state, batch, jax.random.PRNGKey(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_pad_row_of_the_word_embedding_gets_no_gradient():
    """The reference's word embedding has padding_idx=0: [PAD] never receives a gradient, although
    the unmasked MAA pooling, the phrase convolutions and the RTP loss all read [PAD] states."""
    cfg = stage_cfg("pretrain")
    model, c, state, _ = build(pretrain, cfg)
    batch = make_batch(cfg)
    assert (batch["input_ids"] == 0).any()
    loss_cfg = config_lib.loss_config(cfg)
    captured = {}

    def spy(grads, opt_state, params=None):
        captured["grads"] = grads
        return optax.adamw(1e-3).update(grads, opt_state, params)

    optimizer = optax.GradientTransformation(optax.adamw(1e-3).init, spy)
    step = pretrain.make_step(model, optimizer, loss_cfg, 10)

    def grads_of(state, batch, rng):
        step(state, batch, rng)
        return captured["grads"]

    word = np.asarray(jax.jit(grads_of)(state, batch, jax.random.PRNGKey(0))
                      ["text_encoder"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(word[0], 0.0)
    used = np.unique(batch["input_ids"][batch["input_ids"] > 0])
    assert np.abs(word[used]).sum(axis=1).min() > 0  # every other token in the batch has one
    assert set(MOMENTUM_MODULES) <= set(state["params"])
