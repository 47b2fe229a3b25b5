"""The embedded demo, stage 3: text-guided image retrieval from the stage-1 demo run.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo
    python -m fine_jax.train --config=configs/demo_tgir.py --workdir=/tmp/fine_demo_s3

Starts from the best checkpoint of ``init.checkpoint`` (default: the stage-1 demo workdir above)
and trains the TGIR model on the embedded set's FashionIQ-style variant (a reference product, a
modification text, the modified target product), generated on first use beside the demo set.
"""
import pathlib

from fine_jax.config import apply_size, load_config_file


def get_config(size=None):
    c = load_config_file(pathlib.Path(__file__).with_name("demo.py"))
    c.stage = "tgir"
    c.init.checkpoint = "/tmp/fine_demo"
    c.init.vit_pretrain_steps = 0
    c.init.vit = ""  # the stage-1 checkpoint holds the ViT
    c.loss.scratch_warmup_steps = 0
    c.optim.lr_scales = ""  # one learning rate, as the reference
    c.loss.scratch_warmup_maa_keys = False
    c.loss.scratch_warmup_random_negatives = False
    c.eval.itm_rerank_k = 0
    c.data.batch_groups = ""  # TGIR triplets have no twin groups
    c.loss.itm_exclude_twins = False  # and stage 3 has no ITM
    c.loss.w_itc = 1.0  # the reference's weight (stage 1's demo raises it)
    c.train.global_batch_size = 32
    c.loss.queue_size = 1024
    c.optim.update(dict(lr=1e-4, warmup_lr=1e-5, min_lr=1e-6, warmup_units=1, warmup_unit_iters=10,
                        epochs=6, weight_decay=0.3))
    c.eval.every_epochs = 2
    return apply_size(c, size)
