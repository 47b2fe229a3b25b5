"""Stage 3: text-guided image retrieval on FashionIQ, the reference setup (method_spec §5.3, §8.1).

The TGIR model (ViT, BERT, projections; no MAA, phrase convolutions or heads) initialised from the
best stage-1 checkpoint (not stage 2), with the stage-1 image queue and a fresh fusion queue.
Query = fusion of the reference image with the modification text through the text projection;
target = the CLS image feature; distilled contrastive loss against the image and fusion banks.
Global batch 16, queue 65,536, text length 79, AdamW lr 3e-5 / wd 0.3, warm-up from 1e-6 over the
first 100 iterations, cosine per epoch to 1e-7 over 10 epochs; evaluated every epoch on the three
categories' validation triplets, the best sum of R@10 + R@50 kept in WORKDIR/best.

    python -m fine_jax.train --config=configs/fashioniq_tgir.py --workdir=runs/stage3 \
        --config.data.data_dir=/data/fashioniq --config.init.checkpoint=runs/stage1
"""
from fine_jax.config import apply_size, base_config


def get_config(size=None):
    config = base_config()
    config.stage = "tgir"
    config.data.source = "fashioniq"
    config.data.data_dir = "data/fashioniq"
    config.data.max_len = 79
    config.train.global_batch_size = 16
    config.loss.queue_size = 65536
    config.optim.update(dict(lr=3e-5, warmup_lr=1e-6, min_lr=1e-7, warmup_units=1,
                             warmup_unit_iters=100, epochs=10, weight_decay=0.3))
    # Compute dtype per platform (fine_jax.models.fine.resolve_dtype): bf16 products accumulated
    # in fp32 with fp32 parameters on TPUs, GPUs and CPUs with AMX, float32 on other CPUs.
    # --config.model.dtype=float32 runs the reference's precision everywhere.
    config.model.dtype = "auto"
    config.init.checkpoint = ""  # the stage-1 workdir (its best step) or converted weights
    config.train.checkpoint_every = 1125  # once per epoch (18,000 triplets / 16)
    config.train.log_every = 50
    config.eval.every_epochs = 1
    return apply_size(config, size)
