"""The supervised ViT warm-start (fine_jax.vit_pretrain): labels, learning, what it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fine_jax import config as config_lib
from fine_jax import vit_pretrain
from fine_jax.models.fine import FashionFINE, ModelConfig
from fine_jax.momentum import init_queues
from fine_jax.stages.common import create_state


class BarsSource:
    """Rows of a dark or light bar, vertical ("SHIRTS") or horizontal ("PANTS"): only the shape
    tells the class, the colours are drawn at random."""

    def __init__(self, n=48, size=32, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = ["SHIRTS" if i % 2 else "PANTS" for i in range(n)]
        self.images = []
        for label in self.labels:
            img = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
            bar = rng.integers(0, 256, 3).astype(np.uint8)
            if label == "SHIRTS":
                img[:, size // 2 - 4:size // 2 + 4] = bar
            else:
                img[size // 2 - 4:size // 2 + 4, :] = bar
            self.images.append(img)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "subcategory": self.labels[i], "category": "CLOTHING"}

    @property
    def row_subcategory(self):
        return list(self.labels)

    @property
    def row_category(self):
        return ["CLOTHING"] * len(self.labels)

    def description(self, i):
        shape = "vertical" if self.labels[i] == "SHIRTS" else "horizontal"
        rare = " Zigzag." if i == 0 else ""  # in fewer rows than a caption word label needs
        return f"A {shape} bar, with stitching.{rare}"

    def metadata(self):
        return {"description": [self.description(i) for i in range(len(self))]}


class CaptionBarsSource(BarsSource):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "description": self.description(i)}


def tiny_config(steps):
    c = config_lib.base_config()
    c.model.update(dict(image_size=32, patch_size=8, vision_width=32, vision_depth=1,
                        vision_heads=2, vocab_size=64, hidden_size=32, num_layers=2,
                        fusion_layer=1, num_heads=2, intermediate_size=64, embed_dim=16,
                        max_position_embeddings=16))
    c.train.global_batch_size = 16
    c.train.log_every = 5
    c.data.num_threads = 1
    c.init.vit_pretrain_steps = steps
    c.init.vit_pretrain_lr = 3e-3
    return c


def fresh_state(cfg):
    model = FashionFINE(config_lib.model_config(cfg))
    return model, create_state(model, optax.adamw(1e-3), jax.random.PRNGKey(0),
                               lambda r: init_queues(r, 32, model.config.embed_dim))


def test_class_table_is_sorted_and_checks_the_label():
    src = BarsSource(6)
    assert vit_pretrain.class_table(src, "subcategory") == {"PANTS": 0, "SHIRTS": 1}
    assert vit_pretrain.class_table(src, "category") == {"CLOTHING": 0}
    with pytest.raises(config_lib.ConfigError, match="vit_pretrain_label"):
        vit_pretrain.class_table(src, "colour")


def test_caption_word_labels_are_the_informative_words():
    src = CaptionBarsSource(12)
    # "a", "bar", "with", "stitching" are in every description; "zigzag" in one.
    assert vit_pretrain.class_table(src, "caption_words") == {"horizontal": 0, "vertical": 1}
    transform = vit_pretrain.ClassifyTransform({"horizontal": 0, "vertical": 1}, "caption_words",
                                               32, hflip=False)
    out = transform(src[1], np.random.default_rng(0))
    np.testing.assert_array_equal(out["label"], np.array([0.0, 1.0], np.float32))
    assert out["image"].shape == (32, 32, 3)


def test_caption_word_warm_start_learns_the_words():
    cfg = tiny_config(100)
    cfg.init.vit_pretrain_label = "caption_words"
    model, state = fresh_state(cfg)
    lines = []
    _, history = vit_pretrain.pretrain_vit(cfg, model, state, CaptionBarsSource(), log=lines.append)
    assert any("predicting 2 caption words" in l for l in lines)
    assert any("train word F1" in l for l in lines)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    assert history[-1]["accuracy"] >= 90.0, history


def test_multi_label_loss_and_f1():
    cfg = tiny_config(1)
    model, state = fresh_state(cfg)
    vit = state["params"]["visual_encoder"]
    width = cfg.model.vision_width
    head = {"kernel": jnp.zeros((width, 3)), "bias": jnp.array([5.0, -5.0, 5.0])}
    images = jnp.zeros((2, 32, 32, 3))
    labels = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    loss, f1 = vit_pretrain.classification_loss(model, vit, head, images, labels)
    logits = np.array([5.0, -5.0, 5.0])
    expected = np.mean([np.sum(np.log1p(np.exp(-logits)) * y + np.log1p(np.exp(logits)) * (1 - y))
                        for y in np.asarray(labels)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # predicted {0, 2} twice; true {0} and {0, 1}: 2 true positives, 4 predicted, 3 true
    np.testing.assert_allclose(f1, 2 * 2 / (4 + 3), rtol=1e-6)


def test_one_class_is_a_clear_error():
    cfg = tiny_config(2)
    cfg.init.vit_pretrain_label = "category"
    model, state = fresh_state(cfg)
    with pytest.raises(config_lib.ConfigError, match="nothing to classify"):
        vit_pretrain.pretrain_vit(cfg, model, state, BarsSource(8), log=lambda m: None)


def test_warm_start_learns_the_shape_and_replaces_only_the_vit():
    cfg = tiny_config(100)
    model, state = fresh_state(cfg)
    before = jax.device_get(state)
    lines = []
    new, history = vit_pretrain.pretrain_vit(cfg, model, state, BarsSource(), log=lines.append)
    assert [h["step"] for h in history] == list(range(5, 101, 5))
    assert any("ViT warm-start 100/100" in l and "ETA" in l for l in lines)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"], history
    assert last["accuracy"] >= 90.0, history

    new = jax.device_get(new)
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                     before["params"]["visual_encoder"],
                                     new["params"]["visual_encoder"])
    assert all(jax.tree_util.tree_leaves(changed)), "every ViT array is trained"
    # The momentum ViT is a copy of the trained one; nothing else moves.
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["momentum"]["visual_encoder"],
                           new["params"]["visual_encoder"])
    for part in ("params", "momentum"):
        for name in before[part]:
            if name != "visual_encoder":
                jax.tree_util.tree_map(np.testing.assert_array_equal, before[part][name],
                                       new[part][name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before["queues"], new["queues"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before["opt_state"], new["opt_state"])


def test_warm_start_is_deterministic():
    cfg = tiny_config(4)
    runs = []
    for _ in range(2):
        model, state = fresh_state(cfg)
        new, _ = vit_pretrain.pretrain_vit(cfg, model, state, BarsSource(16), log=lambda m: None)
        runs.append(jax.device_get(new["params"]["visual_encoder"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, *runs)


@pytest.mark.parametrize("change, message", [
    (dict(vit_pretrain_steps=-1), "vit_pretrain_steps"),
    (dict(vit_pretrain_steps=5, vit_pretrain_label="colour"), "vit_pretrain_label"),
    (dict(vit_pretrain_steps=5, checkpoint="/some/weights"), "vit_pretrain_steps=0"),
])
def test_config_errors(change, message):
    c = config_lib.base_config()
    c.init.update(change)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_no_symbol_token_with_the_symbol_loss_is_a_config_error():
    c = config_lib.base_config()
    c.data.stage1_symbol = False
    with pytest.raises(config_lib.ConfigError, match="w_sym=0"):
        config_lib.validate(c)
    c.loss.w_sym = 0.0
    config_lib.validate(c)
