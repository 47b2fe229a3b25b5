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

Off by default. On its own it also runs as a command that writes the trained ViT as a timm-named
``.safetensors`` file, which ``init.vit`` loads like DeiT's weights; that is how the embedded
demo's ViT (``fine_jax/assets/demo_vit.safetensors``, what configs/demo.py starts from) is made:

    python -m fine_jax.vit_pretrain --config=configs/demo.py \
        --out=fine_jax/assets/demo_vit.safetensors --steps=6000 --redrawn=90000

``--redrawn=N`` (embedded set only) adds N rendered products to the training rows: the training
split's attribute bases with freshly drawn local details (``synthetic.redrawn_products``), so
the details no longer follow from the rest of a product and the ViT has to see them. Nothing of a
held-out product is rendered. The README ("The embedded demo") gives what it measured.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import sys
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
from fine_jax.models.fine import FashionFINE, matmul_precision_scope, vision_tower


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


DEFAULT_REDRAWN = 90_000


class RowSource:
    """In-memory image rows (``image``, ``description``, ``subcategory``, ``category``), with the
    per-row label columns :func:`class_table` reads."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[int(index)]

    @property
    def row_subcategory(self) -> list[str]:
        return [r["subcategory"] for r in self.rows]

    @property
    def row_category(self) -> list[str]:
        return [r["category"] for r in self.rows]

    def metadata(self) -> dict[str, Any]:
        return {"description": [r["description"] for r in self.rows]}

    def __repr__(self) -> str:
        return f"RowSource({len(self.rows)} rows)"


def pretraining_source(cfg, train_source, redrawn: int, seed: int,
                       log: Callable[[str], None] = print):
    """``train_source``, plus (``redrawn`` > 0, the embedded set only) that many rendered products
    on the training split's bases with freshly drawn details, one random view each."""
    if not redrawn:
        return train_source
    if cfg.data.source != "synthetic":
        raise ConfigError(f"--redrawn={redrawn} renders new products of the embedded set, which "
                          "needs data.source=synthetic; pass --redrawn=0 for other data")
    from fine_jax.data import synthetic

    d = cfg.data
    products, _ = synthetic.make_products(d.synthetic_seed, d.synthetic_train_products,
                                          d.synthetic_eval_products)
    rows = []
    for i in range(len(train_source)):
        r = train_source[i]
        rows.append({k: r[k] for k in ("image", "description", "subcategory", "category")})
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    t0 = time.time()
    for k, p in enumerate(synthetic.redrawn_products(products, redrawn, seed)):
        view = int(rng.integers(d.synthetic_views))
        rows.append({"image": synthetic.render(p, view, d.synthetic_image_size, d.synthetic_seed),
                     "description": p.description, "subcategory": p.subcategory,
                     "category": p.category})
        if (k + 1) % 10_000 == 0 or k + 1 == redrawn:
            log(f"rendered {k + 1}/{redrawn} redrawn products ({time.time() - t0:.0f}s)")
    return RowSource(rows)


def write_vit_file(vit: Mapping, out, metadata: Mapping[str, Any], overwrite: bool = False):
    """Writes the ViT parameters as a timm-named ``.safetensors`` file (what ``init.vit`` reads),
    with ``metadata`` as JSON under the ``fine_jax`` key."""
    from fine_jax.interop import io, towers

    arrays = towers.vit_state_dict(jax.device_get(vit))
    return io.write_safetensors(arrays, out, {"fine_jax": json.dumps(dict(metadata), sort_keys=True)},
                                overwrite=overwrite)


def read_vit_metadata(path) -> dict[str, Any]:
    """The ``fine_jax`` metadata of a file :func:`write_vit_file` wrote ({} for other files)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    return json.loads(meta["fine_jax"]) if "fine_jax" in meta else {}


def pretrain_to_file(cfg, out, steps: int | None = None, redrawn: int = 0, seed: int = 0,
                     overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Pre-trains a fresh ViT of ``cfg``'s model on ``cfg``'s training split (plus ``redrawn``
    rendered products) for ``steps`` (default ``init.vit_pretrain_steps``) and writes it to
    ``out``; returns the file's metadata."""
    from fine_jax import config as config_lib
    from fine_jax import stages

    out = pathlib.Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out={out}: the ViT is written as a .safetensors file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    if cfg.stage != "pretrain":
        raise ConfigError("the ViT pre-training reads a stage-1 config (its training split and model)")
    if redrawn < 0:
        raise ConfigError(f"--redrawn={redrawn}: must be >= 0")
    if redrawn and cfg.data.source != "synthetic":
        raise ConfigError(f"--redrawn={redrawn} renders new products of the embedded set, which "
                          "needs data.source=synthetic; pass --redrawn=0 for other data")
    cfg = cfg.copy_and_resolve_references()
    if steps is not None:
        cfg.init.vit_pretrain_steps = int(steps)
    if cfg.init.vit_pretrain_steps < 1:
        raise ConfigError("no steps to train: pass --steps=N or set init.vit_pretrain_steps")
    for note in config_lib.resolve_platform_defaults(cfg):
        log(note)
    config_lib.validate(cfg)
    data = stages.get(cfg.stage).training_data(cfg)
    cfg.model.vocab_size = data.vocab_size
    model_cfg = config_lib.model_config(cfg)
    model = FashionFINE(model_cfg)
    vit = vision_tower(model_cfg).init(jax.random.PRNGKey(cfg.train.seed),
                                       jnp.zeros((1, cfg.model.image_size, cfg.model.image_size, 3),
                                                 jnp.uint8))["params"]
    source = pretraining_source(cfg, data.vit_source, redrawn, seed, log)
    state = {"params": {"visual_encoder": vit}, "momentum": {}}
    t0 = time.time()
    with matmul_precision_scope(model_cfg):  # as the training job runs it
        state, history = pretrain_vit(cfg, model, state, source, log)
    m = cfg.model
    metadata = {
        "format": "timm ViT state_dict", "label": cfg.init.vit_pretrain_label,
        "steps": int(cfg.init.vit_pretrain_steps), "lr": float(cfg.init.vit_pretrain_lr),
        "batch": int(cfg.train.global_batch_size), "redrawn": int(redrawn), "seed": int(seed),
        "rows": len(source), "data_source": cfg.data.source, "seconds": round(time.time() - t0, 1),
        "final": history[-1] if history else {},
        "model": {k: m[k] for k in ("image_size", "patch_size", "vision_width", "vision_depth",
                                    "vision_heads")},
    }
    path = write_vit_file(state["params"]["visual_encoder"], out, metadata, overwrite=overwrite)
    log(f"wrote {path}; load it with --config.init.vit={path}")
    return metadata


def _main():
    from absl import flags

    f = flags.FLAGS
    pretrain_to_file(f.config, f.out, steps=f.steps, redrawn=f.redrawn, seed=f.seed,
                     overwrite=f.overwrite)


def define_flags() -> None:
    from absl import flags

    from fine_jax import cli

    cli.define_config_flag()
    flags.DEFINE_string("out", None, "The .safetensors file to write (timm names; init.vit reads it).")
    flags.DEFINE_integer("steps", None, "Training steps (default: the config's "
                         "init.vit_pretrain_steps).")
    flags.DEFINE_integer("redrawn", 0, "Rendered products with freshly drawn details added to the "
                         "training rows (embedded set only; the demo ViT used "
                         f"{DEFAULT_REDRAWN}).")
    flags.DEFINE_integer("seed", 0, "Seed of the redrawn products and their views.")
    flags.DEFINE_boolean("overwrite", False, "Replace --out if it exists.")
    flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
    from fine_jax import cli as _cli

    define_flags()
    _cli.main(_main)
