"""The speed switches (bf16 compute, rematerialisation, fused attention, uint8 images, the gathered
MLM head) against the plain fp32 step: the same losses and updates, to each switch's precision."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fine_jax import config as config_lib
from fine_jax import stages
from fine_jax.config import tiny_config
from fine_jax.data import image as image_ops
from fine_jax.models.fine import FashionFINE, with_matmul_precision
from fine_jax.optim import make_optimizer
from fine_jax.stages.common import create_state

B = 4


def _cfg(stage="pretrain", **model):
    cfg = tiny_config()
    cfg.stage = stage
    cfg.train.global_batch_size = B
    cfg.loss.queue_size = 16
    cfg.model.vocab_size = 2048  # the tiny size's full vocab only slows the test down
    cfg.model.update(model)
    return cfg


def _batch(cfg, uint8=False):
    rng = np.random.default_rng(0)
    s, length = cfg.model.image_size, cfg.data.max_len
    pixels = rng.integers(0, 256, size=(B, s, s, 3), dtype=np.uint8)
    images = pixels if uint8 else np.stack([image_ops.normalize(p) for p in pixels])
    ids = rng.integers(100, 2000, size=(B, length)).astype(np.int32)
    mask = np.ones((B, length), np.int32)
    mask[:, -5:] = 0
    if cfg.stage == "tgir":
        return {"reference_image": images, "target_image": images[::-1].copy(), "input_ids": ids,
                "attention_mask": mask}
    labels = np.where(rng.random((B, length)) < 0.2, ids, -100).astype(np.int32)
    return {"image": images, "input_ids": ids, "attention_mask": mask, "mask_labels": labels,
            "replace_labels": (rng.random((B, length)) < 0.1).astype(np.int32),
            "idx": np.arange(B, dtype=np.int32), "neg_image": np.array([1, 2, 3, 0], np.int32),
            "neg_text": np.array([3, 0, 1, 2], np.int32)}


def _one_step(cfg, batch, deterministic=True, state=None):
    model = FashionFINE(config_lib.model_config(cfg))
    stage = stages.get(cfg.stage)
    optimizer, schedule = make_optimizer(cfg.optim, steps_per_epoch=10)
    loss_cfg = config_lib.loss_config(cfg)
    if state is None:
        state = create_state(model, optimizer, jax.random.PRNGKey(0),
                             stage.make_queues(loss_cfg, cfg.model.embed_dim))
    # At the float32 precision training runs at (on a GPU or TPU, float32 products in float32).
    step = jax.jit(with_matmul_precision(stage.make_step(
        model, optimizer, loss_cfg, 10, schedule, deterministic=deterministic), model.config))
    new, metrics = step(state, batch, jax.random.PRNGKey(3))
    return state, jax.device_get(new), jax.device_get(metrics)


def _compare(a, b, atol, rtol=0.0):
    (_, new_a, m_a), (_, new_b, m_b) = a, b
    for k in m_a:
        np.testing.assert_allclose(m_b[k], m_a[k], atol=atol, rtol=rtol, err_msg=k)
    chex.assert_trees_all_close(new_b["params"], new_a["params"], atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def base():
    """The plain fp32 stage-1 step, computed once for the comparisons below."""
    cfg = _cfg()
    batch = _batch(cfg)
    return batch, _one_step(cfg, batch)


def test_remat_and_fused_attention_give_the_same_step(base):
    batch, plain = base  # both switches in one step: each is a compile, most of this file's time
    _compare(plain, _one_step(_cfg(remat=True, attention="fused"), batch, state=plain[0]),
             atol=2e-5)


def test_scanned_layers_give_the_same_step(base):
    """model.scan_layers: the same parameters (stored layer by layer), losses and update."""
    batch, plain = base
    scanned = _one_step(_cfg(scan_layers=True), batch, state=plain[0])
    _compare(plain, scanned, atol=2e-5)


def test_scanned_layers_draw_dropout_per_layer():
    cfg = _cfg(scan_layers=True, remat=True)
    model = FashionFINE(config_lib.model_config(cfg))
    params = create_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), lambda r: {})["params"]
    ids = jnp.asarray(_batch(cfg)["input_ids"])
    mask = jnp.ones_like(ids)
    encode = jax.jit(lambda p, r: model.apply({"params": p}, ids, mask, False,
                                             method=FashionFINE.encode_text, rngs={"dropout": r}))
    a, b = encode(params, jax.random.PRNGKey(1)), encode(params, jax.random.PRNGKey(2))
    kept = model.apply({"params": params}, ids, mask, True, method=FashionFINE.encode_text)
    assert not np.allclose(a, b) and not np.allclose(a, kept)
    np.testing.assert_allclose(a, encode(params, jax.random.PRNGKey(1)))


def test_stage3_with_both_switches_gives_the_same_step():
    cfg = _cfg("tgir")
    batch = _batch(cfg)
    plain = _one_step(cfg, batch)
    _compare(plain, _one_step(_cfg("tgir", remat=True, attention="fused"), batch,
                              state=plain[0]), atol=2e-5)


def test_fused_attention_with_dropout_takes_the_explicit_path():
    """Attention dropout has no fused kernel: with dropout the fused setting computes exactly
    what the explicit path does, dropout masks included (both encoders, text and fusion)."""
    plain, fused = _cfg(), _cfg(attention="fused")
    assert plain.model.attention_dropout > 0
    batch = _batch(plain, uint8=True)
    params = create_state(FashionFINE(config_lib.model_config(plain)), optax.sgd(0.1),
                          jax.random.PRNGKey(0), lambda r: {})["params"]

    def encode(cfg, deterministic):
        model = FashionFINE(config_lib.model_config(cfg))

        def run(p):
            rngs = None if deterministic else {"dropout": jax.random.PRNGKey(5)}
            v = {"params": p}
            img = model.apply(v, batch["image"], method=FashionFINE.encode_image)
            txt = model.apply(v, batch["input_ids"], batch["attention_mask"], deterministic,
                              method=FashionFINE.encode_text, rngs=rngs)
            return img, model.apply(v, txt, batch["attention_mask"], img, deterministic,
                                    method=FashionFINE.fuse, rngs=rngs)
        return jax.jit(run)(params)

    for a, b in zip(encode(plain, False), encode(fused, False)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    dropped, kept = encode(fused, False)[1], encode(fused, True)[1]
    assert not np.allclose(dropped, kept)  # dropout was active


def test_bf16_compute_tracks_fp32(base):
    batch, plain = base
    bf16 = _one_step(_cfg(dtype="bfloat16"), batch, state=plain[0])
    for k in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_rtp", "loss_sym"):
        np.testing.assert_allclose(bf16[2][k], plain[2][k], rtol=3e-2, atol=1e-3, err_msg=k)
    # Parameters stay fp32 and move by the same AdamW step, to bf16 precision.
    for leaf in jax.tree_util.tree_leaves(bf16[1]["params"]):
        assert leaf.dtype == np.float32
    delta_a = jax.tree_util.tree_map(lambda n, o: n - o, plain[1]["params"], plain[0]["params"])
    delta_b = jax.tree_util.tree_map(lambda n, o: n - o, bf16[1]["params"], plain[0]["params"])
    flat_a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(delta_a)])
    flat_b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(delta_b)])
    cos = flat_a @ flat_b / (np.linalg.norm(flat_a) * np.linalg.norm(flat_b))
    assert cos > 0.9, cos


def test_uint8_images_give_the_float_step(base):
    _, plain = base
    cfg = _cfg()
    _compare(plain, _one_step(cfg, _batch(cfg, uint8=True), state=plain[0]), atol=1e-5)


def test_gathered_mlm_gives_the_full_step(base):
    batch, plain = base  # the default: gathered
    full = _cfg()
    full.loss.mlm_gather = False
    _compare(plain, _one_step(full, batch, state=plain[0]), atol=2e-5)


def test_unknown_attention_kind_is_a_clear_error():
    with pytest.raises(config_lib.ConfigError, match="model.attention"):
        config_lib.validate(_cfg(attention="flash"), num_devices=1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_wide_dense_is_torch_dense_with_a_product_for_the_bias_gradient(dtype):
    from fine_jax.models.layers import WideDense, torch_dense

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
    plain, wide = torch_dense(300, 16, dtype=dtype), WideDense(300, 16, dtype=dtype)
    params = plain.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal(params, wide.init(jax.random.PRNGKey(1), x))  # same init

    def loss(module, p):
        return jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))

    chex.assert_trees_all_equal(plain.apply(params, x), wide.apply(params, x))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    g_plain = jax.grad(lambda p: loss(plain, p))(params)
    g_wide = jax.grad(lambda p: loss(wide, p))(params)
    chex.assert_trees_all_close(g_wide, g_plain, rtol=tol, atol=tol)
    # the bias gradient is the column sum of the output gradient, here 21 rows
    assert float(jnp.abs(g_wide["params"]["bias"]).max()) > 0.1


def _bf16(key, shape):
    return jax.random.normal(jax.random.PRNGKey(key), shape).astype(jnp.bfloat16)


def _assert_rounded(got, want_f32):
    """``got`` (bf16 or f32) is ``want_f32`` up to bf16 rounding and float32 summation order."""
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(want_f32, np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


# Odd sizes on purpose: a product XLA's CPU backend routes away from YNNPACK would fail at run time
# (Eigen has no bf16 x bf16 -> f32 dot), so every form the products emit is compiled and run here.
@pytest.mark.parametrize("x_shape,n", [((1, 5), 3), ((3, 7, 16), 300), ((2, 44, 64), 64),
                                       ((37, 768), 24)])
def test_bf16_matmul_is_the_float32_product_rounded(x_shape, n):
    from fine_jax.models.layers import bf16_matmul

    x, w = _bf16(0, x_shape), _bf16(1, (x_shape[-1], n))
    g = jax.random.normal(jax.random.PRNGKey(2), x_shape[:-1] + (n,))
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)

    def loss(f, a, b):
        return jnp.sum(f(a, b).astype(jnp.float32) * g)

    y = jax.jit(bf16_matmul)(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == x_shape[:-1] + (n,)
    _assert_rounded(y, xf @ wf)
    dx, dw = jax.jit(jax.grad(lambda a, b: loss(bf16_matmul, a, b), argnums=(0, 1)))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    rx, rw = jax.grad(lambda a, b: loss(jnp.matmul, a, b), argnums=(0, 1))(xf, wf)
    _assert_rounded(dx, rx)
    _assert_rounded(dw, rw)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8), (1, 12, 44, 17, 32)])
def test_bf16_batched_products_are_the_float32_products(shape):
    from fine_jax.models.layers import bf16_bmm, bf16_bmm_nt

    b, h, m, n, k = shape
    q, kk, v = _bf16(0, (b, h, m, k)), _bf16(1, (b, h, n, k)), _bf16(2, (b, h, n, k))
    f32 = lambda t: t.astype(jnp.float32)

    def attend(nt, nn_, q, kk, v):
        probs = jax.nn.softmax(nt(q, kk), axis=-1)
        return jnp.sum(jnp.sin(nn_(probs.astype(v.dtype), v).astype(jnp.float32)))

    def ref_nt(a, c):
        return jnp.einsum("bhmk,bhnk->bhmn", f32(a), f32(c))

    def ref_nn(a, c):
        return jnp.einsum("bhmn,bhnk->bhmk", f32(a), f32(c))

    logits = jax.jit(bf16_bmm_nt)(q, kk)
    assert logits.dtype == jnp.float32  # float32 logits for the softmax
    _assert_rounded(logits, ref_nt(q, kk))
    _assert_rounded(jax.jit(bf16_bmm)(q, v.transpose(0, 1, 3, 2)), ref_nn(q, v.transpose(0, 1, 3, 2)))
    got = jax.jit(jax.grad(lambda *a: attend(bf16_bmm_nt, bf16_bmm, *a), argnums=(0, 1, 2)))(q, kk, v)
    want = jax.grad(lambda *a: attend(ref_nt, ref_nn, *a), argnums=(0, 1, 2))(
        f32(q), f32(kk), f32(v))
    for a, r in zip(got, want):
        assert a.dtype == jnp.bfloat16
        _assert_rounded(a, r)


def test_dense_dot_general_leaves_float32_alone():
    from fine_jax.models.layers import dense_dot_general

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (16, 5))
    dims = (((2,), (0,)), ((), ()))
    chex.assert_trees_all_equal(jax.jit(dense_dot_general, static_argnums=2)(x, w, dims),
                                jax.jit(jax.lax.dot_general, static_argnums=2)(x, w, dims))


def test_auto_dtype_is_chosen_per_platform(tmp_path):
    from fine_jax.models.fine import cpu_has_amx_bf16, resolve_dtype

    assert resolve_dtype("auto", "tpu")[0] == "bfloat16"
    assert resolve_dtype("auto", "gpu")[0] == "bfloat16"
    assert resolve_dtype("auto", "cpu", amx_bf16=True)[0] == "bfloat16"
    assert resolve_dtype("auto", "cpu", amx_bf16=False)[0] == "float32"
    assert resolve_dtype("float32", "tpu")[0] == "float32"  # a set dtype is kept
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_amx_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_int8\n")
    assert not cpu_has_amx_bf16(str(info))
    assert not cpu_has_amx_bf16(str(tmp_path / "no_such_file"))


def test_reference_configs_take_the_platform_dtype_and_the_demos_float32():
    import pathlib

    from fine_jax.models.fine import resolve_dtype

    configs = pathlib.Path(__file__).parents[1] / "configs"
    for name in ("fashiongen.py", "fashiongen_retrieval.py", "fashioniq_tgir.py"):
        c = config_lib.load_config_file(configs / name)
        assert c.model.dtype == "auto", name
        assert config_lib.model_config(c).compute_dtype == jnp.dtype(resolve_dtype("auto")[0])
        notes = config_lib.resolve_platform_defaults(c)
        assert c.model.dtype == resolve_dtype("auto")[0]
        assert c.model.matmul_precision == "default"  # this CPU
        assert len(notes) == 2 and notes[0].startswith(f"model.dtype=auto: {c.model.dtype} (")
        assert notes[1].startswith("model.matmul_precision=auto: default (CPU")
        assert config_lib.resolve_platform_defaults(c) == []  # resolved once, in place
    for name in ("demo.py", "demo_retrieval.py", "demo_tgir.py"):
        assert config_lib.load_config_file(configs / name).model.dtype == "float32", name
    c = tiny_config(dtype="bf16")
    with pytest.raises(config_lib.ConfigError, match="'auto'.*got 'bf16'"):
        config_lib.validate(c)


def test_matmul_precision_is_chosen_per_platform_and_dtype():
    from fine_jax.models.fine import resolve_matmul_precision

    for platform in ("gpu", "cuda", "tpu"):  # the reference's float32 products, not TF32 / bf16
        assert resolve_matmul_precision("auto", "float32", platform)[0] == "float32"
        assert resolve_matmul_precision("auto", "bfloat16", platform)[0] == "default"
    assert resolve_matmul_precision("auto", "float32", "cpu")[0] == "default"
    assert resolve_matmul_precision("tensorfloat32", "float32", "gpu") == ("tensorfloat32",
                                                                           "set in the config")
    with pytest.raises(config_lib.ConfigError, match="matmul_precision='highest'.*float32"):
        config_lib.validate(tiny_config(matmul_precision="highest"))


def _dot_precisions(text: str) -> set[str]:
    """The precision tags of the float32 x float32 products in a lowered program."""
    import re

    found = set()
    for line in text.splitlines():
        if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
            m = re.search(r"precision = \[(\w+), (\w+)\]", line)
            operands = re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\)", line)
            if m and operands and all(o.endswith("xf32>") for o in operands.groups()):
                found.add(m.group(1))
    return found


@pytest.mark.parametrize("precision, tag", [("float32", "HIGHEST"), ("tensorfloat32", "HIGH"),
                                            ("default", "DEFAULT")])
def test_the_step_is_traced_at_the_configured_precision(precision, tag):
    """Every float32 product of the stage-1 step, the patch convolution included, carries the
    precision of model.matmul_precision; JAX's own setting is left as it was afterwards."""
    cfg = _cfg(matmul_precision=precision)
    model = FashionFINE(config_lib.model_config(cfg))
    optimizer, schedule = make_optimizer(cfg.optim, steps_per_epoch=10)
    st = stages.get("pretrain")
    step = st.make_step(model, optimizer, config_lib.loss_config(cfg), 10, schedule)
    state = jax.eval_shape(lambda r: create_state(
        model, optimizer, r, st.make_queues(config_lib.loss_config(cfg), cfg.model.embed_dim)),
        jax.random.PRNGKey(0))
    batch = _batch(cfg)
    before = jax.config.jax_default_matmul_precision
    text = jax.jit(with_matmul_precision(step, model.config)).lower(
        state, batch, jax.random.PRNGKey(1)).as_text()
    assert jax.config.jax_default_matmul_precision == before
    assert "stablehlo.convolution" in text
    found = _dot_precisions(text)
    # Every product but the bias gradients' (layers.add_bias, HIGHEST whatever the setting).
    assert tag in found and found - {"HIGHEST"} == {tag} - {"HIGHEST"}
