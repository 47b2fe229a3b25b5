"""Embed images and texts with a trained or converted model, the way the reference ranks them.

    from fine_jax.api import FineModel

    model = FineModel.load("weights/fine_cmr")          # or a training workdir (latest step)
    z_img = model.encode_image([Image.open("a.jpg")])  # (N, E) float32, L2-normalised
    z_txt = model.encode_text(["black leather biker jacket"])
    scores = z_img @ z_txt.T                           # cosine similarity

``encode_image`` applies the evaluation transform (bicubic resize to the model's image size, CLIP
normalisation; ``fine_jax.data.image.test_transform``) and ``encode_text`` the evaluation text
layout ("the image description is " + the cleaned caption, [CLS] ... [SEP], padded to the
evaluation length; ``fine_jax.data.text.encode_eval_caption``). Both return the MAA-integrated
features z_v / z_t of ``FashionFINE.embed_images`` / ``embed_texts`` (method_spec §2, §7).
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fine_jax.checkpoint import read_weights
from fine_jax.data import image as image_ops
from fine_jax.data import text as text_ops
from fine_jax.models.fine import FashionFINE, ModelConfig, with_matmul_precision

VOCAB_FILE = "vocab.txt"
# The modules z_v and z_t are computed from.
EMBEDDING_MODULES = ("visual_encoder", "text_encoder", "vision_proj", "text_proj",
                     "combine_vision_proj", "combine_text_proj", "maa")


def _model_config(saved: dict, stage: str = "pretrain") -> ModelConfig:
    """The model of a saved config (its ``model`` block; the variant follows its ``stage``)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in saved.items() if k in fields}
    return ModelConfig(**{**values, "variant": stage})


def _vocab_path(path: pathlib.Path, config: dict) -> pathlib.Path:
    """The checkpoint's own vocab.txt, else the vocab of the training run's dataset."""
    candidates = [path / VOCAB_FILE]
    data = config.get("data", {})
    if data.get("data_dir"):
        candidates.append(pathlib.Path(data["data_dir"]).expanduser() / data.get("vocab_file",
                                                                                 VOCAB_FILE))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no vocab found (looked at {', '.join(map(str, candidates))}); pass "
                            "vocab=PATH (the reference fashion_annotation/vocab.txt)")


def _warn_if_untrained(info: dict) -> None:
    """A converted stage-3 or ALBEF checkpoint has no MAA / combine projections: say so."""
    filled = info.get("report", {}).get("filled", [])
    untrained = [p for p in filled if p in {f"params/{m}" for m in EMBEDDING_MODULES}]
    if untrained:
        warnings.warn(f"the {info.get('source', {}).get('layout', '?')} checkpoint did not provide "
                      f"{', '.join(untrained)}: they are at their initial values, so the features "
                      "are not those of a trained model", stacklevel=3)


def _as_uint8_hwc(image) -> np.ndarray:
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be PIL images or uint8 HxWx3 arrays, got {image.dtype} "
                         f"{image.shape}")
    return image


def _fused_pairs(module: FashionFINE, input_ids, attention_mask, images):
    return module.fuse(module.encode_text(input_ids, attention_mask), attention_mask,
                       module.encode_image(images))


class FineModel:
    """A FashionFINE model with its parameters and tokenizer, for embedding."""

    def __init__(self, config: ModelConfig, params, tokenizer: text_ops.Tokenizer, max_len: int,
                 batch_size: int = 64):
        if tokenizer.vocab_size != config.vocab_size:
            raise ValueError(f"the vocab has {tokenizer.vocab_size} entries but the model "
                             f"{config.vocab_size}")
        self.config = config
        self.model = FashionFINE(config)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        # Traced at the model's float32 precision (model.matmul_precision), as in training.
        self._embed_images = jax.jit(with_matmul_precision(lambda p, x: self.model.apply(
            {"params": p}, x, method=FashionFINE.embed_images), config))
        self._embed_texts = jax.jit(with_matmul_precision(lambda p, ids, mask: self.model.apply(
            {"params": p}, ids, mask, method=FashionFINE.embed_texts), config))
        self._itm = jax.jit(with_matmul_precision(lambda p, x, ids, mask: jax.nn.softmax(
            self.model.apply({"params": p}, self.model.apply({"params": p}, ids, mask, x,
                                                             method=_fused_pairs),
                             method=FashionFINE.itm_logits), axis=-1)[:, 1], config))

    @classmethod
    def load(cls, path: str | pathlib.Path, step: int | None = None, vocab=None,
             max_len: int | None = None, batch_size: int = 64) -> "FineModel":
        """From a weights checkpoint (``fine_jax.convert``) or a training workdir (latest step,
        or ``step``). ``vocab`` defaults to the checkpoint's vocab.txt or the run's dataset vocab;
        ``max_len`` to the evaluation text length the checkpoint was made with."""
        weights, info = read_weights(path, parts=("params",), step=step)
        _warn_if_untrained(info)
        config = info.get("config", {})
        model_config = _model_config(config.get("model", {}), config.get("stage", "pretrain"))
        vocab = pathlib.Path(vocab) if vocab is not None else _vocab_path(pathlib.Path(path),
                                                                          config)
        tokenizer = text_ops.Tokenizer.from_vocab_file(vocab)
        max_len = max_len or config.get("data", {}).get("max_len", 180)
        return cls(model_config, weights["params"], tokenizer, max_len, batch_size)

    def _batched(self, fn, arrays: Sequence[np.ndarray], pad_values: Sequence[int]) -> np.ndarray:
        """Runs ``fn`` over batches padded to a power of two (at most ``batch_size``), so a few
        shapes compile and a handful of inputs does not pay for a full batch."""
        total = len(arrays[0])
        size = min(self.batch_size, 1 << (total - 1).bit_length())
        out = []
        for start in range(0, total, size):
            chunk = [a[start:start + size] for a in arrays]
            n = len(chunk[0])
            chunk = [np.concatenate([c, np.full((size - n,) + c.shape[1:], v, c.dtype)])
                     for c, v in zip(chunk, pad_values)]
            out.append(np.asarray(fn(self.params, *chunk))[:n])
        return np.concatenate(out)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.config.embed_dim), np.float32)

    def preprocess_images(self, images: Iterable) -> np.ndarray:
        """PIL images or uint8 HxWx3 arrays -> (N, S, S, 3) float32, the evaluation transform."""
        size = self.config.image_size
        return np.stack([image_ops.test_transform(_as_uint8_hwc(im), size) for im in images])

    def tokenize(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Product descriptions -> (input_ids, attention_mask), the evaluation text layout."""
        ids, masks = zip(*(text_ops.encode_eval_caption(self.tokenizer, t, self.max_len)
                           for t in texts))
        return np.stack(ids), np.stack(masks)

    def _check_retrieval_model(self) -> None:
        if "maa" not in self.config.modules:
            raise ValueError(f"a {self.config.variant} checkpoint has no MAA: z_v / z_t come from a "
                             "stage-1 or stage-2 model")

    def encode_image(self, images) -> np.ndarray:
        """-> (N, E) L2-normalised z_v. ``images``: PIL images or uint8 HxWx3 arrays, a uint8
        (N, H, W, 3) array, or a single image."""
        if hasattr(images, "convert") or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        images = list(images)
        if not images:
            return self._empty()
        return self.embed_image_arrays(self.preprocess_images(images))

    def encode_text(self, texts) -> np.ndarray:
        """-> (N, E) L2-normalised z_t. ``texts``: product descriptions, or a single one."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return self._empty()
        return self.embed_token_ids(*self.tokenize(texts))

    def embed_image_arrays(self, images: np.ndarray) -> np.ndarray:
        """Already preprocessed images, float (N, S, S, 3) normalised as the evaluation transform
        (``preprocess_images``) leaves them -> (N, E) z_v."""
        self._check_retrieval_model()
        images = np.asarray(images, np.float32)
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"preprocessed images must be float (N, {size}, {size}, 3), got "
                             f"{images.shape}")
        if not len(images):
            return self._empty()
        return self._batched(self._embed_images, [images], [0])

    def embed_token_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token ids and attention mask, int (N, L) in the evaluation layout (``tokenize``) ->
        (N, E) z_t."""
        self._check_retrieval_model()
        ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be (N, L), got {ids.shape} "
                             f"and {mask.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if not len(ids):
            return self._empty()
        return self._batched(self._embed_texts, [ids, mask], [self.tokenizer.pad_id, 1])

    def match_probability(self, images: np.ndarray, input_ids: np.ndarray,
                          attention_mask: np.ndarray) -> np.ndarray:
        """The ITM head's probability that image i and text i match, for N (image, text) pairs:
        preprocessed images (N, S, S, 3) as ``preprocess_images`` returns them and token ids in
        the evaluation layout (``tokenize``) -> (N,) float32. This is the score ITM re-ranking
        sorts by (``eval.itm_rerank_k``); a stage-1 or stage-2 model has the head."""
        if "itm_head" not in self.config.modules:
            raise ValueError(f"a {self.config.variant} checkpoint has no ITM head: matching "
                             "scores come from a stage-1 or stage-2 model")
        images = np.asarray(images, np.float32)
        ids, mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
        if not (len(images) == len(ids) == len(mask)):
            raise ValueError(f"{len(images)} images, {len(ids)} texts: pass one text per image")
        if not len(ids):
            return np.zeros((0,), np.float32)
        return self._batched(self._itm, [images, ids, mask], [0, self.tokenizer.pad_id, 1])
