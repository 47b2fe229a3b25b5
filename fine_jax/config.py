"""The configuration schema shared by every config file, and its validation.

``base_config()`` holds the reference stage-1 values (method_spec §8.1); files in ``configs/`` start
from it and override. Any value can be changed on the command line with ``--config.a.b=value``.
"""
from __future__ import annotations

import dataclasses

import ml_collections


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message names the keys and the fix."""


def dataclass_from_block(cls, block, name: str):
    """Builds the frozen dataclass ``cls`` from config block ``name``; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(block)
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"unknown {name} config keys: {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**values)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model sizes: ViT-B/16 @ 256 px + BERT-base split 6 text + 6 fusion layers.
    c.model = ml_collections.ConfigDict(dict(
        image_size=256, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
        vision_mlp_ratio=4.0, vision_ln_eps=1e-6,
        vocab_size=30522, hidden_size=768, num_layers=12, fusion_layer=6, num_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
        hidden_dropout=0.1, attention_dropout=0.1, bert_ln_eps=1e-12,
        embed_dim=256, replace_kind_num=2, temp_init=0.07,
        img_patch_ratio=0.05, text_patch_ratio=0.25, symbol_ratio=0.95, text_local_start=2,
        mask_padding_in_pooling=False,  # method_spec §10 B1 fix when True
        dtype="float32",
    ))

    c.loss = ml_collections.ConfigDict(dict(
        momentum=0.995, alpha=0.4, alpha_warmup=True, alpha_focal=0.25, gamma_focal=2.0,
        temp_min=0.001, temp_max=0.5, queue_size=65536,
        w_itc=1.0, w_itm=1.0, w_sym=1.0, w_mlm=1.0, w_rtp=1.0,
        itm_exclude_same_product=False,  # method_spec §10 B4 fix when True
        scratch_warmup_steps=0,  # from-scratch training only, see train_step.LossConfig
        scratch_warmup_queue=False,
        scratch_warmup_maa_keys=False,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=6e-5, warmup_lr=1e-5, min_lr=1e-5, warmup_units=5, warmup_unit_iters=100, epochs=10,
        weight_decay=0.02, b1=0.9, b2=0.999, eps=1e-8,
    ))

    c.data = ml_collections.ConfigDict(dict(
        # "fashiongen": real FashionGen in data_dir; "synthetic": the embedded demo set.
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
        num_workers=0,  # grain worker processes; 0 = threads in the main process
        num_threads=2,
        prefetch=4,
        # Embedded synthetic set (source="synthetic").
        synthetic_seed=0,
        synthetic_train_products=1600,
        synthetic_eval_products=400,
        synthetic_views=3,
        synthetic_image_size=64,
    ))

    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=128,
        max_steps=-1,  # -1: optim.epochs full epochs
        seed=66,
        log_every=50,
        checkpoint_every=2000,
        keep_checkpoints=2,
        eval_at_end=True,
        eval_every_epoch=False,
    ))

    # Initial weights of a fresh run (fine_jax.interop.initialize); a resumed run ignores them.
    c.init = ml_collections.ConfigDict(dict(
        checkpoint="",  # weights from python -m fine_jax.convert (or a training workdir)
        queues=True,  # also take the checkpoint's queues (their size must be loss.queue_size)
        bert="",  # bert-base-uncased folder / .safetensors / .bin, or a hub id (allow_download)
        vit="",  # timm/DeiT ViT-B/16 .pth / .safetensors / folder, or a hub id (allow_download)
        allow_download=False,  # let init.bert / init.vit fetch a Hugging Face hub id
        # Supervised ViT warm-start before stage 1 on a fresh run (fine_jax.vit_pretrain): steps of
        # classifying the training images by this label, at this peak learning rate. 0 = off.
        vit_pretrain_steps=0,
        vit_pretrain_label="subcategory",
        vit_pretrain_lr=5e-4,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        batch_size=256,
        sample100_seed=66,
        sample100_queries=1000,
        sample100_negatives=100,
    ))
    return c


VIT_PRETRAIN_LABELS = ("subcategory", "category")  # the record fields init.vit_pretrain_label names


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Checks the combinations the model cannot run with; raises ConfigError naming the fix."""
    t, l, m, d = config.train, config.loss, config.model, config.data
    bg = t.global_batch_size
    if bg < 2:
        raise ConfigError(f"train.global_batch_size={bg}: ITM hard-negative mining needs at least "
                          "2 samples per batch")
    if bg % num_devices:
        raise ConfigError(f"train.global_batch_size={bg} is not divisible by the {num_devices} "
                          "devices; choose a multiple of the device count")
    if l.queue_size % bg:
        raise ConfigError(
            f"loss.queue_size={l.queue_size} is not divisible by the global batch {bg} "
            f"(train.global_batch_size): the queue pointer must advance in whole batches. "
            f"Use e.g. --config.loss.queue_size={max(bg, (l.queue_size // bg) * bg)}")
    if l.queue_size < bg:
        raise ConfigError(f"loss.queue_size={l.queue_size} is smaller than the global batch {bg}")
    if d.max_len > m.max_position_embeddings:
        raise ConfigError(f"data.max_len={d.max_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    if d.max_len <= m.text_local_start:
        raise ConfigError(f"data.max_len={d.max_len} leaves no local text tokens after position "
                          f"{m.text_local_start}")
    if not 0 <= m.fusion_layer <= m.num_layers:
        raise ConfigError(f"model.fusion_layer={m.fusion_layer} must be within [0, "
                          f"model.num_layers={m.num_layers}]")
    if m.image_size % m.patch_size:
        raise ConfigError(f"model.image_size={m.image_size} is not a multiple of model.patch_size="
                          f"{m.patch_size}")
    if m.vision_width != m.hidden_size:
        raise ConfigError(f"model.vision_width={m.vision_width} must equal model.hidden_size="
                          f"{m.hidden_size}: one adapter pools both modalities at one width")
    if not (0.0 <= m.img_patch_ratio <= 1.0 and 0.0 <= m.text_patch_ratio <= 1.0):
        raise ConfigError("model.img_patch_ratio and model.text_patch_ratio must lie in [0, 1]")
    if d.format not in ("auto", "arrayrecord", "h5", "reference_json"):
        raise ConfigError(f"data.format={d.format!r}: use auto, arrayrecord, h5 or reference_json")
    if d.lexicon not in ("wordnet", "json", "none"):
        raise ConfigError(f"data.lexicon={d.lexicon!r}: use wordnet, json or none")
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < lo <= hi <= 1")
    if not d.stage1_symbol and config.loss.w_sym > 0:
        raise ConfigError("data.stage1_symbol=False leaves no symbol token for the symbol loss; set "
                          "--config.loss.w_sym=0 or keep the symbol")
    for flag in ("scratch_warmup_queue", "scratch_warmup_maa_keys"):
        if l[flag] and l.scratch_warmup_steps <= 0:
            raise ConfigError(f"loss.{flag}=True only changes the from-scratch warm-up, which is off "
                              "(loss.scratch_warmup_steps=0); set --config.loss.scratch_warmup_steps "
                              f"or --config.loss.{flag}=False")
    if config.optim.epochs < 1:
        raise ConfigError("optim.epochs must be at least 1")
    if config.init.vit_pretrain_steps < 0:
        raise ConfigError("init.vit_pretrain_steps must be >= 0 (0 turns the ViT warm-start off)")
    label = config.init.vit_pretrain_label
    if config.init.vit_pretrain_steps and label not in VIT_PRETRAIN_LABELS:
        raise ConfigError(f"init.vit_pretrain_label={label!r}: use one of "
                          f"{', '.join(VIT_PRETRAIN_LABELS)}")
    if config.init.checkpoint and config.init.vit_pretrain_steps:
        raise ConfigError("init.checkpoint already holds a trained ViT; set "
                          "--config.init.vit_pretrain_steps=0")
    if config.init.checkpoint and (config.init.bert or config.init.vit):
        raise ConfigError("init.checkpoint already holds both towers; leave init.bert and init.vit "
                          "empty when it is set")


# The "tiny" size used by tests and by benchmarks/train_step.py, fixed so that step times can be
# compared across implementations: ViT 64 wide, 2 deep, 2 heads, 16 px patches on 64 px images;
# BERT 64 hidden, 4 layers (2 text + 2 fusion), 2 heads, FFN 256, full 30,522 vocab; E = 256.
TINY_MODEL = dict(
    image_size=64, patch_size=16, vision_width=64, vision_depth=2, vision_heads=2,
    vocab_size=30522, hidden_size=64, num_layers=4, fusion_layer=2, num_heads=2,
    intermediate_size=256, embed_dim=256,
)


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """Reference config with the tiny model, text length 32, queue 1,024 and batch 8."""
    c = base_config()
    c.model.update(dict(TINY_MODEL, **model_overrides))
    c.data.max_len = 32
    c.loss.queue_size = 1024
    c.train.global_batch_size = 8
    return c
