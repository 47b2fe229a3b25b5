"""Train any stage of Fashion-FINE.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo
    python -m fine_jax.train --config=configs/fashiongen.py --workdir=runs/stage1 \
        --config.data.data_dir=/data/fashiongen
    python -m fine_jax.train --config=configs/fashiongen_retrieval.py --workdir=runs/stage2 \
        --config.data.data_dir=/data/fashiongen --config.init.checkpoint=runs/stage1
    python -m fine_jax.train --config=configs/fashioniq_tgir.py --workdir=runs/stage3 \
        --config.data.data_dir=/data/fashioniq --config.init.checkpoint=runs/stage1

    # several processes (one per host, or one per GPU): every process runs the same command
    python -m fine_jax.train --config=... --workdir=gs://bucket/run        # Cloud TPU VM slice
    srun python -m fine_jax.train --config=... --workdir=/shared/run      # SLURM
    python -m fine_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

The config's ``stage`` says which stage it trains (``fine_jax.stages``); stages 2 and 3 start from
the best checkpoint of the stage-1 workdir named by ``init.checkpoint``. Restarting with the same
``--workdir`` resumes from its latest checkpoint, on the exact next batch. The loop itself is
``fine_jax.trainer.run``.
"""
from __future__ import annotations

from fine_jax import cli


def _train():
    from absl import flags

    from fine_jax import parallel, trainer

    f = flags.FLAGS
    try:
        parallel.initialize_distributed(f.distributed, f.coordinator_address, f.num_processes,
                                        f.process_id)
    except ValueError as e:
        from fine_jax.config import ConfigError

        raise ConfigError(str(e)) from None
    trainer.run(f.config, f.workdir)


def define_flags() -> None:
    from absl import flags

    cli.define_config_flag()
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results; an "
                        "existing one is resumed.")
    flags.DEFINE_enum("distributed", "auto", ["auto", "explicit", "none"],
                      "Multi-process start (jax.distributed): auto = from the environment on a "
                      "Cloud TPU VM slice or a SLURM job with several tasks, or from the flags "
                      "below when --coordinator_address is given; nothing on a single host.")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for an explicit "
                        "multi-process start.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (explicit start).")
    flags.DEFINE_integer("process_id", None, "This process's index (explicit start).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    define_flags()
    cli.main(_train)
