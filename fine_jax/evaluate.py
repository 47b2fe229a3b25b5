"""Evaluate a checkpoint with the reference protocols of its stage.

    python -m fine_jax.evaluate --config=configs/fashiongen.py --checkpoint=runs/stage1
    python -m fine_jax.evaluate --config=configs/fashiongen_retrieval.py \
        --checkpoint=weights/fine_cmr --out=runs/eval_cmr --config.data.data_dir=/data/fashiongen
    python -m fine_jax.evaluate --config=configs/fashioniq_tgir.py --checkpoint=runs/stage3 \
        --step=latest

``--checkpoint`` is a training workdir (its best evaluated step by default; ``--step=latest`` or a
step number) or a weights checkpoint from ``python -m fine_jax.convert``. Only the parameters and
the evaluation split are read: no training split, optimiser state, WordNet or data iterator. The
results go to ``OUT/eval_results.json`` (``--out``, by default the workdir, or the weights folder)
and the sample-100 candidate sets beside them. A checkpoint that is not there is refused with one
message; nothing is scored with random weights.
"""
from __future__ import annotations

import pathlib

from fine_jax import cli


def default_out_name(cfg, step) -> str:
    """``step_N`` (``weights`` for a weights checkpoint), with ``_tgir`` for a stage-3 evaluation
    and ``_itm_rerankK`` for ITM re-ranking, so that evaluating one checkpoint in several ways
    keeps every result."""
    name = f"step_{step}" if step is not None else "weights"
    if cfg.stage == "tgir":
        name += "_tgir"
    if cfg.stage != "tgir" and cfg.eval.get("itm_rerank_k", 0):
        name += f"_itm_rerank{cfg.eval.itm_rerank_k}"
    return name


def evaluate(cfg, checkpoint, out=None, step="best", log=print) -> dict:
    """Scores ``checkpoint`` with ``cfg.stage``'s evaluator; returns the flat results."""
    import jax
    from flax import traverse_util

    from fine_jax import config as config_lib
    from fine_jax import parallel, stages
    from fine_jax.checkpoint import read_weights
    from fine_jax.eval.results import write_results
    from fine_jax.models.fine import FashionFINE, init_params, matmul_precision_scope

    for note in config_lib.resolve_platform_defaults(cfg):
        log(note)
    config_lib.validate(cfg, num_devices=jax.device_count())
    weights, info = read_weights(checkpoint, parts=("params",), step=step, log=log)
    evaluator = stages.get(cfg.stage).evaluator(cfg)
    if cfg.model.vocab_size in (0, -1, None):
        cfg.model.vocab_size = evaluator.vocab_size
    model = FashionFINE(config_lib.model_config(cfg))
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    params = weights["params"]
    missing = [m for m in abstract if m not in params]
    if missing:
        raise config_lib.ConfigError(
            f"{checkpoint} has no {', '.join(missing)}, which the {cfg.stage} model needs; "
            "evaluate it with the config of the stage it was trained for")
    params = {m: params[m] for m in abstract}  # a stage-1 checkpoint scored by a stage-2 config
    ours, theirs = (traverse_util.flatten_dict(t) for t in (abstract, params))
    wrong = [f"{'/'.join(p)}: checkpoint {tuple(theirs[p].shape) if p in theirs else 'missing'}, "
             f"config {tuple(ours[p].shape)}" for p in ours
             if p not in theirs or tuple(theirs[p].shape) != tuple(ours[p].shape)]
    if wrong:
        raise config_lib.ConfigError("the checkpoint does not fit the model config (sizes come "
                                     "from --config):\n  " + "\n  ".join(wrong[:20]))
    path = pathlib.Path(checkpoint).expanduser().absolute()
    if out:
        out = pathlib.Path(out).expanduser().absolute()
    else:  # beside the checkpoint, never over a training run's own eval_results.json
        out = path / "evaluation" / default_out_name(cfg, info.get("step"))
    out.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    with matmul_precision_scope(model.config):  # traced at the float32 precision training used
        results = evaluator(model, params, mesh, out, log)
    log(evaluator.report(results))
    log(f"{evaluator.criterion} = {results[evaluator.criterion]:.2f}")
    if jax.process_index() == 0:
        write_results(out / "eval_results.json", {
            "criterion": evaluator.criterion, "checkpoint": str(path),
            "step": info.get("step"), "results": results})
        log(f"wrote {out / 'eval_results.json'}")
    return results


def _evaluate():
    from absl import flags

    f = flags.FLAGS
    checkpoint = f.checkpoint or f.workdir
    step = f.step if f.step in ("best", "latest") else int(f.step)
    evaluate(f.config, checkpoint, out=f.out, step=step)


def define_flags() -> None:
    from absl import flags

    cli.define_config_flag()
    flags.DEFINE_string("checkpoint", None, "A training workdir or a weights checkpoint.")
    flags.DEFINE_string("workdir", None, "Same as --checkpoint (a training workdir).")
    flags.DEFINE_string("step", "best", "best, latest, or a step number (training workdirs).")
    flags.DEFINE_string("out", None, "Where to write eval_results.json (default: "
                        "CHECKPOINT/evaluation/step_N, or .../weights for a weights checkpoint; "
                        "_tgir or _itm_rerankK added for those evaluations).")
    flags.mark_flags_as_required(["config"])
    flags.register_multi_flags_validator(
        ["checkpoint", "workdir"], lambda v: bool(v["checkpoint"] or v["workdir"]),
        message="pass --checkpoint=PATH (a training workdir or a weights checkpoint)")
    flags.register_validator("step", lambda v: v in ("best", "latest") or v.isdigit(),
                             message="--step must be best, latest or a step number")


if __name__ == "__main__":
    define_flags()
    cli.main(_evaluate)
