"""Supervised warm-start of the image tower on the training split's labels.

The reference never trains its ViT from random weights: stage 1 starts from ALBEF, whose ViT
starts from DeiT, an ImageNet-supervised classifier. A run without such weights can give the ViT
the same kind of start here: ``init.vit_pretrain_steps`` steps of supervised training on the
training images, a linear head on the CLS token, AdamW with a warm-up and a cosine decay. The
label ``init.vit_pretrain_label`` is one of

* ``subcategory`` or ``category``: plain classification, softmax cross-entropy;
* ``caption_words``: which words the image's description contains, a multi-label sigmoid
  cross-entropy over the words found in at least ``CAPTION_WORD_MIN_ROWS`` training descriptions
  (and not in all of them). Captions name colours, patterns and local details, so the ViT has to
  see those, not only the silhouette a subcategory needs.

Only the ViT is kept; the head is dropped, and the momentum ViT is set to a copy, as at any start.
Only training rows are read.

Off by default; configs/demo.py runs 650 steps of ``caption_words`` at a peak learning rate of
1e-3. On the embedded demo the ViT then knows the silhouette, colours and patterns that the
contrastive objective from random weights does not pick up (the README gives the measurements).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fine_jax import faults, parallel
from fine_jax.config import VIT_PRETRAIN_LABELS, ConfigError
from fine_jax.data import image as image_ops
from fine_jax.data import pipeline
from fine_jax.models.fine import FashionFINE, vision_tower


CAPTION_WORD_MIN_ROWS = 5  # a caption word is a label when at least this many rows have it
_WORD = re.compile(r"[a-z]+")


def caption_words(text: str) -> set[str]:
    """The lower-cased alphabetic words of a description."""
    return set(_WORD.findall(text.lower()))


def class_table(source, label: str) -> dict[str, int]:
    """Label string -> class id, sorted, over the rows of ``source``. For ``caption_words`` the
    labels are the words of at least ``CAPTION_WORD_MIN_ROWS`` descriptions, minus any word that
    every description has (it says nothing about the image)."""
    if label not in VIT_PRETRAIN_LABELS:
        raise ConfigError(f"init.vit_pretrain_label={label!r}: use one of "
                          f"{', '.join(VIT_PRETRAIN_LABELS)}")
    if label == "caption_words":
        rows = source.metadata()["description"]
        counts = collections.Counter(w for text in rows for w in caption_words(text))
        words = [w for w, n in counts.items() if CAPTION_WORD_MIN_ROWS <= n < len(rows)]
        return {w: i for i, w in enumerate(sorted(words))}
    values = source.row_subcategory if label == "subcategory" else source.row_category
    return {v: i for i, v in enumerate(sorted(set(values)))}


@dataclasses.dataclass
class ClassifyTransform:
    """One image row -> the image (resized, randomly flipped, uint8) and its label: the class
    id, or for ``caption_words`` a multi-hot float vector over ``classes`` (picklable for grain
    workers). No random crop: its aspect-ratio jitter blurs what separates
    classes such as long and short dresses."""

    classes: Mapping[str, int]
    label: str
    image_size: int
    hflip: bool = True

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = image_ops.resize(record["image"], self.image_size)
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        img = np.ascontiguousarray(img)  # uint8: the ViT normalises on the device
        if self.label == "caption_words":
            target = np.zeros((len(self.classes),), np.float32)
            idx = [self.classes[w] for w in caption_words(record["description"])
                   if w in self.classes]
            target[idx] = 1.0
        else:
            target = np.int32(self.classes[record[self.label]])
        return {"image": img, "label": target,
                pipeline.BAD_KEY: np.int32(record.get(pipeline.BAD_KEY, 0))}


def classification_loss(model: FashionFINE, vit: dict, head: dict, images: jax.Array,
                        labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The loss of the linear head on the ViT CLS token, and its score.

    Integer ``labels`` (B,): mean softmax cross-entropy, and the accuracy. Multi-hot ``labels``
    (B, K): the sigmoid cross-entropy summed over the K words and averaged over the batch, and
    the micro-F1 of the words predicted with probability above 1/2.
    """
    tokens = vision_tower(model.config).apply({"params": vit}, images)
    logits = tokens[:, 0].astype(jnp.float32) @ head["kernel"] + head["bias"]
    if labels.ndim == 1:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1).mean()
    predicted = (logits > 0).astype(jnp.float32)
    true_pos = jnp.sum(predicted * labels)
    f1 = 2 * true_pos / jnp.maximum(jnp.sum(predicted) + jnp.sum(labels), 1.0)
    return loss, f1


def pretrain_vit(cfg, model: FashionFINE, state: dict, train_source,
                 log: Callable[[str], None] = print, mesh=None) -> tuple[dict, list[dict]]:
    """``state`` with ``params`` and ``momentum`` ``visual_encoder`` replaced by the trained ViT,
    and the logged history: one {step, loss, accuracy} per ``train.log_every`` steps (for
    ``caption_words`` the "accuracy" is the word micro-F1). It trains
    data-parallel over ``mesh`` (default: all devices), the ViT and its head replicated."""
    steps = int(cfg.init.vit_pretrain_steps)
    label = cfg.init.vit_pretrain_label
    classes = class_table(train_source, label)
    if len(classes) < 2:
        raise ConfigError(f"init.vit_pretrain_label={label!r}: the training split has "
                          f"{len(classes)} distinct value(s), nothing to classify")
    mesh = parallel.make_mesh() if mesh is None else mesh
    repl, batch_shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    bg = cfg.train.global_batch_size
    transform = ClassifyTransform(classes, label, cfg.model.image_size, cfg.data.hflip)
    data_iter = iter(pipeline.training_stream(
        pipeline.ReplaceCorrupt(train_source), transform, bg, seed=cfg.train.seed + 7,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
        num_workers=cfg.data.num_workers))

    lr = float(cfg.init.vit_pretrain_lr)
    warmup = max(1, min(steps // 6, 100))
    schedule = optax.warmup_cosine_decay_schedule(lr / 10, lr, warmup, max(steps, warmup + 1),
                                                  lr / 10)
    optimizer = optax.adamw(schedule, weight_decay=cfg.optim.weight_decay)
    params = state["params"]
    width = cfg.model.vision_width
    # LeCun-normal head (flax's Dense default). A zero head passes no gradient to the ViT on the
    # first step, and a 0.02 one (timm's) measured slower here: loss 2.36 against 2.04 at step 300.
    key = jax.random.PRNGKey(cfg.train.seed + 7)
    head = {"kernel": jax.nn.initializers.lecun_normal()(key, (width, len(classes))),
            "bias": jnp.zeros((len(classes),), jnp.float32)}
    # A copy: the step donates its inputs, and ``state`` must stay whole until the end.
    trainable = {"vit": jax.tree_util.tree_map(jnp.copy, params["visual_encoder"]), "head": head}
    opt_state = optimizer.init(trainable)

    def step_fn(trainable, opt_state, batch):
        def loss_fn(t):
            return classification_loss(model, t["vit"], t["head"], batch["image"], batch["label"])
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, {"loss": loss, "accuracy": acc}

    jstep = jax.jit(step_fn, in_shardings=(repl, repl, batch_shard),
                    out_shardings=(repl, repl, repl), donate_argnums=(0, 1))
    task = (f"predicting {len(classes)} caption words" if label == "caption_words"
            else f"{len(classes)}-way {label} classification")
    score_name = "word F1" if label == "caption_words" else "accuracy"
    log(f"ViT warm-start: {steps} steps of {task}, batch {bg}, "
        f"lr {lr:g}")
    t0 = time.time()
    t_last, n_last, window, history = t0, 0, [], []
    every = max(1, cfg.train.log_every)
    for step in range(1, steps + 1):
        signum = faults.stop_requested()
        if signum is not None:  # SIGTERM / SIGINT: nothing of the warm-start is kept
            log(f"{faults.signal_name(signum)}: ViT warm-start interrupted before step "
                f"{step}/{steps}; nothing was saved, and a restart with the same --workdir redoes "
                "the warm-start")
            raise faults.Interrupted(signum)
        host = next(data_iter)
        host.pop(pipeline.BAD_KEY, None)
        trainable, opt_state, metrics = jstep(trainable, opt_state,
                                              parallel.global_batch(host, mesh))
        window.append(metrics)
        if step % every == 0 or step == steps:
            m = jax.device_get(window)
            loss = float(np.mean([x["loss"] for x in m]))
            acc = 100 * float(np.mean([x["accuracy"] for x in m]))
            history.append({"step": step, "loss": loss, "accuracy": acc})
            now = time.time()
            rate = (step - n_last) * bg / max(now - t_last, 1e-9)
            eta = (steps - step) * bg / rate
            log(f"ViT warm-start {step}/{steps} | loss {loss:.4f} | train {score_name} {acc:.1f}% | "
                f"{rate:.1f} ex/s | ETA {eta:.0f}s")
            if not np.isfinite(loss):
                raise faults.NonFiniteError(
                    f"ViT warm-start loss is {loss} at step {step}; nothing was saved. Lower "
                    f"--config.init.vit_pretrain_lr (now {lr:g})")
            t_last, n_last, window = now, step, []
    log(f"ViT warm-start done in {time.time() - t0:.1f}s")

    vit = trainable["vit"]
    new_params = {**params, "visual_encoder": vit}
    new_momentum = {**state["momentum"],
                    "visual_encoder": jax.tree_util.tree_map(jnp.copy, vit)}
    return {**state, "params": new_params, "momentum": new_momentum}, history
