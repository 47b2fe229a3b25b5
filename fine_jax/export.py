"""Export fine_jax weights to a PyTorch state_dict with the reference's names and shapes.

    python -m fine_jax.export --checkpoint=WORKDIR_OR_WEIGHTS --out=model.pth [--layout=pretrain]

``--checkpoint`` is a training workdir (its latest step, or ``--step``: a number or ``best``) or a
weights checkpoint written by ``fine_jax.convert``. The layout is the stage the state_dict is for:
``pretrain`` (stage 1), ``retrieval`` (stage 2) or ``tgir`` (stage 3, from a stage-3 run or
conversion); it defaults to the stage the run trained, or the layout a checkpoint was converted
from. A stage-1 run also exports as ``retrieval`` (a subset of it). The file holds ``{"model": state_dict}`` like the reference's own checkpoints
(``--bare`` writes the state_dict alone), with float32 parameters and int64 buffers. Converting it
back gives the same arrays bit for bit. Needs torch (``pip install -e ".[torch]"``).
"""
from __future__ import annotations

import sys

from fine_jax.checkpoint import WeightsNotFound, read_weights
from fine_jax.interop import io
from fine_jax.interop.layouts import EXPORT_LAYOUTS, LAYOUTS, LayoutError
from fine_jax.interop.reference import ConversionError, export_state_dict


def default_layout(info: dict) -> str:
    """The layout a checkpoint was converted from when fine_jax writes it, else the layout of
    the stage a training run trained (its config's ``stage``), else stage 1."""
    source = info.get("source", {}).get("layout")
    if source in LAYOUTS and LAYOUTS[source].exportable:
        return source
    stage = info.get("config", {}).get("stage", "pretrain")
    return stage if stage in EXPORT_LAYOUTS else "pretrain"


def export(checkpoint, out, layout: str | None = None, step: int | None = None,
           overwrite: bool = False, bare: bool = False, log=print):
    """Writes the reference state_dict of ``checkpoint`` to ``out``; returns it."""
    weights, info = read_weights(checkpoint, step=step)
    layout = layout or default_layout(info)
    state_dict = export_state_dict(weights, layout)
    path = io.write_torch_file(state_dict, out, wrap_key=None if bare else "model",
                               overwrite=overwrite)
    log(f"wrote {len(state_dict)} arrays ({layout} layout) to {path}")
    return state_dict


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save phase at INFO
    FLAGS = flags.FLAGS
    try:
        step = int(FLAGS.step) if FLAGS.step and FLAGS.step.isdigit() else FLAGS.step
        export(FLAGS.checkpoint, FLAGS.out, FLAGS.layout, step, FLAGS.overwrite, FLAGS.bare)
    except (ConversionError, LayoutError, WeightsNotFound, io.WeightsFileError,
            FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "Training workdir or fine_jax weights checkpoint.")
    flags.DEFINE_string("step", None, "Step of a training workdir: a number, best or latest "
                        "(default: the latest).")
    flags.DEFINE_string("out", None, "The .pth file to write.")
    flags.DEFINE_enum("layout", None, list(EXPORT_LAYOUTS),
                      "Reference layout (default: the converted-from layout, else pretrain).")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.DEFINE_bool("bare", False, "Write the state_dict itself, not {'model': state_dict}.")
    flags.mark_flags_as_required(["checkpoint", "out"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
