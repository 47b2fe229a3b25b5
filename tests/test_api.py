"""fine_jax.api.FineModel on checkpoints the tests write: the evaluation transforms and the
MAA-integrated, L2-normalised features of FashionFINE.embed_images / embed_texts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fine_jax import config as config_lib
from PIL import Image

from fine_jax.api import FineModel
from fine_jax.checkpoint import Checkpointer, save_weights
from fine_jax.config import tiny_config
from fine_jax.data import image as image_ops
from fine_jax.data import text as text_ops
from fine_jax.models.fine import FashionFINE, ModelConfig, init_params

WORDS = ["the", "image", "description", "is", "black", "leather", "jacket", "red", "silk", "dress",
         "with", "zip", "pockets", "long", "sleeves", "##s"]
VOCAB = (["[PAD]", *text_ops.SYMBOL_TOKENS, "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)
MAX_LEN = 16
TEXTS = ["Black leather jacket with zip pockets.", "Red silk dress, long sleeves", "red dress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model's params, saved as a converted weights checkpoint with its vocab."""
    root = tmp_path_factory.mktemp("api")
    cfg = tiny_config(vocab_size=len(VOCAB), image_size=32, embed_dim=32)
    cfg.data.max_len = MAX_LEN
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = config_lib.model_config(cfg)
    params = jax.device_get(init_params(FashionFINE(config), jax.random.PRNGKey(0)))
    info = {"config": {"model": cfg.model.to_dict(), "data": {"max_len": MAX_LEN}}}
    save_weights(root / "weights", {"params": params}, info,
                 files={"vocab.txt": root / "vocab.txt"})
    return root, cfg, config, params


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in
            ((40, 30, 3), (32, 32, 3), (64, 48, 3))]


def test_encode_image_is_embed_images_after_the_test_transform(setup):
    root, _, config, params = setup
    model = FineModel.load(root / "weights", batch_size=2)
    pixels = images()
    z = model.encode_image(pixels)
    expected = FashionFINE(config).apply(
        {"params": params}, jnp.stack([image_ops.test_transform(im, 32) for im in pixels]),
        method=FashionFINE.embed_images)
    assert z.shape == (3, 32) and z.dtype == np.float32
    np.testing.assert_allclose(z, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    # PIL images (any mode), a single image, a batch array: the same features.
    np.testing.assert_allclose(model.encode_image([Image.fromarray(im) for im in pixels]), z,
                               atol=1e-6)
    np.testing.assert_allclose(model.encode_image(Image.fromarray(pixels[1]).convert("RGBA")),
                               z[1:2], atol=1e-6)
    np.testing.assert_allclose(model.encode_image(np.stack([pixels[1]] * 2)), z[[1, 1]], atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        model.encode_image([pixels[0].astype(np.float32)])


def test_encode_text_is_embed_texts_on_the_evaluation_layout(setup):
    root, _, config, params = setup
    model = FineModel.load(root / "weights", batch_size=2)
    z = model.encode_text(TEXTS)
    tokenizer = text_ops.Tokenizer(VOCAB)
    ids, masks = zip(*(text_ops.encode_eval_caption(tokenizer, t, MAX_LEN) for t in TEXTS))
    assert tokenizer.decode(ids[0], skip_special_tokens=True).startswith(
        "the image description is black leather jacket")
    expected = FashionFINE(config).apply({"params": params}, jnp.asarray(np.stack(ids)),
                                         jnp.asarray(np.stack(masks)),
                                         method=FashionFINE.embed_texts)
    assert z.shape == (3, 32)
    np.testing.assert_allclose(z, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.encode_text(TEXTS[2]), z[2:], atol=1e-6)
    assert model.encode_text([]).shape == (0, 32)


def test_match_probability_is_the_itm_head_on_the_fused_pair(setup):
    root, _, config, params = setup
    model = FineModel.load(root / "weights", batch_size=2)
    pixels = model.preprocess_images(images())
    ids, mask = model.tokenize(TEXTS)
    p = model.match_probability(pixels, ids, mask)
    def itm(module, x, ids, mask):
        fused = module.fuse(module.encode_text(ids, mask), mask, module.encode_image(x))
        return module.itm_logits(fused)

    logits = FashionFINE(config).apply({"params": params}, jnp.asarray(pixels), jnp.asarray(ids),
                                       jnp.asarray(mask), method=itm)
    assert p.shape == (3,) and p.dtype == np.float32
    np.testing.assert_allclose(p, jax.nn.softmax(logits, axis=-1)[:, 1], rtol=1e-5)
    # Pairing a different text with the same image changes the score: the head sees both.
    swapped = model.match_probability(pixels, ids[::-1], mask[::-1])
    assert not np.allclose(swapped, p)
    with pytest.raises(ValueError, match="one text per image"):
        model.match_probability(pixels[:2], ids, mask)
    assert model.match_probability(pixels[:0], ids[:0], mask[:0]).shape == (0,)


def test_load_a_training_workdir(setup, tmp_path):
    """A workdir's checkpoint (latest or a given step) with the vocab of its dataset."""
    root, cfg, config, params = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.data.data_dir = str(root)
    (tmp_path / "config.json").write_text(cfg.to_json_best_effort())
    ckpt = Checkpointer(tmp_path / "checkpoints")
    other = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    ckpt.save(3, {"step": np.int32(3), "params": params, "opt_state": {"mu": params}})
    ckpt.save(5, {"step": np.int32(5), "params": other, "opt_state": {"mu": other}})
    ckpt.close()
    latest = FineModel.load(tmp_path)
    earlier = FineModel.load(tmp_path, step=3)
    direct = FineModel.load(root / "weights")
    np.testing.assert_allclose(earlier.encode_text(TEXTS), direct.encode_text(TEXTS), atol=1e-6)
    assert not np.allclose(latest.encode_text(TEXTS), direct.encode_text(TEXTS), atol=1e-3)
    assert latest.max_len == MAX_LEN  # the run's evaluation text length


def test_missing_vocab_says_where_it_looked(setup, tmp_path):
    root, cfg, _, params = setup
    save_weights(tmp_path / "w", {"params": params}, {"config": {"model": cfg.model.to_dict()}})
    with pytest.raises(FileNotFoundError, match="pass vocab=PATH"):
        FineModel.load(tmp_path / "w")
    assert FineModel.load(tmp_path / "w", vocab=root / "vocab.txt").max_len == 180


def test_loading_a_checkpoint_without_trained_adapter_warns(setup, tmp_path):
    """A converted stage-3 (or ALBEF) checkpoint has no MAA: its z features are not trained ones."""
    root, cfg, _, params = setup
    info = {"config": {"model": cfg.model.to_dict()}, "source": {"layout": "tgir"},
            "report": {"filled": ["params/decoder_layer", "params/maa", "queues/text"]}}
    save_weights(tmp_path / "w", {"params": params}, info)
    with pytest.warns(UserWarning, match="did not provide params/maa"):
        FineModel.load(tmp_path / "w", vocab=root / "vocab.txt")


def test_embeddings_are_traced_at_the_models_matmul_precision(setup):
    """A model trained at model.matmul_precision=float32 embeds at it too (HIGHEST products)."""
    import dataclasses

    _, _, config, params = setup
    tokenizer = FineModel.load(setup[0] / "weights").tokenizer
    for precision, tag in (("float32", "HIGHEST"), ("default", "DEFAULT")):
        model = FineModel(dataclasses.replace(config, matmul_precision=precision), params,
                          tokenizer, MAX_LEN)
        ids = np.zeros((2, MAX_LEN), np.int32)
        text = model._embed_texts.lower(model.params, ids, ids).as_text()
        assert f"precision = [{tag}, {tag}]" in text
