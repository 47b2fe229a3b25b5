"""Train any stage of Fashion-FINE.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo
    python -m fine_jax.train --config=configs/fashiongen.py --workdir=runs/stage1 \
        --config.data.data_dir=/data/fashiongen
    python -m fine_jax.train --config=configs/fashiongen_retrieval.py --workdir=runs/stage2 \
        --config.data.data_dir=/data/fashiongen --config.init.checkpoint=runs/stage1
    python -m fine_jax.train --config=configs/fashioniq_tgir.py --workdir=runs/stage3 \
        --config.data.data_dir=/data/fashioniq --config.init.checkpoint=runs/stage1

The config's ``stage`` says which stage it trains (``fine_jax.stages``); stages 2 and 3 start from
the best checkpoint of the stage-1 workdir named by ``init.checkpoint``. Restarting with the same
``--workdir`` resumes from its latest checkpoint, on the exact next batch. The loop itself is
``fine_jax.trainer.run``.
"""
from __future__ import annotations

from fine_jax import cli


def _train():
    from absl import flags

    from fine_jax import trainer

    trainer.run(flags.FLAGS.config, flags.FLAGS.workdir)


def define_flags() -> None:
    from absl import flags

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results; an "
                        "existing one is resumed.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    cli.main(_train)
