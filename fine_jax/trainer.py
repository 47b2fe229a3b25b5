"""The training loop shared by the three stages.

``run(cfg, workdir)`` trains the stage named by ``cfg.stage`` (``fine_jax.stages``): it resolves the
stage's training data, builds the model variant, optimiser and state, resumes from the workdir's
latest checkpoint or initialises (``init.*``), runs the jitted step, evaluates every
``eval.every_epochs`` epochs and at the end with the stage's evaluator, and keeps the best
evaluated step in ``WORKDIR/best`` by the stage's criterion (FashionGen: the full-protocol sum of
the six recalls; FashionIQ: the sum over the three categories of R@10 + R@50), as the reference
selects ``checkpoint_best.pth``.

The workdir holds ``config.json``, ``metrics.jsonl`` (training and ``eval/*`` rows), ``tb/``
(TensorBoard), ``checkpoints/<step>/`` (orbax: state and data-iterator position), ``best/`` (a
weights checkpoint) and ``eval_results.json`` (the latest and the best evaluation).
"""
from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np

from fine_jax import config as config_lib
from fine_jax import parallel, stages, vit_pretrain
from fine_jax.checkpoint import (BEST_DIR, Checkpointer, abstract_like, best_info,
                                 save_weights)
from fine_jax.data import pipeline
from fine_jax.eval.results import write_results
from fine_jax.interop import initialize
from fine_jax.models.fine import FashionFINE
from fine_jax.optim import make_optimizer
from fine_jax.stages.common import create_state


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
            if isinstance(v, (int, float)) and math.isfinite(v):
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


def format_line(step: int, total: int, metrics: dict, terms, ex_per_s: float, eta: float) -> str:
    losses = " ".join(f"{k[5:] if k.startswith('loss_') else k} {metrics[k]:.4f}" for k in terms)
    return (f"step {step}/{total} | {losses} | lr {metrics.get('lr', 0):.2e} "
            f"temp {metrics['temp']:.4f} alpha {metrics['alpha']:.3f} | {ex_per_s:.1f} ex/s | "
            f"ETA {format_eta(eta)}")


# ----------------------------------------------------------------------------------------------
# Evaluation and model selection
# ----------------------------------------------------------------------------------------------
class Selection:
    """Evaluates, logs, and keeps the best evaluated step in ``WORKDIR/best``."""

    def __init__(self, cfg, workdir: pathlib.Path, stage, writer: MetricWriter, is_main: bool):
        self.cfg, self.workdir, self.stage, self.writer = cfg, workdir, stage, writer
        self.is_main = is_main
        self._evaluator = None
        best = best_info(workdir)
        self.best = best  # {"step", "criterion", "value", "results"} or None
        self.latest = None

    @property
    def evaluator(self):
        if self._evaluator is None:  # resolved on first use: a run without evaluation skips it
            self._evaluator = self.stage.evaluator(self.cfg)
        return self._evaluator

    def __call__(self, model, state, mesh, step: int, epoch: float) -> dict:
        t0 = time.time()
        log(f"evaluating step {step} (epoch {epoch:g}) ...")
        results = self.evaluator(model, state["params"], mesh, self.workdir, log)
        criterion = self.evaluator.criterion
        value = float(results[criterion])
        self.latest = {"step": step, "epoch": epoch, "criterion": criterion, "value": value,
                       "results": results}
        is_best = self.best is None or value > self.best["value"]
        log(self.evaluator.report(results))
        log(f"{criterion} = {value:.2f} at step {step}" + (
            " (best so far)" if is_best else f" (best {self.best['value']:.2f} at step "
                                             f"{self.best['step']})")
            + f"; evaluation took {time.time() - t0:.1f}s")
        self.writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        if is_best:
            self.best = dict(self.latest)
            if self.is_main:
                weights = jax.device_get({k: state[k] for k in ("params", "momentum", "queues")})
                info = {**self.best, "config": self.cfg.to_dict(),
                        "source": {"workdir": str(self.workdir), "step": step}}
                save_weights(self.workdir / BEST_DIR, weights, json.loads(json.dumps(info)),
                             overwrite=True)
        if self.is_main:
            write_results(self.workdir / "eval_results.json",
                          {"criterion": criterion, "latest": self.latest, "best": self.best})
        return results


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def run(cfg, workdir: str) -> dict | None:
    """Trains ``cfg.stage`` in ``workdir``; returns the last evaluation's results (or None)."""
    stage = stages.get(cfg.stage)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    config_lib.validate(cfg, num_devices=jax.device_count())  # before any data is touched
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    # --- data -------------------------------------------------------------------------------
    data = stage.training_data(cfg)
    if cfg.model.vocab_size in (0, -1, None):
        cfg.model.vocab_size = data.vocab_size  # sized from the dataset's own vocab
    elif cfg.model.vocab_size != data.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the dataset's vocab has "
            f"{data.vocab_size} entries; set --config.model.vocab_size={data.vocab_size}")
    config_lib.validate(cfg, num_devices=jax.device_count(), num_train_records=data.num_items)
    mesh = parallel.make_mesh()
    if is_main:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))

    bg = cfg.train.global_batch_size
    per_process = data.num_items // jax.process_count() * jax.process_count()
    spe = pipeline.steps_per_epoch(per_process, bg)
    total_steps = cfg.optim.epochs * spe if cfg.train.max_steps < 0 else cfg.train.max_steps
    log(f"fine_jax {stage.name} | devices: {jax.device_count()} x {jax.devices()[0].platform} | "
        f"{data.description} | global batch {bg} | {spe} steps/epoch | {total_steps} steps")

    # --- model, optimiser, state ------------------------------------------------------------
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer, schedule = make_optimizer(cfg.optim, spe)
    repl = parallel.replicated(mesh)
    make_queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    init = jax.jit(lambda r: create_state(model, optimizer, r, make_queues), out_shardings=repl)
    state = init(jax.random.PRNGKey(cfg.train.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    log(f"model ({model.config.variant}): {n_params / 1e6:.2f}M parameters")

    data_iter = iter(data.stream(cfg.train.seed, jax.process_index(), jax.process_count()))
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, abstract_like(state), data_iter)
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        if initialize.requested(cfg):  # from a stage-1 run, converted or public weights
            state = jax.device_put(initialize.initialise(cfg, state, log), repl)
        if cfg.init.vit_pretrain_steps:
            state, _ = vit_pretrain.pretrain_vit(cfg, model, state, data.vit_source, log)
            state = jax.device_put(state, repl)
            ckpt.save(0, state, data_iter, force=True)  # a restart resumes after the warm-start
    start = int(start or 0)

    # --- train loop -------------------------------------------------------------------------
    step_fn = stage.make_step(model, optimizer, loss_cfg, spe, schedule, total_steps=total_steps,
                              deterministic=cfg.train.deterministic)
    batch_shard = parallel.batch_sharding(mesh)
    jstep = jax.jit(step_fn, in_shardings=(repl, batch_shard, repl), out_shardings=(repl, repl),
                    donate_argnums=0)
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    writer = MetricWriter(workdir, enabled=is_main)
    selection = Selection(cfg, workdir, stage, writer, is_main)
    every = cfg.eval.every_epochs

    stop = {"signal": None}

    def on_signal(signum, _frame):  # preemption: save at the next step boundary, then exit
        stop["signal"] = signum

    old_handler = signal.signal(signal.SIGTERM, on_signal)
    t_last, n_last = time.time(), start
    t_start = time.time()
    step = start
    results = None
    evaluated_at = None
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
                log(format_line(step, total_steps, metrics, stage.log_terms, rate, eta) +
                    (f" | {bad_records} unreadable records replaced" if bad_records else ""))
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; the last "
                                             "good checkpoint is kept in "
                                             f"{workdir / 'checkpoints'}")
                t_last, n_last = now, step
            if every and step % (every * spe) == 0 and step < total_steps:
                ckpt.save(step, state, data_iter, force=True)
                results = selection(model, state, mesh, step, step / spe)
                evaluated_at = step
                t_last, n_last = time.time(), step  # the rate excludes the evaluation
            elif step % cfg.train.checkpoint_every == 0 and step < total_steps:
                ckpt.save(step, state, data_iter)
            if stop["signal"] is not None:
                log(f"signal {stop['signal']}: saving step {step} and stopping")
                if ckpt.latest_step() != step:
                    ckpt.save(step, state, data_iter, force=True)
                ckpt.close()
                writer.close()
                sys.exit(128 + stop["signal"])
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter, force=True)
        ckpt.wait()
        log(f"trained {step - start} steps in {time.time() - t_start:.1f}s; checkpoint at step "
            f"{step} in {workdir / 'checkpoints'}")
        if cfg.eval.at_end and evaluated_at != step:
            results = selection(model, state, mesh, step, step / spe)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        writer.close()
        ckpt.close()
    if selection.best is not None:
        log(f"best: {selection.best['criterion']} = {selection.best['value']:.2f} at step "
            f"{selection.best['step']} ({workdir / BEST_DIR})")
    return results
