"""The supervised ViT warm-start (fine_jax.vit_pretrain): labels, learning, what it replaces, and
the ViT file it writes (the demo's shipped ViT)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fine_jax import config as config_lib
from fine_jax import vit_pretrain
from fine_jax.models.fine import FashionFINE, ModelConfig
from fine_jax.momentum import init_queues
from fine_jax.stages.common import create_state, init_params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


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


def test_redrawn_products_stay_on_training_bases_and_off_held_out_products():
    from fine_jax.data import synthetic

    products, _ = synthetic.make_products(0, 40, 20)
    new = synthetic.redrawn_products(products, 300, seed=3)
    assert len(new) == 300
    train_bases = {(p.subcategory, p.colour, p.pattern) for p in products if p.split == "train"}
    held_out = {p.signature for p in products if p.split == "validation"}
    assert {(p.subcategory, p.colour, p.pattern) for p in new} <= train_bases
    assert not {p.signature for p in new} & held_out
    assert len({p.group for p in new}) == 300  # each its own view jitter
    # The details are drawn anew: far more detail sets than the training split has.
    train_sigs = {p.signature for p in products if p.split == "train"}
    assert len({p.signature for p in new} - train_sigs) > 100
    assert [p.signature for p in synthetic.redrawn_products(products, 300, seed=3)] == \
        [p.signature for p in new]
    assert [p.signature for p in synthetic.redrawn_products(products, 300, seed=4)] != \
        [p.signature for p in new]


def test_vit_state_dict_round_trips_through_init_vit():
    from fine_jax.interop import towers

    cfg = tiny_config(1)
    _, state = fresh_state(cfg)
    params = jax.device_get(state["params"])
    state_dict = towers.vit_state_dict(params["visual_encoder"])
    assert "patch_embed.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict
    assert state_dict["patch_embed.proj.weight"].shape == (32, 3, 8, 8)  # timm's layout
    arrays, report = towers.vit_tower(state_dict, params)
    assert not report.unused and not report.missing
    flat = traverse_util.flatten_dict({"params": params})
    for path, value in arrays.items():
        np.testing.assert_array_equal(value, flat[path])
    assert {p for p in flat if p[1] == "visual_encoder"} == set(arrays)


def _synthetic_config(data_dir, steps=3):
    c = config_lib.load_config_file(CONFIGS / "demo.py")
    c.data.data_dir = str(data_dir)
    c.data.synthetic_train_products, c.data.synthetic_eval_products = 40, 20
    c.data.synthetic_views = 2
    c.model.update(dict(vision_width=32, vision_depth=1, vision_heads=2, patch_size=16,
                        hidden_size=32, intermediate_size=64, num_heads=2, embed_dim=32,
                        num_layers=2, fusion_layer=1))
    c.train.global_batch_size = 8
    c.train.log_every = 1
    c.data.num_threads = 1
    c.init.vit = ""
    return c


def test_pretrain_to_file_writes_a_vit_that_init_vit_loads(tmp_path):
    from fine_jax.interop import initialize

    cfg = _synthetic_config(tmp_path / "data")
    out = tmp_path / "vit.safetensors"
    lines = []
    meta = vit_pretrain.pretrain_to_file(cfg, out, steps=3, redrawn=24, seed=1, log=lines.append)
    assert any("rendered 24/24 redrawn products" in l for l in lines)
    assert meta["rows"] == 40 * 2 + 24 and meta["steps"] == 3 and meta["redrawn"] == 24
    assert vit_pretrain.read_vit_metadata(out) == json_round_trip(meta)

    cfg.init.vit = str(out)
    cfg.model.vocab_size = 64
    model, state = fresh_state(cfg)
    before = jax.device_get(state["params"]["visual_encoder"])
    loaded = initialize.initialise(cfg, jax.device_get(state), log=lambda m: None)
    vit = loaded["params"]["visual_encoder"]
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), before, vit)
    assert all(jax.tree_util.tree_leaves(changed)), "the trained ViT replaces the random one"
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["momentum"]["visual_encoder"], vit)

    with pytest.raises(config_lib.ConfigError, match="exists; pass --overwrite"):
        vit_pretrain.pretrain_to_file(cfg, out, steps=1)
    cfg.data.source = "fashiongen"
    with pytest.raises(config_lib.ConfigError, match="needs data.source=synthetic"):
        vit_pretrain.pretrain_to_file(cfg, tmp_path / "other.safetensors", steps=1, redrawn=5)
    with pytest.raises(config_lib.ConfigError, match="a .safetensors file"):
        vit_pretrain.pretrain_to_file(cfg, tmp_path / "vit.pth", steps=1)


def json_round_trip(obj):
    return json.loads(json.dumps(obj))


def test_a_vit_file_that_does_not_fit_names_the_fix(tmp_path):
    from fine_jax.interop import initialize

    cfg = tiny_config(0)
    model, state = fresh_state(cfg)
    other = tiny_config(0)
    other.model.patch_size = 16  # another patch embedding, fewer positions
    _, other_state = fresh_state(other)
    path = vit_pretrain.write_vit_file(other_state["params"]["visual_encoder"],
                                       tmp_path / "wide.safetensors", {"steps": 0})
    cfg.init.vit = str(path)
    with pytest.raises(config_lib.ConfigError, match="--config.init.vit= with nothing after"):
        initialize.initialise(cfg, jax.device_get(state), log=lambda m: None)
    cfg.init.vit = str(tmp_path / "missing.safetensors")
    with pytest.raises(config_lib.ConfigError, match="no such file or folder"):
        initialize.initialise(cfg, jax.device_get(state), log=lambda m: None)


def test_the_demo_vit_fits_the_demo_model():
    """The shipped ViT: in the package, made as fine_jax/assets says, loadable into the demo's
    model, and the file configs/demo.py starts from."""
    from fine_jax.assets import DEMO_VIT
    from fine_jax.interop import io, towers

    cfg = config_lib.load_config_file(CONFIGS / "demo.py")
    assert cfg.init.vit == str(DEMO_VIT) and DEMO_VIT.is_file()
    meta = vit_pretrain.read_vit_metadata(DEMO_VIT)
    assert (meta["steps"], meta["redrawn"], meta["label"]) == (6000, 90000, "caption_words")
    assert meta["model"] == {k: cfg.model[k] for k in meta["model"]}
    cfg.model.vocab_size = 64
    model = FashionFINE(config_lib.model_config(cfg))
    params = jax.eval_shape(lambda r: init_params(model, r), jax.random.PRNGKey(0))
    arrays, report = towers.vit_tower(io.read_weights(DEMO_VIT), params)
    assert not report.unused and not report.missing
    vit_leaves = [p for p in traverse_util.flatten_dict({"params": params}) if p[1] == "visual_encoder"]
    assert set(arrays) == set(vit_leaves)  # every ViT array comes from the file
    assert not [name for name in report.filled if "visual_encoder" in name]
    # A size other than the demo's does not inherit it.
    assert config_lib.load_config_file(CONFIGS / "demo.py", "tiny").init.vit == ""
