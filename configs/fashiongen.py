"""Stage 1: Fashion-FINE pre-training on FashionGen, exactly the reference setup (method_spec §8.1).

ViT-B/16 @ 256 px + BERT-base (6 text + 6 fusion layers), global batch 128 (64 x 2 GPUs in the
reference), queue 65,536, AdamW lr 6e-5 / wd 0.02, warm-up from 1e-5 over 5 x 100 iterations, cosine
per epoch to 1e-5 over 10 epochs, focal ITC (alpha_f 0.25, gamma 2), MAA ratios 0.05 / 0.25;
evaluated every epoch, the best full-protocol sum kept in WORKDIR/best.

    python -m fine_jax.train --config=configs/fashiongen.py --workdir=DIR \
        --config.data.data_dir=/path/to/fashiongen
"""
from fine_jax.config import apply_size, base_config


def get_config(size=None):
    config = base_config()
    # Everything in base_config() is the reference stage-1 value; restated here for readers.
    config.stage = "pretrain"
    config.train.global_batch_size = 128
    config.loss.queue_size = 65536
    config.optim.epochs = 10
    config.optim.lr = 6e-5
    config.optim.weight_decay = 0.02
    config.data.source = "fashiongen"
    config.data.max_len = 180
    # Measured with benchmarks/data_pipeline.py --form=arrayrecord --sweep (256 px, batch 32):
    # worker processes with one thread each made the most records/s (the README's Speed section).
    config.data.num_workers = -1  # auto: a worker per core on an accelerator host, 0 on CPU
    config.data.num_threads = 1
    config.data.prefetch = 4
    # Compute dtype per platform (fine_jax.models.fine.resolve_dtype): bf16 products accumulated
    # in fp32 with fp32 parameters on TPUs, GPUs and CPUs with AMX, float32 on other CPUs.
    # --config.model.dtype=float32 runs the reference's precision everywhere.
    config.model.dtype = "auto"
    config.train.checkpoint_every = 2035  # once per epoch (260,480 / 128 iterations)
    config.train.log_every = 50
    config.eval.every_epochs = 1
    return apply_size(config, size)
