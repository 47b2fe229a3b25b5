"""The embedded demo, stage 1: pre-training on the generated mini-FashionGen, minutes on a CPU.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo

The dataset (FashionGen in miniature: rendered products with category, colour, pattern and small
local details, near-twin products that differ in one detail, FashionGen-style captions, its own
WordPiece vocab with the 9 symbol tokens at ids 1-9) is generated deterministically on first use
into data.data_dir, in FashionGen's own HDF5 schema, and reused afterwards.

The ViT starts from fine_jax/assets/demo_vit.safetensors (``init.vit``), the demo's stand-in for
the DeiT weights the reference's ViT starts from, pre-trained on the embedded set's training split
by ``python -m fine_jax.vit_pretrain`` (fine_jax/assets/__init__.py has the command). The rest of
the model is trained from random weights, which the reference never does; the settings below that
depart from the reference recipe for that reason, and what each one measured, are in the README
("The embedded demo"). Stages 2 and 3 continue from this run: configs/demo_retrieval.py and
configs/demo_tgir.py.
"""
from fine_jax.assets import DEMO_VIT
from fine_jax.config import apply_size, base_config


def get_config(size=None):
    c = base_config()
    c.stage = "pretrain"
    c.data.source = "synthetic"
    c.data.data_dir = "~/.cache/fine_jax/synthetic"
    c.data.crop_scale = (0.8, 1.0)  # 64 px images: a 50% crop would cut away the local details
    # No RandAugment: ALBEF's AutoContrast whitens colour channels (reproduced by default) and
    # colour is a key attribute here; measured, the demo learns faster without it.
    c.data.randaug_n = 0
    c.data.num_threads = 2
    c.data.fix_mlm_labels = True
    c.data.stage1_symbol = True  # the symbol token at position 1, for the symbol loss ...
    c.model.symbol_one_way = True  # ... which the caption cannot read (see the README)
    c.data.stage1_attributes = False  # description-only text after it, as evaluation reads
    # One image of each product of a twin group in one batch: the contrastive loss has to tell
    # twins apart, and a batch still holds as many products as images.
    c.data.batch_groups = "twin_views"

    apply_size(c, "demo")
    c.data.max_len = 44  # [CLS] [symbol] + prompt + the longest caption (36 word-pieces) + [SEP]
    c.model.vocab_size = 0  # 0: taken from the generated vocab
    c.loss.queue_size = 1024
    # From-scratch warm-up for the first third of the run, then the reference objective.
    c.loss.scratch_warmup_steps = 150
    c.loss.scratch_warmup_maa_keys = True
    c.loss.scratch_warmup_random_negatives = True
    c.loss.temp_min = 0.05
    c.loss.w_itc = 4.0  # undoes the focal alpha of 0.25
    c.loss.w_sym = 0.1
    c.init.vit = str(DEMO_VIT)
    # How fine_jax.vit_pretrain made that file (and what an in-run warm-start,
    # --config.init.vit_pretrain_steps=N, would run): which words a description has, so that
    # the ViT sees the colours, patterns and details the captions name.
    c.init.vit_pretrain_steps = 0
    c.init.vit_pretrain_label = "caption_words"
    c.init.vit_pretrain_lr = 1e-3
    c.loss.itm_exclude_same_product = True
    # ITM draws its hard negatives from the rest of the batch, not from the positive's twin group:
    # with the twin as the negative, the fusion encoder's ITM loss stays at its chance value
    # (README, "What the demos reach").
    c.loss.itm_exclude_twins = True
    # The demo's published figures were measured with the MLM overflow check inside the step;
    # loss.mlm_overflow=host (the default) computes the same loss rounded differently.
    c.loss.mlm_overflow = "step"
    c.model.hidden_dropout = 0.0
    c.model.attention_dropout = 0.0

    c.train.global_batch_size = 64
    c.optim.epochs = 8
    c.optim.lr = 5e-4
    # The fusion layer and the ITM head learn at 8 times the rate: measured, every retrieval
    # figure and the twin test gain 1.5-4.5 points (README, "What the demos reach").
    c.optim.lr_scales = "text_encoder/layer_[2-9]|itm_head=8.0"
    c.optim.warmup_lr = 5e-5
    c.optim.min_lr = 5e-5
    c.optim.warmup_units = 5
    c.optim.warmup_unit_iters = 10
    c.optim.weight_decay = 0.02
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.eval.batch_size = 128
    c.eval.every_epochs = 0  # evaluated once, at the end
    if size and size != "demo":
        c.init.vit = ""  # the shipped ViT is the demo size's
    return apply_size(c, size)
