"""The embedded demo, stage 2: retrieval fine-tuning from the stage-1 demo run.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo
    python -m fine_jax.train --config=configs/demo_retrieval.py --workdir=/tmp/fine_demo_s2

Starts from the best checkpoint of ``init.checkpoint`` (default: the stage-1 demo workdir above)
and fine-tunes the retrieval model on the embedded set with the reference stage-2 objective
(focal ITC with diagonal targets, momentum keys, queue and distillation, ITM with hard
negatives), on the same model sizes and data settings as configs/demo.py, with each twin group
in one batch.
"""
import pathlib

from fine_jax.config import apply_size, load_config_file


def get_config(size=None):
    c = load_config_file(pathlib.Path(__file__).with_name("demo.py"))
    c.stage = "retrieval"
    c.init.checkpoint = "/tmp/fine_demo"
    c.init.vit_pretrain_steps = 0
    c.init.vit = ""  # the stage-1 checkpoint holds the ViT
    c.loss.scratch_warmup_steps = 0
    c.optim.lr_scales = ""  # one learning rate, as the reference
    c.loss.scratch_warmup_maa_keys = False
    c.loss.scratch_warmup_random_negatives = False
    c.eval.itm_rerank_k = 0
    c.loss.w_itc = 1.0
    c.loss.gamma_focal = 2.0
    c.optim.update(dict(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_units=1, warmup_unit_iters=10,
                        epochs=24))
    c.eval.every_epochs = 3
    # As in stage 1: each twin group in one batch, so that the contrastive loss has to tell twins
    # apart (the reference shuffles plainly; measured in the README, "What the demos reach").
    c.data.batch_groups = "twins"
    # The reference's hard negatives, the twin among them: stage 1's exclusion lets its fusion
    # encoder learn matching first (README, "What the demos reach").
    c.loss.itm_exclude_twins = False
    return apply_size(c, size)
