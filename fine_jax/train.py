"""Stage-1 Fashion-FINE pre-training.

    python -m fine_jax.train --config=configs/demo.py --workdir=/tmp/fine_demo
    python -m fine_jax.train --config=configs/fashiongen.py --workdir=DIR \
        --config.data.data_dir=/data/fashiongen

Restarting with the same ``--workdir`` resumes from the latest checkpoint, on the exact next batch.
Writes ``metrics.jsonl`` and TensorBoard events (``tb/``) to the workdir, checkpoints to
``checkpoints/``, and at the end ``eval_results.json``.
"""
from __future__ import annotations

import json
import pathlib
import signal
import sys
import time

import jax
import numpy as np

from fine_jax import config as config_lib
from fine_jax import datasets, evaluate, parallel, vit_pretrain
from fine_jax.checkpoint import Checkpointer, abstract_like
from fine_jax.data import pipeline
from fine_jax.interop import initialize
from fine_jax.models.fine import FashionFINE, ModelConfig
from fine_jax.optim import make_optimizer
from fine_jax.train_step import LossConfig, create_train_state, make_train_step


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Metric writers
# ----------------------------------------------------------------------------------------------
class MetricWriter:
    """JSONL (one object per logged step) and TensorBoard scalars, process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(workdir / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_line(step: int, total: int, metrics: dict, ex_per_s: float, eta: float) -> str:
    losses = " ".join(f"{k[5:] if k.startswith('loss_') else k} {metrics[k]:.4f}"
                      for k in ("loss", "loss_itc", "loss_itm", "loss_sym", "loss_mlm", "loss_rtp"))
    return (f"step {step}/{total} | {losses} | lr {metrics.get('lr', 0):.2e} "
            f"temp {metrics['temp']:.4f} alpha {metrics['alpha']:.3f} | {ex_per_s:.1f} ex/s | "
            f"ETA {format_eta(eta)}")


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def run(cfg, workdir: str, evaluate_only: bool = False) -> dict | None:
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    # --- data -------------------------------------------------------------------------------
    data = datasets.resolve(cfg)
    if cfg.model.vocab_size in (0, -1, None):
        cfg.model.vocab_size = data.tokenizer.vocab_size  # sized from the dataset's own vocab
    elif cfg.model.vocab_size != data.tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but {data.tokenizer} has "
            f"{data.tokenizer.vocab_size} entries; set --config.model.vocab_size="
            f"{data.tokenizer.vocab_size}")
    mesh = parallel.make_mesh()
    config_lib.validate(cfg, num_devices=jax.device_count())
    if is_main:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))

    bg = cfg.train.global_batch_size
    spe = pipeline.steps_per_epoch(len(data.train) // jax.process_count() * jax.process_count(), bg)
    total_steps = cfg.optim.epochs * spe if cfg.train.max_steps < 0 else cfg.train.max_steps
    log(f"fine_jax stage 1 | devices: {jax.device_count()} x {jax.devices()[0].platform} | "
        f"train rows {len(data.train)} ({data.train.num_products} products) | eval rows "
        f"{len(data.eval)} ({data.eval.num_products} products) | global batch {bg} | "
        f"{spe} steps/epoch | {total_steps} steps")

    # --- model, optimiser, state ------------------------------------------------------------
    model = FashionFINE(ModelConfig.from_config(cfg.model))
    loss_cfg = LossConfig.from_config(cfg.loss)
    optimizer, schedule = make_optimizer(cfg.optim, spe)
    repl = parallel.replicated(mesh)
    init = jax.jit(lambda r: create_train_state(model, optimizer, r, loss_cfg.queue_size),
                   out_shardings=repl)
    state = init(jax.random.PRNGKey(cfg.train.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    log(f"model: {n_params / 1e6:.2f}M parameters")

    transform = pipeline.Stage1Transform(
        tokenizer=data.tokenizer, category_symbols=data.category_symbols, lexicon=data.lexicon,
        image_size=cfg.model.image_size, max_len=cfg.data.max_len,
        crop_scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip, randaug_n=cfg.data.randaug_n,
        randaug_m=cfg.data.randaug_m, fix_mlm_labels=cfg.data.fix_mlm_labels,
        symbol=cfg.data.stage1_symbol, attributes=cfg.data.stage1_attributes)
    train_ds = pipeline.train_dataset(
        data.train, transform, bg, seed=cfg.train.seed, num_epochs=None,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
        num_workers=cfg.data.num_workers)
    data_iter = iter(train_ds)

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, abstract_like(state), data_iter)
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        if initialize.requested(cfg):  # a fresh run from converted / public weights (config.init)
            state = jax.device_put(initialize.initialise(cfg, state, log), repl)
        if cfg.init.vit_pretrain_steps and not evaluate_only:
            state, _ = vit_pretrain.pretrain_vit(cfg, model, state, data.train, log)
            state = jax.device_put(state, repl)
            ckpt.save(0, state, data_iter, force=True)  # a restart resumes after the warm-start
    start = int(start or 0)

    if evaluate_only:
        if start == 0:
            log(f"no checkpoint in {workdir / 'checkpoints'}: evaluating the initial weights")
        results = evaluate.evaluate(model, state["params"], data, cfg, workdir, log)
        ckpt.close()
        return results

    # --- train loop -------------------------------------------------------------------------
    step_fn = make_train_step(model, optimizer, loss_cfg, spe, schedule, total_steps=total_steps)
    batch_shard = parallel.batch_sharding(mesh)
    jstep = jax.jit(step_fn, in_shardings=(repl, batch_shard, repl), out_shardings=(repl, repl),
                    donate_argnums=0)
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    writer = MetricWriter(workdir, enabled=is_main)

    stop = {"signal": None}

    def on_signal(signum, _frame):  # preemption: save at the next step boundary, then exit
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_signal)
    t_last, n_last = time.time(), start
    t_start = time.time()
    step = start
    bad_records = 0  # unreadable records the pipeline replaced (this process, this run)
    try:
        while step < total_steps:
            host_batch = next(data_iter)
            bad_records += int(np.sum(host_batch.pop(pipeline.BAD_KEY, 0)))
            batch = parallel.global_batch(host_batch, mesh)
            state, metrics = jstep(state, batch, jax.random.fold_in(base_rng, step))
            step += 1
            if step == start + 1:
                jax.block_until_ready(metrics)
                log(f"first step (with compilation) took {time.time() - t_start:.1f}s")
                t_last, n_last = time.time(), step
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                rate = (step - n_last) * bg / max(now - t_last, 1e-9) if step > n_last else 0.0
                eta = (total_steps - step) * bg / rate if rate > 0 else 0.0
                metrics.update(examples_per_s=rate, epoch=step / spe, bad_records=bad_records)
                writer.write(step, metrics)
                log(format_line(step, total_steps, metrics, rate, eta) +
                    (f" | {bad_records} unreadable records replaced" if bad_records else ""))
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; the last "
                                             "good checkpoint is kept in "
                                             f"{workdir / 'checkpoints'}")
                t_last, n_last = now, step
            if step % cfg.train.checkpoint_every == 0 and step < total_steps:
                ckpt.save(step, state, data_iter)
            if stop["signal"] is not None:
                log(f"signal {stop['signal']}: saving step {step} and stopping")
                ckpt.save(step, state, data_iter, force=True)
                ckpt.close()
                writer.close()
                sys.exit(128 + stop["signal"])
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter, force=True)
        ckpt.wait()
        log(f"trained {step - start} steps in {time.time() - t_start:.1f}s; checkpoint at step "
            f"{step} in {workdir / 'checkpoints'}")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        writer.close()

    results = None
    if cfg.train.eval_at_end:
        results = evaluate.evaluate(model, state["params"], data, cfg, workdir, log)
        if is_main:
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
                        + "\n")
    ckpt.close()
    return results


def cli_main(evaluate_only: bool = False):
    """absl main for ``fine_jax.train`` and ``fine_jax.evaluate``: known errors are one message."""

    def main(argv):
        del argv
        from absl import flags
        from absl import logging as absl_logging

        # orbax logs every checkpoint phase at INFO; keep the console to the training progress.
        absl_logging.set_verbosity(absl_logging.WARNING)
        FLAGS = flags.FLAGS
        try:
            run(FLAGS.config, FLAGS.workdir, evaluate_only=evaluate_only)
        except datasets.DatasetMissing as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except config_lib.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)

    return main


def define_flags(workdir_help: str) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.")
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    define_flags("Directory for checkpoints, metrics and results.")
    app.run(cli_main())
