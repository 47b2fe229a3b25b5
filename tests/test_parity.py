"""fine_jax's towers against trusted PyTorch implementations (transformers' ViTModel and BertModel).

The same random weights are converted both ways (PyTorch -> fine_jax through the tower loaders,
fine_jax -> PyTorch through the reference key map) and the hidden states must agree to 1e-5 in
float32. timm needs torchvision, which has no wheel for the CPU torch used here, so the ViT is
transformers' ViTModel configured like the reference's (exact GELU, LayerNorm eps 1e-6, qkv bias,
pre-LN, final LN) and reached from timm's key layout by an explicit name map.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fine_jax.interop import towers
from fine_jax.interop.keymap import param_entries
from fine_jax.models.bert import XBert
from fine_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VIT = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2)
BERT = dict(vocab_size=100, hidden=32, num_layers=4, fusion_layer=2, heads=2, intermediate=64,
            max_positions=40)


def randomise(module: "torch.nn.Module", seed: int, std: float = 0.2) -> None:
    """Every parameter random (LayerNorm scales and biases included), so no mapping hides behind
    an init value of 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def to_numpy_state(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def fine_to_reference(params: dict, module: str) -> dict:
    """fine_jax parameters of one tower -> the reference's names (module prefix removed)."""
    prefix, flat = module + ".", traverse_util.flatten_dict(params)
    return {e.key[len(prefix):]: np.asarray(e.transform.to_reference(flat[e.path[1:]]))
            for e in param_entries({module: params[module]})}


def place(arrays: dict) -> dict:
    """{("params", module, ...): array} from a tower loader -> a parameter tree."""
    return traverse_util.unflatten_dict({path[1:]: jnp.asarray(a) for path, a in arrays.items()})


# ------------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------------
_HF_VIT = (  # (timm name, transformers ViTModel name), per block where {i} appears
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
    ("blocks.{i}.norm1.weight", "layers.{i}.layernorm_before.weight"),
    ("blocks.{i}.norm1.bias", "layers.{i}.layernorm_before.bias"),
    ("blocks.{i}.norm2.weight", "layers.{i}.layernorm_after.weight"),
    ("blocks.{i}.norm2.bias", "layers.{i}.layernorm_after.bias"),
    ("blocks.{i}.attn.proj.weight", "layers.{i}.attention.o_proj.weight"),
    ("blocks.{i}.attn.proj.bias", "layers.{i}.attention.o_proj.bias"),
    ("blocks.{i}.mlp.fc1.weight", "layers.{i}.mlp.fc1.weight"),
    ("blocks.{i}.mlp.fc1.bias", "layers.{i}.mlp.fc1.bias"),
    ("blocks.{i}.mlp.fc2.weight", "layers.{i}.mlp.fc2.weight"),
    ("blocks.{i}.mlp.fc2.bias", "layers.{i}.mlp.fc2.bias"),
)
_QKV = ("q_proj", "k_proj", "v_proj")


def hf_vit(image_size: int):
    config = transformers.ViTConfig(
        hidden_size=VIT["width"], num_hidden_layers=VIT["depth"], num_attention_heads=VIT["heads"],
        intermediate_size=4 * VIT["width"], image_size=image_size, patch_size=VIT["patch_size"],
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def hf_vit_to_timm(state: dict) -> dict:
    """transformers ViTModel names -> timm names; separate q/k/v become the fused qkv."""
    out = {}
    for i in range(VIT["depth"]):
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(
                [state.pop(f"layers.{i}.attention.{n}.{kind}") for n in _QKV])
    for timm_name, hf_name in _HF_VIT:
        for i in range(VIT["depth"]) if "{i}" in timm_name else [None]:
            out[timm_name.format(i=i)] = state.pop(hf_name.format(i=i))
    assert not state, f"unmapped transformers keys: {sorted(state)}"
    return out


def timm_to_hf_vit(state: dict) -> dict:
    state = dict(state)
    out = {}
    for i in range(VIT["depth"]):
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, np.split(state.pop(f"blocks.{i}.attn.qkv.{kind}"), 3)):
                out[f"layers.{i}.attention.{name}.{kind}"] = part
    for timm_name, hf_name in _HF_VIT:
        for i in range(VIT["depth"]) if "{i}" in timm_name else [None]:
            out[hf_name.format(i=i)] = state.pop(timm_name.format(i=i))
    assert not state
    return out


def fine_vit(image_size: int):
    return VisionTransformer(image_size, VIT["patch_size"], VIT["width"], VIT["depth"], VIT["heads"])


def vit_images(image_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, image_size, image_size, 3)).astype(np.float32)


def run_hf_vit(model, images: np.ndarray, interpolate: bool = False) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                    interpolate_pos_encoding=interpolate)
    return out.last_hidden_state.numpy()


def test_vit_from_pytorch_matches_transformers():
    size = VIT["image_size"]
    torch_model = hf_vit(size)
    randomise(torch_model, 0)
    vit = fine_vit(size)
    abstract = {"visual_encoder": jax.eval_shape(vit.init, jax.random.PRNGKey(0),
                                                 jnp.zeros((1, size, size, 3)))["params"]}
    arrays, report = towers.vit_tower(hf_vit_to_timm(to_numpy_state(torch_model)), abstract)
    assert report.missing == [] and report.unused == [] and report.interpolated == []
    images = vit_images(size)
    ours = vit.apply({"params": place(arrays)["visual_encoder"]}, images)
    np.testing.assert_allclose(ours, run_hf_vit(torch_model, images), atol=ATOL, rtol=0)


def test_vit_to_pytorch_matches_transformers():
    size = VIT["image_size"]
    vit = fine_vit(size)
    params = vit.init(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 3)))["params"]
    # Random LayerNorm parameters too (Flax initialises them to 1 and 0).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    torch_model = hf_vit(size)
    reference = fine_to_reference({"visual_encoder": params}, "visual_encoder")
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v))
                                 for k, v in timm_to_hf_vit(reference).items()}, strict=True)
    images = vit_images(size, seed=1)
    np.testing.assert_allclose(vit.apply({"params": params}, images), run_hf_vit(torch_model, images),
                               atol=ATOL, rtol=0)


def test_vit_position_embeddings_resized_like_the_reference():
    """A 4x4-grid checkpoint on a 6x6 grid: bicubic on the grid, CLS kept (ALBEF's recipe, which
    is also what transformers' interpolate_pos_encoding does)."""
    small, large = VIT["image_size"], VIT["image_size"] + 2 * VIT["patch_size"]
    torch_model = hf_vit(small)
    randomise(torch_model, 3)
    vit = fine_vit(large)
    abstract = {"visual_encoder": jax.eval_shape(vit.init, jax.random.PRNGKey(0),
                                                 jnp.zeros((1, large, large, 3)))["params"]}
    arrays, report = towers.vit_tower(hf_vit_to_timm(to_numpy_state(torch_model)), abstract)
    assert report.interpolated == ["pos_embed: 17 -> 37 tokens"]
    images = vit_images(large, seed=2)
    ours = vit.apply({"params": place(arrays)["visual_encoder"]}, images)
    np.testing.assert_allclose(ours, run_hf_vit(torch_model, images, interpolate=True), atol=ATOL,
                               rtol=0)


# ------------------------------------------------------------------------------------------------
# BERT: text layers and fusion layers
# ------------------------------------------------------------------------------------------------
def hf_bert():
    """BertModel whose layers all have cross-attention (is_decoder + add_cross_attention).

    The reference's xbert differs in two ways the test mirrors: its text layers have no
    cross-attention at all (the HF ones are run without encoder states, which skips it), and its
    fusion layers attend to every image token (no encoder mask) with the padding mask on the text.
    Self-attention here is bidirectional: the layers get an explicit padding mask, never a causal
    one.
    """
    config = transformers.BertConfig(
        vocab_size=BERT["vocab_size"], hidden_size=BERT["hidden"], num_hidden_layers=BERT["num_layers"],
        num_attention_heads=BERT["heads"], intermediate_size=BERT["intermediate"],
        max_position_embeddings=BERT["max_positions"], hidden_act="gelu", layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,
        add_cross_attention=True, attn_implementation="eager")
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def fine_bert():
    return XBert(BERT["vocab_size"], BERT["hidden"], BERT["num_layers"], BERT["fusion_layer"],
                 BERT["heads"], BERT["intermediate"], BERT["max_positions"])


def bert_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, BERT["vocab_size"], size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    image = rng.normal(size=(3, 9, BERT["hidden"])).astype(np.float32)
    return ids, mask, image


def run_hf_bert(model, ids, mask, image):
    """(text states after the text layers, fusion output), run layer by layer like xbert."""
    bias = torch.from_numpy(((1.0 - mask) * -10000.0).astype(np.float32))[:, None, None, :]
    with torch.no_grad():
        h = model.embeddings(input_ids=torch.from_numpy(ids))
        for layer in model.encoder.layer[:BERT["fusion_layer"]]:
            h = layer(h, attention_mask=bias)
        text = h.numpy().copy()
        for layer in model.encoder.layer[BERT["fusion_layer"]:]:
            h = layer(h, attention_mask=bias, encoder_hidden_states=torch.from_numpy(image))
    return text, h.numpy()


def run_fine_bert(params, ids, mask, image):
    bert = fine_bert()
    text = bert.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=XBert.text)
    fused = bert.apply({"params": params}, text, jnp.asarray(mask), jnp.asarray(image),
                       method=XBert.fusion)
    return np.asarray(text), np.asarray(fused)


_TEXT_LAYER_CROSS = re.compile(r"^encoder\.layer\.(\d+)\.crossattention\.")


def is_text_layer_cross_attention(key: str) -> bool:
    m = _TEXT_LAYER_CROSS.match(key)
    return m is not None and int(m.group(1)) < BERT["fusion_layer"]


def bert_abstract():
    ids, mask, image = bert_inputs()
    return {"text_encoder": jax.eval_shape(fine_bert().init, jax.random.PRNGKey(0), ids, mask,
                                           image)["params"]}


def test_bert_from_pytorch_matches_transformers():
    torch_model = hf_bert()
    randomise(torch_model, 4)
    state = {k: v for k, v in to_numpy_state(torch_model).items()
             if not is_text_layer_cross_attention(k)}
    arrays, report = towers.bert_tower(state, bert_abstract(), cross_attention=True)
    assert report.missing == [] and report.unused == []
    inputs = bert_inputs(1)
    ours = run_fine_bert(place(arrays)["text_encoder"], *inputs)
    theirs = run_hf_bert(torch_model, *inputs)
    np.testing.assert_allclose(ours[0], theirs[0], atol=ATOL, rtol=0, err_msg="text layers")
    np.testing.assert_allclose(ours[1], theirs[1], atol=ATOL, rtol=0, err_msg="fusion layers")


def test_bert_to_pytorch_matches_transformers():
    ids, mask, image = bert_inputs(2)
    params = fine_bert().init(jax.random.PRNGKey(5), ids, mask, image)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    torch_model = hf_bert()
    reference = fine_to_reference({"text_encoder": params}, "text_encoder")
    result = torch_model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in reference.items()}, strict=False)
    # Only the cross-attention of the text layers, which xbert does not have and HF skips here.
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_text_layer_cross_attention(k) for k in result.missing_keys)
    ours = run_fine_bert(params, ids, mask, image)
    theirs = run_hf_bert(torch_model, ids, mask, image)
    np.testing.assert_allclose(ours[0], theirs[0], atol=ATOL, rtol=0, err_msg="text layers")
    np.testing.assert_allclose(ours[1], theirs[1], atol=ATOL, rtol=0, err_msg="fusion layers")


def test_bert_base_layout_fills_all_but_cross_attention():
    """A bert-base-uncased style file (``bert.`` prefix, TF-era gamma/beta, pooler and MLM head):
    the text layers and the fusion layers' self-attention/FFN are filled, cross-attention is not."""
    torch_model = hf_bert()
    randomise(torch_model, 7)
    state = {}
    for key, value in to_numpy_state(torch_model).items():
        if ".crossattention." in key:
            continue
        key = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$",
                                                                      "LayerNorm.beta", key))
        state["bert." + key] = value
    state["bert.pooler.dense.weight"] = np.zeros((BERT["hidden"], BERT["hidden"]), np.float32)
    state["cls.predictions.bias"] = np.zeros(BERT["vocab_size"], np.float32)
    arrays, report = towers.bert_tower(state, bert_abstract())
    assert report.ignored == ["cls.predictions.bias", "pooler.dense.weight"]
    assert report.filled == [f"params/text_encoder/layer_{i}/crossattention"
                             for i in range(BERT["fusion_layer"], BERT["num_layers"])]
    word = arrays[("params", "text_encoder", "embeddings", "word_embeddings", "embedding")]
    np.testing.assert_array_equal(word, state["bert.embeddings.word_embeddings.weight"])
