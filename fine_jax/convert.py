"""Convert a reference PyTorch checkpoint into a fine_jax weights checkpoint.

    python -m fine_jax.convert --pth=checkpoint_cmr_best_ft.pth --out=weights/fine_cmr \
        --config=configs/fashiongen.py --vocab=fashion_annotation/vocab.txt

Reads Fashion-FINE stage 1/2/3, FashionSAP and ALBEF-4M/14M state_dicts (the layout is detected from
the keys, ``--layout`` overrides; see ``fine_jax.interop.layouts``), checks every array against the
model config (``--config`` with any ``--config.model.*`` overrides; without ``--config``, the
reference sizes of ``fine_jax.config.base_config``), and writes params, momentum parameters and
queues as an orbax checkpoint with a ``fine_jax_weights.json`` beside it. Each layout goes into
the tree of its stage's model: ``retrieval`` into the stage-2 tree (no phrase convolutions, MLM or
replace heads), ``tgir`` into the stage-3 tree (no MAA or heads; image and fusion queues), the
others into the stage-1 tree.

Missing or unused keys stop the conversion with their names unless ``--allow_partial``; what a
layout does not have at all (stage 2's MLM head, ALBEF's ``combine_*_proj``) keeps fine_jax's
initialisation and is listed. The result is used by ``--config.init.checkpoint=OUT`` (training and
``fine_jax.evaluate``), ``fine_jax.export`` and ``fine_jax.api.FineModel.load``. Needs torch for
``.pth``/``.bin`` input (``pip install -e ".[torch]"``); ``.safetensors`` input does not.
"""
from __future__ import annotations

import pathlib
import sys

from fine_jax.checkpoint import save_weights
from fine_jax import config as config_lib
from fine_jax.config import ConfigError, base_config
from fine_jax.interop import io
from fine_jax.interop.layouts import LAYOUTS, LayoutError
from fine_jax.interop.reference import ConversionError, convert_state_dict
from fine_jax.models.fine import ModelConfig

_WORD_EMBEDDINGS = ("text_encoder.embeddings.word_embeddings.weight",
                    "text_encoder.bert.embeddings.word_embeddings.weight")


def model_config_for(cfg, state_dict) -> ModelConfig:
    """The config's model sizes; a vocab size of 0 ("from the data") is read from the file and
    written into ``cfg``."""
    if cfg.model.vocab_size in (0, -1, None):
        key = next((k for k in _WORD_EMBEDDINGS if k in state_dict), None)
        if key is None:
            raise ConfigError("model.vocab_size is 0 and the file has no word embeddings to size it "
                              "from; set --config.model.vocab_size")
        cfg.model.vocab_size = int(state_dict[key].shape[0])
    return config_lib.model_config(cfg)


def convert(pth, out, cfg=None, layout: str | None = None, allow_partial: bool = False,
            overwrite: bool = False, trust_pickle: bool = False, vocab=None, seed: int = 0,
            log=print):
    """Converts ``pth`` into the weights checkpoint ``out``; returns the conversion report."""
    cfg = cfg.copy_and_resolve_references() if cfg is not None else base_config()
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if vocab is not None and not pathlib.Path(vocab).is_file():
        raise FileNotFoundError(f"vocab file not found: {vocab}")
    state_dict = io.read_weights(pth, trust_pickle)
    log(f"read {len(state_dict)} arrays from {pth}")
    model_config = model_config_for(cfg, state_dict)
    weights, report = convert_state_dict(state_dict, model_config, layout, allow_partial, seed,
                                         cfg.loss.queue_size)
    variant = LAYOUTS[report.layout].variant
    for line in report.lines():
        log(line)
    info = {
        "config": {"stage": variant, "model": cfg.model.to_dict(),
                   "data": {"max_len": cfg.data.max_len}},
        "source": {"file": str(pathlib.Path(pth).expanduser().absolute()), "layout": report.layout,
                   "seed": seed},
        "report": report.to_dict(),
    }
    files = {"vocab.txt": pathlib.Path(vocab)} if vocab is not None else None
    save_weights(out, weights, info, overwrite=overwrite, files=files)
    log(f"wrote {out}")
    return report


KNOWN_ERRORS = (ConfigError, ConversionError, LayoutError, io.WeightsFileError, FileExistsError,
                FileNotFoundError)


def main(argv):
    del argv
    from absl import flags
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save phase at INFO
    FLAGS = flags.FLAGS
    try:
        convert(FLAGS.pth, FLAGS.out, FLAGS.config,
                layout=None if FLAGS.layout == "auto" else FLAGS.layout,
                allow_partial=FLAGS.allow_partial, overwrite=FLAGS.overwrite,
                trust_pickle=FLAGS.trust_pickle, vocab=FLAGS.vocab, seed=FLAGS.seed)
    except KNOWN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config whose model block gives the sizes (default: the "
        "reference sizes, fine_jax.config.base_config).")
    flags.DEFINE_string("pth", None, "The PyTorch checkpoint (.pth/.bin, or .safetensors).")
    flags.DEFINE_string("out", None, "Directory to write the fine_jax weights checkpoint to.")
    flags.DEFINE_enum("layout", "auto", ["auto", *LAYOUTS], "Checkpoint layout; auto: from the keys.")
    flags.DEFINE_bool("allow_partial", False, "Convert even if keys are missing or unused.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.DEFINE_bool("trust_pickle", False, "torch.load with weights_only=False (trusted files only).")
    flags.DEFINE_string("vocab", None, "vocab.txt to store with the weights (used by fine_jax.api).")
    flags.DEFINE_integer("seed", 0, "Seed of the initial values of what the file does not have.")
    flags.mark_flags_as_required(["pth", "out"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
