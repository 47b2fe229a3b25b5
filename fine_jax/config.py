"""The configuration schema shared by every config file, and its validation.

``base_config()`` holds the reference stage-1 values (method_spec §8.1). The ``model``, ``loss`` and
``optim`` blocks are built from the dataclasses that the code reads them into
(:class:`~fine_jax.models.fine.ModelConfig`, :class:`~fine_jax.objectives.LossConfig`,
:class:`~fine_jax.optim.OptimConfig`), so each default lives in one place; the ``data``, ``train``,
``eval`` and ``init`` blocks live here. Files in ``configs/`` start from it and override; any
value can be changed on the command line with ``--config.a.b=value``, and a named model size with
``--config=configs/FILE.py:SIZE`` (see :data:`SIZES`).

:func:`validate` is the one place where impossible combinations are refused, each with a
:class:`ConfigError` that names the keys and the fix.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from fine_jax.models.fine import ModelConfig
from fine_jax.objectives import MLM_OVERFLOW, LossConfig
from fine_jax.optim import OptimConfig, parse_lr_scales


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message names the keys and the fix."""


STAGES = ("pretrain", "retrieval", "tgir")
# The model variant each stage trains (fine_jax.models.fine.VARIANT_MODULES).
STAGE_VARIANT = {"pretrain": "pretrain", "retrieval": "retrieval", "tgir": "tgir"}
# What init.vit_pretrain_label may name: a record field to classify by, or the description's words.
VIT_PRETRAIN_LABELS = ("subcategory", "category", "caption_words")

# Named model sizes, chosen with --config=configs/FILE.py:NAME. "base" is the reference
# (ViT-B/16 @ 256 px + BERT-base 6+6). "tiny" is the size of the tests and of
# benchmarks/train_step.py, fixed so that step times can be compared across implementations:
# ViT 64 wide, 2 deep, 2 heads, 16 px patches on 64 px images; BERT 64 hidden, 4 layers (2 text + 2
# fusion), 2 heads, FFN 256, full 30,522 vocab; E = 256. "demo" is the embedded demo's model.
SIZES = {
    "base": {},
    "tiny": dict(image_size=64, patch_size=16, vision_width=64, vision_depth=2, vision_heads=2,
                 vocab_size=30522, hidden_size=64, num_layers=4, fusion_layer=2, num_heads=2,
                 intermediate_size=256, embed_dim=256),
    "demo": dict(image_size=64, patch_size=8, vision_width=128, vision_depth=2, vision_heads=4,
                 hidden_size=128, num_layers=3, fusion_layer=2, num_heads=4, intermediate_size=512,
                 max_position_embeddings=64, embed_dim=128),
}
TINY_MODEL = SIZES["tiny"]


def _block(cls, exclude=()) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({k: v for k, v in dataclasses.asdict(cls()).items()
                                      if k not in exclude})


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Which stage this config trains: "pretrain" (stage 1), "retrieval" (stage 2, FashionGen
    # retrieval fine-tuning) or "tgir" (stage 3, text-guided image retrieval on FashionIQ).
    c.stage = "pretrain"
    c.model = _block(ModelConfig, exclude=("variant",))  # the variant follows ``stage``
    c.loss = _block(LossConfig)
    c.optim = _block(OptimConfig)

    c.data = ml_collections.ConfigDict(dict(
        # "fashiongen": real FashionGen in data_dir; "fashioniq": real FashionIQ in data_dir
        # (stage 3); "synthetic": the embedded demo set (its TGIR variant in stage 3).
        source="fashiongen",
        data_dir="data/fashiongen",
        # FashionGen form in data_dir: "auto" (detect), "arrayrecord" (fine_jax.data.prepare),
        # "h5" (the release files below) or "reference_json" (info_data.json + images_dir/).
        format="auto",
        train_file="fashiongen_256_256_train.h5",
        eval_file="fashiongen_256_256_validation.h5",
        images_dir="images",  # reference_json: folder of the PNG files named in annotation/
        vocab_file="vocab.txt",
        category_file="categorys_to_sign.txt",
        # Antonyms/synonyms of the stage-1 corruption: "wordnet" (local WordNet 3.0 files in
        # wordnet_dir, default: found in /usr/share/wordnet), "json" (lexicon_file) or "none".
        lexicon="wordnet",
        wordnet_dir="",
        lexicon_file="",  # JSON lexicon of antonyms/synonyms, for lexicon="json"
        max_len=180,
        crop_scale=(0.5, 1.0),
        hflip=True,
        randaug_n=2,
        randaug_m=7,
        fix_mlm_labels=False,  # method_spec §10 B2 fix when True
        # Stage-1 text parts besides the description (method_spec §6.3): the category symbol token
        # at position 1 and the attribute prompts after [SEP]. Both on in the reference.
        stage1_symbol=True,
        stage1_attributes=True,
        # "twins" (embedded set, stages 1 and 2): the products of each twin group, which differ
        # in one local detail, are shuffled as one block, so they share a batch and are each
        # other's in-batch negatives; in stage 1, whose items are images, the block holds every
        # image of those products. "twin_views": in stage 1 the block is the k-th image of each
        # product of the group, so a product's other images spread over the epoch like any row
        # (in stage 2, whose items are products, the same as "twins"). "" = the reference's
        # plain shuffle.
        batch_groups="",
        # grain worker processes; 0 = threads in the main process; -1 = auto: one per core this
        # process may use (at most 16) on an accelerator, 0 when the CPU itself trains
        # (fine_jax.data.pipeline.resolve_workers; benchmarks/data_pipeline.py --sweep measures).
        num_workers=0,
        num_threads=2,  # threads reading and transforming batches (per worker process)
        prefetch=4,  # batches each reader keeps ready; at least num_threads
        # Embedded synthetic set (source="synthetic").
        synthetic_seed=0,
        synthetic_train_products=1600,
        synthetic_eval_products=400,
        synthetic_views=3,
        synthetic_image_size=64,
        # Its TGIR variant (stage 3 with source="synthetic"): training / validation triplets.
        synthetic_tgir_train=1600,
        synthetic_tgir_eval=300,
    ))

    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=128,
        max_steps=-1,  # -1: optim.epochs full epochs
        seed=66,
        log_every=50,
        checkpoint_every=2000,
        keep_checkpoints=2,
        # Deterministic step: no dropout anywhere (the reference trains with BERT dropout 0.1).
        deterministic=False,
        # A step whose loss or any gradient is not finite changes neither the weights, the AdamW
        # moments nor the queues (the momentum copies take their EMA step). "stop": end the
        # run there (exit status 2), naming the last good checkpoint; "skip": go on with the next
        # batch, and stop after more than max_nonfinite_skips such steps in a row.
        on_nonfinite="stop",
        max_nonfinite_skips=20,
        # Resuming a workdir whose config.json differs in what shapes the train state or the data
        # order (stage, model.*, train.global_batch_size, train.seed, loss.queue_size) is refused
        # unless this is True.
        allow_config_change=False,
        # XLA's persistent compilation cache: a restarted or repeated run loads its compiled steps
        # instead of compiling them again. "" = off. Left as it is when JAX_COMPILATION_CACHE_DIR
        # (or jax.config) names one already, and off in multi-process jobs.
        compilation_cache="~/.cache/fine_jax/xla",
        # A line on the log when the input pipeline has given no batch for this many seconds, and
        # again every as many seconds while the wait goes on (a stuck data worker or file system
        # would otherwise leave the job silent). 0 = off.
        input_stall_warning_s=300.0,
    ))

    # How the job spreads over devices and processes (fine_jax.parallel). The mesh has axes
    # (data, fsdp) with data x fsdp = the device count; the global batch is split over both.
    c.parallel = ml_collections.ConfigDict(dict(
        data=-1,  # -1: all devices not used by fsdp
        fsdp=1,  # parameters, momentum and optimiser moments split over this many devices
        fsdp_min_size=2 ** 16,  # arrays smaller than this many elements stay replicated
        # "per_group": every device computes the reference's per-GPU loss on its own share of
        # the batch (in-batch keys, hard negatives and means per device; gradients averaged).
        # "global": the whole global batch is one contrastive batch (another method; see README).
        batch_semantics="per_group",
    ))

    # Initial weights of a fresh run (fine_jax.interop.initialize); a resumed run ignores them.
    c.init = ml_collections.ConfigDict(dict(
        # Weights from python -m fine_jax.convert, or a training workdir (stages 2 and 3 start
        # from a stage-1 workdir, as the reference does). Modules the checkpoint has but this
        # stage's model does not are dropped.
        checkpoint="",
        # Which step of a training workdir: "best" (the best evaluated, else the latest),
        # "latest", or a step number.
        checkpoint_step="best",
        queues=True,  # also take the checkpoint's queues (their size must be loss.queue_size)
        bert="",  # bert-base-uncased folder / .safetensors / .bin, or a hub id (allow_download)
        vit="",  # timm/DeiT ViT-B/16 .pth / .safetensors / folder, or a hub id (allow_download)
        allow_download=False,  # let init.bert / init.vit fetch a Hugging Face hub id
        # Supervised ViT warm-start before stage 1 on a fresh run (fine_jax.vit_pretrain): steps of
        # predicting this label of the training images (subcategory, category, or caption_words:
        # which words the description has), at this peak learning rate. 0 = off.
        vit_pretrain_steps=0,
        vit_pretrain_label="subcategory",
        vit_pretrain_lr=5e-4,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        batch_size=256,
        # Evaluate every N epochs during training (0: only at the end) and at the end; the best
        # checkpoint by the stage's criterion is kept in WORKDIR/best.
        every_epochs=1,
        at_end=True,
        sample100_seed=66,
        sample100_queries=1000,
        sample100_negatives=100,
        sample100_draws=5,  # draws (seeds sample100_seed, +1, ...) for the mean and spread
        # ITM re-ranking of each query's top-k contrastive candidates (0: off). Reported under
        # its own keys; the contrastive results are unchanged.
        itm_rerank_k=0,
        # FashionIQ: "val" (the reference's gallery) or "split" (the full image split).
        tgir_gallery="val",
    ))
    return c


def apply_size(config: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """Sets the model sizes named ``name`` (a key of :data:`SIZES`); None or "" leaves them."""
    if not name:
        return config
    if name not in SIZES:
        raise ConfigError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)} "
                          "(--config=configs/FILE.py:SIZE)")
    defaults = dataclasses.asdict(ModelConfig())
    named = {k for size in SIZES.values() for k in size}
    sizes = {k: defaults[k] for k in named} if name == "base" else {}
    config.model.update({**sizes, **SIZES[name]})
    if name == "tiny":  # the text, queue and batch that go with the tiny size
        config.data.max_len = 32
        config.loss.queue_size = 1024
        config.train.global_batch_size = 8
    elif name == "demo":  # its 64 positions hold the demo's text length
        config.data.max_len = min(config.data.max_len, 48)
    return config


def _check_keys(config) -> None:
    """Unknown keys in the dataclass-backed blocks (a typo in a config file is not ignored)."""
    for name, cls in (("model", ModelConfig), ("loss", LossConfig), ("optim", OptimConfig)):
        known = {f.name for f in dataclasses.fields(cls)} - {"variant"}
        unknown = set(config[name].keys()) - known
        if unknown:
            raise ConfigError(f"unknown {name} config keys: {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(known))}")
    reference = base_config()
    for name in ("data", "train", "parallel", "init", "eval"):
        unknown = set(config[name].keys()) - set(reference[name].keys())
        if unknown:
            raise ConfigError(f"unknown {name} config keys: {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(reference[name].keys()))}")
    unknown = set(config.keys()) - set(reference.keys())
    if unknown:
        raise ConfigError(f"unknown config blocks: {', '.join(sorted(unknown))}")


def model_config(config) -> ModelConfig:
    """The model block as a checked ModelConfig; its variant follows ``config.stage``.

    ``model.vocab_size`` 0 means "from the dataset's vocab": the caller sets it before building
    the model (the check here skips it).
    """
    values = dict(config.model)
    values["variant"] = STAGE_VARIANT[config.get("stage", "pretrain")]
    mc = ModelConfig(**values)
    try:
        dataclasses.replace(mc, vocab_size=mc.vocab_size or 1).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return mc


def loss_config(config) -> LossConfig:
    return LossConfig(**dict(config.loss))


def optim_config(config) -> OptimConfig:
    return OptimConfig(**dict(config.optim))


def queue_batch(config) -> int:
    """Entries one step writes into the (image) queue: the global batch, twice it in stage 3
    (target and reference image features, method_spec §5.3)."""
    bg = config.train.global_batch_size
    return 2 * bg if config.stage == "tgir" else bg


def _check_parallel(config: ml_collections.ConfigDict, num_devices: int) -> None:
    from fine_jax import parallel

    p = config.parallel
    try:
        parallel.mesh_shape(p.data, p.fsdp, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.batch_semantics not in parallel.BATCH_SEMANTICS:
        raise ConfigError(f"parallel.batch_semantics={p.batch_semantics!r}: use "
                          f"{' or '.join(parallel.BATCH_SEMANTICS)}")
    if p.fsdp_min_size < 1:
        raise ConfigError(f"parallel.fsdp_min_size={p.fsdp_min_size} must be at least 1")
    per_device = config.train.global_batch_size // num_devices
    if p.batch_semantics == "per_group" and per_device < 2:
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} over {num_devices} devices "
            f"leaves {per_device} example per device: each device draws its ITM hard negatives "
            "from its own examples, so it needs at least 2. Raise the global batch to "
            f"{2 * num_devices} or use --config.parallel.batch_semantics=global")


def resolve_platform_defaults(config: ml_collections.ConfigDict) -> list[str]:
    """Replaces the config's per-platform choices (``model.dtype`` and ``model.matmul_precision``
    ``"auto"``) by what this platform runs, in place, so that the log, the FLOP peak and the
    saved config.json name them; returns a line for the log per choice made."""
    from fine_jax.models.fine import AUTO_DTYPE, resolve_dtype, resolve_matmul_precision

    notes = []
    if config.model.dtype == AUTO_DTYPE:
        dtype, why = resolve_dtype(AUTO_DTYPE)
        config.model.dtype = dtype
        notes.append(f"model.dtype=auto: {dtype} ({why}; --config.model.dtype=float32 runs the "
                     "reference's precision)")
    if config.model.get("matmul_precision", "auto") == "auto":
        precision, why = resolve_matmul_precision("auto", config.model.dtype)
        config.model.matmul_precision = precision
        notes.append(f"model.matmul_precision=auto: {precision} ({why})")
    return notes


def validate(config: ml_collections.ConfigDict, num_devices: int = 1,
             num_train_records: int | None = None) -> None:
    """Checks the combinations the model cannot run with; raises ConfigError naming the fix.

    ``num_train_records``, when known, also checks that one global batch fits the training set.
    """
    if config.get("stage") not in STAGES:
        raise ConfigError(f"stage={config.get('stage')!r}: use one of {', '.join(STAGES)}")
    _check_keys(config)
    model_config(config)
    loss_config(config)
    try:
        parse_lr_scales(config.optim.lr_scales)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t, l, m, d, e = config.train, config.loss, config.model, config.data, config.eval
    bg = t.global_batch_size
    if bg < 2:
        raise ConfigError(f"train.global_batch_size={bg}: the in-batch contrastive keys and ITM "
                          "hard-negative mining need at least 2 samples per batch")
    if bg % num_devices:
        raise ConfigError(f"train.global_batch_size={bg} is not divisible by the {num_devices} "
                          "devices; choose a multiple of the device count")
    _check_parallel(config, num_devices)
    if num_train_records is not None and num_train_records < bg:
        raise ConfigError(f"train.global_batch_size={bg} is larger than the training set "
                          f"({num_train_records} items); lower --config.train.global_batch_size")
    qb = queue_batch(config)
    if l.queue_size < qb or l.queue_size % qb:
        what = ("twice the global batch (stage 3 enqueues target and reference images)"
                if config.stage == "tgir" else "the global batch")
        raise ConfigError(
            f"loss.queue_size={l.queue_size} is not divisible by {what}, {qb} "
            f"(train.global_batch_size={bg}): the queue pointer must advance in whole batches. "
            f"Use e.g. --config.loss.queue_size={max(qb, (l.queue_size // qb) * qb)}")
    if l.mlm_overflow not in MLM_OVERFLOW:
        raise ConfigError(f"loss.mlm_overflow={l.mlm_overflow!r}: use {' or '.join(MLM_OVERFLOW)} "
                          "(where a batch with more MLM targets than the gathered buffer is caught)")
    if not 0.0 < l.mlm_max_fraction <= 1.0:
        raise ConfigError(f"loss.mlm_max_fraction={l.mlm_max_fraction} must lie in (0, 1]: the "
                          "share of text positions the gathered MLM buffer holds")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if t[key] < 1:
            raise ConfigError(f"train.{key}={t[key]} must be at least 1")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r}: use stop or skip")
    if t.max_nonfinite_skips < 0:
        raise ConfigError(f"train.max_nonfinite_skips={t.max_nonfinite_skips} must be >= 0")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps}: use a positive count, or -1 for "
                          "optim.epochs full epochs")
    if e.every_epochs < 0:
        raise ConfigError(f"eval.every_epochs={e.every_epochs} must be >= 0 (0: only at the end)")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be at least 1")
    if e.itm_rerank_k < 0:
        raise ConfigError(f"eval.itm_rerank_k={e.itm_rerank_k} must be >= 0 (0 turns it off)")
    if e.itm_rerank_k and config.stage == "tgir":
        raise ConfigError("eval.itm_rerank_k: the stage-3 model has no ITM head; set it to 0")
    if e.tgir_gallery not in ("val", "split"):
        raise ConfigError(f"eval.tgir_gallery={e.tgir_gallery!r}: use val or split")
    if e.sample100_draws < 1:
        raise ConfigError(f"eval.sample100_draws={e.sample100_draws} must be at least 1")
    if d.max_len > m.max_position_embeddings:
        raise ConfigError(f"data.max_len={d.max_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    if d.max_len <= m.text_local_start:
        raise ConfigError(f"data.max_len={d.max_len} leaves no local text tokens after position "
                          f"{m.text_local_start}")
    sources = ("fashioniq", "synthetic") if config.stage == "tgir" else ("fashiongen", "synthetic")
    if d.source not in sources:
        raise ConfigError(f"data.source={d.source!r} cannot feed stage {config.stage!r}; use one of "
                          f"{', '.join(sources)}")
    if d.num_workers < -1 or d.num_threads < 1 or d.prefetch < 1:
        raise ConfigError(f"data.num_workers={d.num_workers}, data.num_threads={d.num_threads}, "
                          f"data.prefetch={d.prefetch}: workers must be -1 (auto) or more, threads "
                          "and prefetch at least 1")
    if d.format not in ("auto", "arrayrecord", "h5", "reference_json"):
        raise ConfigError(f"data.format={d.format!r}: use auto, arrayrecord, h5 or reference_json")
    if d.lexicon not in ("wordnet", "json", "none"):
        raise ConfigError(f"data.lexicon={d.lexicon!r}: use wordnet, json or none")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < lo <= hi <= 1")
    if d.batch_groups not in ("", "twins", "twin_views"):
        raise ConfigError(f"data.batch_groups={d.batch_groups!r}: use '' (plain shuffle), 'twins' "
                          "or 'twin_views'")
    if d.batch_groups and (d.source != "synthetic" or config.stage == "tgir"):
        raise ConfigError(f"data.batch_groups={d.batch_groups!r} needs the embedded set's twin groups: "
                          "data.source='synthetic' and stage pretrain or retrieval; set "
                          "--config.data.batch_groups=''")
    if l.itm_exclude_twins and (d.source != "synthetic" or config.stage == "tgir"):
        raise ConfigError("loss.itm_exclude_twins=True needs the embedded set's twin groups: "
                          "data.source='synthetic' and stage pretrain or retrieval; set "
                          "--config.loss.itm_exclude_twins=False")
    if l.itm_negatives not in ("hard", "random"):
        raise ConfigError(f"loss.itm_negatives={l.itm_negatives!r}: use 'hard' (the reference's "
                          "hard-negative mining) or 'random' (uniform in-batch negatives)")
    if config.stage == "pretrain" and not d.stage1_symbol and l.w_sym > 0:
        raise ConfigError("data.stage1_symbol=False leaves no symbol token for the symbol loss; set "
                          "--config.loss.w_sym=0 or keep the symbol")
    for flag in ("scratch_warmup_queue", "scratch_warmup_maa_keys",
                 "scratch_warmup_random_negatives"):
        if l[flag] and l.scratch_warmup_steps <= 0:
            raise ConfigError(f"loss.{flag}=True only changes the from-scratch warm-up, which is off "
                              "(loss.scratch_warmup_steps=0); set --config.loss.scratch_warmup_steps "
                              f"or --config.loss.{flag}=False")
    if l.scratch_warmup_steps and config.stage != "pretrain":
        raise ConfigError("loss.scratch_warmup_steps is a stage-1 option (training from random "
                          "weights); stages 2 and 3 start from a stage-1 checkpoint")
    if config.optim.epochs < 1:
        raise ConfigError("optim.epochs must be at least 1")
    if config.init.vit_pretrain_steps < 0:
        raise ConfigError("init.vit_pretrain_steps must be >= 0 (0 turns the ViT warm-start off)")
    label = config.init.vit_pretrain_label
    if config.init.vit_pretrain_steps and label not in VIT_PRETRAIN_LABELS:
        raise ConfigError(f"init.vit_pretrain_label={label!r}: use one of "
                          f"{', '.join(VIT_PRETRAIN_LABELS)}")
    if config.init.vit_pretrain_steps and config.stage != "pretrain":
        raise ConfigError("init.vit_pretrain_steps is a stage-1 option; stages 2 and 3 start from "
                          "a stage-1 checkpoint (init.checkpoint)")
    if config.init.checkpoint and config.init.vit_pretrain_steps:
        raise ConfigError("init.checkpoint already holds a trained ViT; set "
                          "--config.init.vit_pretrain_steps=0")
    if config.init.checkpoint and (config.init.bert or config.init.vit):
        raise ConfigError("init.checkpoint already holds both towers; leave init.bert and init.vit "
                          "empty when it is set")
    step = str(config.init.checkpoint_step)
    if step not in ("best", "latest") and not step.isdigit():
        raise ConfigError(f"init.checkpoint_step={step!r}: use best, latest or a step number")


# What a resumed run must share with the run that wrote the workdir: the keys that shape the train
# state or the data order. Mesh sizes are not among them: a checkpoint restores onto any mesh.
# What a resumed run may not change without train.allow_config_change: the train state's shapes
# and structure (the model, the queue, the optimiser's chain, which optim.lr_scales extends) and
# the data order (batch, seed, twin groups).
RESUME_KEYS = ("stage", "model.*", "train.global_batch_size", "train.seed", "loss.queue_size",
               "data.batch_groups", "optim.lr_scales")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resume_changes(saved: dict, config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each :data:`RESUME_KEYS` key that ``config`` changes
    against ``saved`` (a workdir's config.json). Keys the saved config lacks are not compared."""
    import json

    old = _flatten(saved)
    new = _flatten(json.loads(config.to_json_best_effort()))
    changes = []
    for key in sorted(new):
        wanted = any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
                     for k in RESUME_KEYS)
        if wanted and key in old and old[key] != new[key]:
            changes.append((key, old[key], new[key]))
    return changes


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """Reference config with the tiny model, text length 32, queue 1,024 and batch 8."""
    c = apply_size(base_config(), "tiny")
    c.model.update(model_overrides)
    return c


def load_config_file(path, size: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(size)`` of a config file given by path (a config built on another one)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"fine_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)
