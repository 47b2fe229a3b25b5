"""Reference checkpoints <-> fine_jax weights: key maps at the reference size, exact round trips,
layouts, partial loads, position-embedding resizing, atomic writes, the CLIs and training from a
converted checkpoint."""
import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from fine_jax import config as config_lib
from fine_jax import evaluate, trainer
from fine_jax.checkpoint import save_weights
from fine_jax.config import ConfigError, base_config, tiny_config
from fine_jax.convert import convert
from fine_jax.export import export
from fine_jax.interop import initialize, io
from fine_jax.interop.layouts import LayoutError, detect_layout
from fine_jax.interop.posembed import interpolate_pos_embed
from fine_jax.interop.reference import (ConversionError, abstract_params, convert_state_dict,
                                        export_state_dict, plan_conversion)
from fine_jax.models.fine import (MOMENTUM_MODULES, VARIANT_MODULES, FashionFINE, ModelConfig,
                                  init_params)
from fine_jax.momentum import init_queues, init_tgir_queues

REPO = pathlib.Path(__file__).resolve().parents[1]
QUEUE = 16
# Tiny sizes on the command line (the converter works at any size given a matching config).
CONFIG_FLAG = "--config=configs/fashiongen.py"
TINY_FLAGS = [f"--config.model.{k}={v}" for k, v in dict(
    image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2, vocab_size=64,
    hidden_size=32, num_layers=2, fusion_layer=1, num_heads=2, intermediate_size=64, embed_dim=16,
    max_position_embeddings=32).items()] + [f"--config.loss.queue_size={QUEUE}"]


def tiny_cfg():
    cfg = tiny_config()
    for flag in TINY_FLAGS:
        key, value = flag[len("--config."):].split("=")
        block, name = key.split(".")
        cfg[block][name] = type(cfg[block][name])(value)
    return cfg


def model_config(cfg=None) -> ModelConfig:
    return config_lib.model_config(cfg or tiny_cfg())


def random_weights(seed: int = 0, cfg=None, variant: str = "pretrain") -> dict:
    """A weights tree of a model variant with every array distinct: momentum differs from params,
    the queue ids and the pointers are not their initial values."""
    mc = dataclasses.replace(model_config(cfg), variant=variant)
    key = jax.random.PRNGKey(seed)
    params = jax.device_get(init_params(FashionFINE(mc), key))
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    params = traverse_util.unflatten_dict(
        {p: (v + rng.normal(size=v.shape)).astype(np.float32) for p, v in flat.items()})
    momentum = jax.tree_util.tree_map(lambda v: (v + 1.0).astype(np.float32),
                                      {k: params[k] for k in MOMENTUM_MODULES})
    if variant == "tgir":
        queues = jax.device_get(init_tgir_queues(jax.random.fold_in(key, 1), QUEUE, mc.embed_dim))
        queues.update(image_ptr=np.int32(4), fusion_ptr=np.int32(8))
    else:
        queues = jax.device_get(init_queues(jax.random.fold_in(key, 1), QUEUE, mc.embed_dim,
                                            with_idx=variant == "pretrain"))
        queues["ptr"] = np.int32(4)
        if variant == "pretrain":
            queues["idx"] = rng.integers(0, 100, QUEUE).astype(np.int32)
    return {"params": params, "momentum": momentum, "queues": queues}


def assert_trees_identical(a: dict, b: dict) -> None:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(x, y, err_msg="/".join(path))


def assert_state_dicts_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------------------------------
# The reference's own key lists, at the reference size
# ------------------------------------------------------------------------------------------------
def broadcast_random(shapes: dict, seed: int = 0) -> dict:
    """A random tensor for every (name, shape), random along the last axis and broadcast over the
    others: every name and shape is real, the memory is kilobytes."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        last = shape[-1] if shape else 1
        if key.endswith(("idx_queue", "ptr", "position_ids")):
            row = np.arange(last, dtype=np.int64)
        else:
            row = rng.normal(size=last).astype(np.float32)
        out[key] = np.broadcast_to(row if shape else row[0], tuple(shape))
    if "decoder_layer.predictions.bias" in out:  # tied in the reference
        out["decoder_layer.predictions.bias"] = out["decoder_layer.predictions.decoder.bias"]
    return out


@pytest.mark.parametrize("layout", ["pretrain", "retrieval", "tgir"])
def test_every_reference_key_maps_at_reference_size(reference_state_dict_shapes, layout):
    """Each stage's reference state_dict fills its own stage's tree completely."""
    shapes = reference_state_dict_shapes[layout]
    state_dict = broadcast_random(shapes)
    plan = plan_conversion(state_dict, config_lib.model_config(base_config()))
    report = plan.report
    assert report.layout == layout
    assert report.missing == [] and report.unused == [] and report.ignored == []
    assert report.filled == []
    # Every key is used: mapped, or one of the buffers that need no array of their own.
    derived = {"text_encoder.embeddings.position_ids", "text_encoder_m.embeddings.position_ids",
               "decoder_layer.predictions.bias"} & set(shapes)
    assert sorted(report.mapped) == sorted(set(shapes) - derived)
    # Shapes: each converted array has the shape of the fine_jax model at the reference size.
    abstract = traverse_util.flatten_dict(plan.abstract)
    for path, array in plan.arrays.items():
        assert array.shape == abstract[path].shape, path
    assert abstract[("queues", "image")].shape == (65536, 256)
    assert set(abstract) == set(plan.arrays)
    assert set(plan.abstract["params"]) == set(VARIANT_MODULES[layout]) | {"temp"}
    # A few values: the layouts are transposes of the file's arrays.
    kernel = plan.arrays[("params", "text_encoder", "layer_0", "attention", "self", "query", "kernel")]
    np.testing.assert_array_equal(kernel, state_dict[
        "text_encoder.encoder.layer.0.attention.self.query.weight"].T)
    queue = plan.arrays[("queues", "image")]
    np.testing.assert_array_equal(queue, state_dict["image_queue"].T)


def test_layout_detection(reference_state_dict_shapes):
    for layout, shapes in reference_state_dict_shapes.items():
        assert detect_layout(shapes).name == layout
    with pytest.raises(LayoutError, match="pass the layout explicitly"):
        detect_layout(["foo.weight", "bar.bias"])


# ------------------------------------------------------------------------------------------------
# Exact round trips at a tiny size
# ------------------------------------------------------------------------------------------------
def test_export_then_convert_is_identity(tmp_path):
    weights = random_weights(0)
    path = io.write_torch_file(export_state_dict(weights), tmp_path / "model.pth")
    state_dict = io.read_weights(path)
    assert state_dict["idx_queue"].dtype == np.int64 and state_dict["queue_ptr"].shape == (1,)
    assert state_dict["temp"].shape == () and state_dict["image_queue"].shape == (16, QUEUE)
    np.testing.assert_array_equal(state_dict["text_encoder.embeddings.position_ids"],
                                  np.arange(32)[None])
    converted, report = convert_state_dict(state_dict, model_config())
    assert report.complete and report.filled == []
    assert_trees_identical(converted, weights)


@pytest.mark.parametrize("layout", ["pretrain", "retrieval", "tgir"])
def test_convert_then_export_reproduces_the_file(layout):
    """Each stage layout goes into its own stage's tree, and back to the same file."""
    weights = random_weights(1, variant=layout)
    state_dict = export_state_dict(weights, layout)
    converted, report = convert_state_dict(state_dict, model_config())
    assert report.layout == layout and report.complete and report.filled == []
    assert set(converted["params"]) == set(VARIANT_MODULES[layout]) | {"temp"}
    assert_trees_identical(converted, weights)
    assert_state_dicts_identical(export_state_dict(converted, layout), state_dict)


def test_stage1_weights_export_as_every_stage_layout():
    """A stage-1 run exports as stage 1 or stage 2 (a subset); stage 3 needs its fusion queue."""
    weights = random_weights(2)
    retrieval = export_state_dict(weights, "retrieval")
    assert "unigram_conv.weight" not in retrieval and "W_v" in retrieval
    converted, _ = convert_state_dict(retrieval, model_config())
    assert set(converted["queues"]) == {"image", "text", "ptr"}
    assert_trees_identical(converted["params"], {k: weights["params"][k]
                                                 for k in converted["params"]})
    with pytest.raises(ConversionError, match="needs a checkpoint of that stage"):
        export_state_dict(weights, "tgir")


def test_albef_layout_loads_as_the_reference_does():
    """text_encoder.bert.* -> text_encoder.*, ALBEF's own MLM head (text_encoder.cls.*) dropped,
    combine_*_proj / MAA / phrase convs / MLM and replace heads at init (method_spec §1.9)."""
    weights = random_weights(4)
    fine = export_state_dict(weights)
    skip = ("combine_", "W_v", "att_layer_v", "unigram", "bigram", "trigram", "decoder_layer",
            "replace_predict_layer", "idx_queue")
    albef = {}
    for key, value in fine.items():
        if key.startswith(skip):
            continue
        for tower in ("text_encoder.", "text_encoder_m."):
            if key.startswith(tower):
                key = tower + "bert." + key[len(tower):]
        albef[key] = value
    albef["text_encoder.cls.predictions.bias"] = np.zeros(64, np.float32)
    albef["text_encoder_m.cls.predictions.bias"] = np.zeros(64, np.float32)
    converted, report = convert_state_dict(albef, model_config())
    assert report.layout == "albef" and report.complete
    assert report.ignored == ["text_encoder.cls.predictions.bias",
                              "text_encoder_m.cls.predictions.bias"]
    assert report.filled == [
        "momentum/combine_text_proj", "momentum/combine_vision_proj", "params/combine_text_proj",
        "params/combine_vision_proj", "params/decoder_layer", "params/maa", "params/phrase_module",
        "params/replace_predict_layer", "queues/idx"]
    assert_trees_identical(converted["params"]["text_encoder"], weights["params"]["text_encoder"])
    assert_trees_identical(converted["momentum"]["text_encoder"],
                           weights["momentum"]["text_encoder"])
    # Momentum copies of modules the file lacks are copies of the online ones.
    assert_trees_identical(converted["momentum"]["combine_text_proj"],
                           converted["params"]["combine_text_proj"])


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------
def test_partial_load_is_refused_unless_allowed():
    mc = model_config()
    state_dict = export_state_dict(random_weights(5))
    del state_dict["itm_head.weight"]
    state_dict["extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_state_dict(state_dict, mc)
    message = str(err.value)
    assert "itm_head.weight" in message and "extra_head.weight" in message
    assert "--allow_partial" in message
    converted, report = convert_state_dict(state_dict, mc, allow_partial=True, seed=7)
    assert report.missing == ["itm_head.weight"] and report.unused == ["extra_head.weight"]
    init = jax.device_get(init_params(FashionFINE(mc), jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(converted["params"]["itm_head"]["kernel"],
                                  init["itm_head"]["kernel"])
    np.testing.assert_array_equal(converted["params"]["itm_head"]["bias"],
                                  state_dict["itm_head.bias"])


def test_shape_mismatch_names_the_key_and_both_shapes():
    state_dict = export_state_dict(random_weights(6))
    cfg = tiny_cfg()
    cfg.model.embed_dim = 8
    with pytest.raises(ConversionError, match=r"vision_proj\.weight: the file has \(16, 32\), the "
                                              r"model config needs \(8, 32\)"):
        convert_state_dict(state_dict, model_config(cfg))


def test_explicit_layout_overrides_detection():
    state_dict = export_state_dict(random_weights(7), "retrieval")
    with pytest.raises(ConversionError, match="unigram_conv.weight"):
        convert_state_dict(state_dict, model_config(), layout="pretrain")


def test_export_refuses_a_layout_the_checkpoint_cannot_fill():
    with pytest.raises(ConversionError, match="needs a checkpoint of that stage"):
        export_state_dict(random_weights(8), "tgir")
    with pytest.raises(ConversionError, match="unigram_conv|phrase_module"):
        export_state_dict(random_weights(8, variant="retrieval"), "pretrain")
    with pytest.raises(LayoutError):
        export_state_dict(random_weights(8), "albef")


# ------------------------------------------------------------------------------------------------
# Position embeddings for another grid
# ------------------------------------------------------------------------------------------------
def test_pos_embed_interpolation_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for grid_in, grid_out in ((14, 16), (16, 14), (4, 7)):
        pos = rng.normal(size=(1, 1 + grid_in ** 2, 8)).astype(np.float32)
        t = torch.from_numpy(pos)
        grid = t[:, 1:].reshape(1, grid_in, grid_in, 8).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(grid_out, grid_out), mode="bicubic",
                                               align_corners=False)
        expected = torch.cat([t[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1).numpy()
        ours = interpolate_pos_embed(pos, 1 + grid_out ** 2)
        np.testing.assert_array_equal(ours[:, 0], pos[:, 0])
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_for_another_image_size_is_interpolated():
    state_dict = export_state_dict(random_weights(9))  # 32 px, patch 16: a 2x2 grid
    cfg = tiny_cfg()
    cfg.model.image_size = 48  # a 3x3 grid
    converted, report = convert_state_dict(state_dict, model_config(cfg))
    assert report.interpolated == ["visual_encoder.pos_embed: 5 -> 10 tokens",
                                   "visual_encoder_m.pos_embed: 5 -> 10 tokens"]
    assert converted["params"]["visual_encoder"]["pos_embed"].shape == (1, 10, 32)


# ------------------------------------------------------------------------------------------------
# Files: wrappers, pickles, atomic writes
# ------------------------------------------------------------------------------------------------
def test_reading_wrapped_and_pickled_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {"module.a.weight": torch.ones(2, 3), "module.b": torch.zeros(1, dtype=torch.bfloat16)}
    torch.save({"model": tensors, "epoch": 3}, tmp_path / "wrapped.pth")
    state_dict = io.read_weights(tmp_path / "wrapped.pth")
    assert sorted(state_dict) == ["a.weight", "b"] and state_dict["b"].dtype == np.float32
    torch.save({"model": tensors, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(io.WeightsFileError, match="--trust_pickle"):
        io.read_weights(tmp_path / "pickled.pth")
    assert sorted(io.read_weights(tmp_path / "pickled.pth", trust_pickle=True)) == ["a.weight", "b"]
    with pytest.raises(io.WeightsFileError, match="no such file"):
        io.read_weights(tmp_path / "absent.pth")


def test_reading_hugging_face_folders(tmp_path):
    """model.safetensors (single or sharded, as the hub serves them) or pytorch_model.bin."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    a, b = np.ones((2, 2), np.float32), np.arange(3, dtype=np.float32)
    (tmp_path / "sharded").mkdir()
    save_file({"a": a}, str(tmp_path / "sharded" / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "sharded" / "model-00002-of-00002.safetensors"))
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "bin").mkdir()
    torch.save({"a": torch.from_numpy(a), "b": torch.from_numpy(b)},
               tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        state_dict = io.read_weights(tmp_path / folder)
        np.testing.assert_array_equal(state_dict["a"], a)
        np.testing.assert_array_equal(state_dict["b"], b)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.WeightsFileError, match="holds none of"):
        io.read_weights(tmp_path / "empty")


def test_writes_are_atomic(tmp_path, monkeypatch):
    weights = random_weights(10)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("shutil.copyfile", fail)
    with pytest.raises(OSError, match="disk full"):
        save_weights(tmp_path / "weights", weights, {}, files={"vocab.txt": tmp_path / "v"})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its staging directory

    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        io.write_torch_file({"a": np.zeros(2, np.float32)}, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


def test_importing_fine_jax_does_not_import_torch():
    code = ("import sys, fine_jax, fine_jax.convert, fine_jax.export, fine_jax.api, fine_jax.train, "
            "fine_jax.interop.io, fine_jax.interop.towers, fine_jax.interop.initialize; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------------------
# The command-line tools
# ------------------------------------------------------------------------------------------------
def run_module(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                            text=True)
    return result.returncode, result.stdout + result.stderr


def test_convert_and_export_command_lines(tmp_path):
    pytest.importorskip("torch")
    weights = random_weights(11, variant="tgir")
    pth = io.write_torch_file(export_state_dict(weights, "tgir"), tmp_path / "tgir.pth")
    out = tmp_path / "converted"
    rc, text = run_module("fine_jax.convert", f"--pth={pth}", f"--out={out}", CONFIG_FLAG,
                          *TINY_FLAGS)
    assert rc == 0, text
    assert "layout: tgir" in text and f"wrote {out}" in text
    rc, text = run_module("fine_jax.export", f"--checkpoint={out}", f"--out={tmp_path / 'back.pth'}")
    assert rc == 0 and "tgir layout" in text, text
    assert_state_dicts_identical(io.read_weights(tmp_path / "back.pth"), io.read_weights(pth))

    rc, text = run_module("fine_jax.convert", f"--pth={pth}", f"--out={out}", CONFIG_FLAG,
                          *TINY_FLAGS)
    assert rc == 2 and "exists; pass --overwrite" in text
    rc, text = run_module("fine_jax.convert", f"--pth={tmp_path / 'absent.pth'}",
                          f"--out={tmp_path / 'x'}")
    assert rc == 2 and "error: no such file" in text and "Traceback" not in text
    rc, text = run_module("fine_jax.convert", f"--pth={pth}", f"--out={tmp_path / 'y'}")
    assert rc == 2 and "do not fit the model config" in text and "Traceback" not in text
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------
# Training and evaluation from converted weights
# ------------------------------------------------------------------------------------------------
def synthetic_cfg(data_dir, seed: int):
    cfg = tiny_config(vocab_size=0, image_size=64, embed_dim=32)
    cfg.data.source = "synthetic"
    cfg.data.data_dir = str(data_dir)
    cfg.data.synthetic_train_products = 40
    cfg.data.synthetic_eval_products = 20
    cfg.data.synthetic_views = 2
    cfg.data.max_len = 40
    cfg.data.randaug_n = 0
    cfg.train.global_batch_size = 8
    cfg.train.seed = seed
    cfg.train.log_every = 1
    cfg.loss.queue_size = 32
    cfg.eval.batch_size = 16
    return cfg


def test_training_workdir_exported_converted_and_scored_again(tmp_path):
    """Train 2 steps, export the workdir to a .pth, convert it back, and evaluate it through
    init.checkpoint in a run whose own random init differs: the scores are the same."""
    pytest.importorskip("torch")
    cfg_a = synthetic_cfg(tmp_path / "data", seed=1)
    cfg_a.train.max_steps = 2
    trained = trainer.run(cfg_a, str(tmp_path / "a"))
    export(tmp_path / "a", tmp_path / "a.pth", log=lambda *_: None)
    convert(tmp_path / "a.pth", tmp_path / "w", cfg_a, log=lambda *_: None)
    cfg_b = synthetic_cfg(tmp_path / "data", seed=2)
    scored = evaluate.evaluate(cfg_b, tmp_path / "w", out=tmp_path / "b", log=lambda *_: None)
    assert scored == pytest.approx(trained)


def test_init_checkpoint_replaces_the_fresh_state_or_says_why_not(tmp_path):
    cfg = tiny_cfg()
    save_weights(tmp_path / "w", random_weights(12), {"config": {"model": cfg.model.to_dict()}})
    state = random_weights(13)
    cfg.init.checkpoint = str(tmp_path / "w")
    cfg.loss.queue_size = 2 * QUEUE
    with pytest.raises(ConfigError, match="init.queues=False"):
        initialize.initialise(cfg, state)
    cfg.loss.queue_size = QUEUE
    restored = initialize.initialise(cfg, state)
    for part in ("params", "momentum", "queues"):
        assert_trees_identical(restored[part], random_weights(12)[part])
    cfg.loss.queue_size = 2 * QUEUE
    cfg.init.queues = False
    restored = initialize.initialise(cfg, state)
    assert_trees_identical(restored["momentum"], random_weights(12)["momentum"])
    assert restored["queues"] is state["queues"]
    cfg.model.num_heads = 4
    with pytest.raises(ConfigError, match="model.num_heads: checkpoint 2, config 4"):
        initialize.initialise(cfg, state)
    cfg.init.checkpoint = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="neither a fine_jax weights checkpoint"):
        initialize.initialise(cfg, state)


def test_init_from_public_towers(tmp_path):
    """init.bert (a HF folder with model.safetensors) and init.vit (a timm .safetensors file)."""
    from safetensors.numpy import save_file

    cfg = tiny_cfg()
    source = random_weights(14)
    reference = export_state_dict(source)
    bert = {"bert." + k[len("text_encoder."):]: v for k, v in reference.items()
            if k.startswith("text_encoder.") and ".crossattention." not in k}
    (tmp_path / "bert").mkdir()
    save_file(bert, str(tmp_path / "bert" / "model.safetensors"))
    vit = {k[len("visual_encoder."):]: v for k, v in reference.items()
           if k.startswith("visual_encoder.")}
    vit["head.weight"] = np.zeros((10, 32), np.float32)
    save_file(vit, str(tmp_path / "vit.safetensors"))

    state = random_weights(15)
    cfg.init.bert = str(tmp_path / "bert")
    cfg.init.vit = str(tmp_path / "vit.safetensors")
    lines = []
    new = initialize.initialise(cfg, state, log=lines.append)
    assert any("params/text_encoder/layer_1/crossattention" in line for line in lines)
    ours, theirs = new["params"]["text_encoder"], source["params"]["text_encoder"]
    assert_trees_identical(ours["embeddings"], theirs["embeddings"])
    assert_trees_identical(ours["layer_1"]["attention"], theirs["layer_1"]["attention"])
    assert_trees_identical(ours["layer_1"]["crossattention"],
                           state["params"]["text_encoder"]["layer_1"]["crossattention"])
    assert_trees_identical(new["params"]["visual_encoder"], source["params"]["visual_encoder"])
    assert_trees_identical(new["params"]["itm_head"], state["params"]["itm_head"])
    assert_trees_identical(new["momentum"], {k: new["params"][k] for k in MOMENTUM_MODULES})

    vit["dist_token"] = np.zeros((1, 1, 32), np.float32)  # a distilled DeiT: not this ViT
    save_file(vit, str(tmp_path / "deit_distilled.safetensors"))
    cfg.init.vit = str(tmp_path / "deit_distilled.safetensors")
    with pytest.raises(ConfigError, match=r"1 keys of the file with no place in the model:\n  "
                                          r"dist_token"):
        initialize.initialise(cfg, state)
    cfg.init.bert = "bert-base-uncased"
    with pytest.raises(ConfigError, match="init.allow_download=True"):
        initialize.initialise(cfg, state)
    cfg.init.checkpoint = str(tmp_path)
    with pytest.raises(ConfigError, match="leave init.bert and init.vit empty"):
        config_lib.validate(cfg)
