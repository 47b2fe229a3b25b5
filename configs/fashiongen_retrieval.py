"""Stage 2: cross-modal retrieval fine-tuning on FashionGen, the reference setup (method_spec §8.1).

The retrieval model (no phrase convolutions, MLM or replace heads) initialised from the best
stage-1 checkpoint (online and momentum parameters and the image/text queues, as the reference's
``load_state_dict(strict=False)`` does); focal ITC with diagonal targets + ITM with hard
negatives on the clean "the image description is ..." text, one random image per product per
epoch. Global batch 128, queue 65,536, AdamW lr 1e-5 / wd 0.02, warm-up from 1e-6 over the first
100 iterations, cosine per epoch to 1e-6 over 30 epochs; evaluated every epoch, the best
full-protocol sum kept in WORKDIR/best.

    python -m fine_jax.train --config=configs/fashiongen_retrieval.py --workdir=runs/stage2 \
        --config.data.data_dir=/data/fashiongen --config.init.checkpoint=runs/stage1
"""
from fine_jax.config import apply_size, base_config


def get_config(size=None):
    config = base_config()
    config.stage = "retrieval"
    config.data.source = "fashiongen"
    config.data.max_len = 180
    config.train.global_batch_size = 128
    config.loss.queue_size = 65536
    config.optim.update(dict(lr=1e-5, warmup_lr=1e-6, min_lr=1e-6, warmup_units=1,
                             warmup_unit_iters=100, epochs=30, weight_decay=0.02))
    # Compute dtype per platform (fine_jax.models.fine.resolve_dtype): bf16 products accumulated
    # in fp32 with fp32 parameters on TPUs, GPUs and CPUs with AMX, float32 on other CPUs.
    # --config.model.dtype=float32 runs the reference's precision everywhere.
    config.model.dtype = "auto"
    config.init.checkpoint = ""  # the stage-1 workdir (its best step) or converted weights
    config.train.checkpoint_every = 469  # about once per epoch (~60k products / 128)
    config.train.log_every = 50
    config.eval.every_epochs = 1
    return apply_size(config, size)
