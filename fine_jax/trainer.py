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
weights checkpoint), ``eval_results.json`` (the latest and the best evaluation), ``.lock`` (the run
that holds the workdir) and, after a fault, ``background_errors.log``. How signals, kills,
non-finite steps, a locked or unwritable workdir and a changed config end is ``fine_jax.faults``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from fine_jax import allocator, xla_cpu
from fine_jax import config as config_lib
from fine_jax import faults
from fine_jax import flops as flops_lib
from fine_jax import objectives, parallel, stages, vit_pretrain
from fine_jax.checkpoint import BEST_DIR, Checkpointer, best_info, save_weights
from fine_jax.checkpoint import CheckpointWriteError, close_all, complete_steps
from fine_jax.data import pipeline
from fine_jax.eval.results import write_results
from fine_jax.interop import initialize
from fine_jax.models.fine import FashionFINE, matmul_precision_scope
from fine_jax.optim import make_optimizer
from fine_jax.stages.common import create_state


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Metric writers
# ----------------------------------------------------------------------------------------------
class MetricWriter:
    """JSONL (one object per logged step) and TensorBoard scalars, process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, resume_step: int | None = None):
        """``resume_step``: the step the run starts from. Rows past it (written after that
        checkpoint by a run that was killed) are dropped from metrics.jsonl and hidden from
        TensorBoard, so that both read as one curve."""
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        if resume_step is not None:
            dropped = faults.truncate_metrics(workdir / "metrics.jsonl", resume_step)
            if dropped:
                log(f"metrics.jsonl: dropped {dropped} rows past step {resume_step}, the step this "
                    "run continues from")
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(workdir / "tb"), purge_step=purge)

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
        if self.enabled and not self.jsonl.closed:
            self.jsonl.close()
            self.tb.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def format_line(step: int, total: int, metrics: dict, terms, ex_per_s: float, eta: float) -> str:
    losses = " ".join(f"{k[5:] if k.startswith('loss_') else k} {metrics[k]:.4f}" for k in terms)
    speed = f"{ex_per_s:.1f} pairs/s"
    if "mfu" in metrics:
        speed += f" | MFU {100 * metrics['mfu']:.1f}%"
    if "input_wait_frac" in metrics:
        speed += f" | input wait {100 * metrics['input_wait_frac']:.0f}%"
    return (f"step {step}/{total} | {losses} | lr {metrics.get('lr', 0):.2e} "
            f"temp {metrics['temp']:.4f} alpha {metrics['alpha']:.3f} | {speed} | "
            f"ETA {format_eta(eta)}")


def throughput_metrics(steps: int, seconds: float, input_wait: float, batch: int,
                       flops_per_step: float, peak_flops: float) -> dict:
    """Speed figures of a logging window: ``steps`` steps in ``seconds`` of wall time, of which
    ``input_wait`` seconds the loop spent waiting for the next batch (data pipeline and host-to-
    device transfer). MFU is the model FLOPs (fine_jax.flops) over ``peak_flops``, the peak of
    all the devices together."""
    if steps <= 0 or seconds <= 0:
        return {}
    step_s = seconds / steps
    return {"pairs_per_s": steps * batch / seconds, "step_s": step_s,
            "input_wait_s": input_wait / steps, "input_wait_frac": min(1.0, input_wait / seconds),
            "mfu": flops_lib.mfu(flops_per_step, step_s, 1, peak_flops)}


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
            # Every process takes part in gathering the shards; process 0 writes.
            weights = parallel.fetch({k: state[k] for k in ("params", "momentum", "queues")})
            if self.is_main:
                info = {**self.best, "config": self.cfg.to_dict(),
                        "source": {"workdir": str(self.workdir), "step": step}}
                try:
                    save_weights(self.workdir / BEST_DIR, weights, json.loads(json.dumps(info)),
                                 overwrite=True)
                except OSError as e:
                    raise CheckpointWriteError(
                        f"could not write the best checkpoint (step {step}) to "
                        f"{self.workdir / BEST_DIR}: {e.strerror or e}; the previous one is kept"
                    ) from e
        if self.is_main:
            write_results(self.workdir / "eval_results.json",
                          {"criterion": criterion, "latest": self.latest, "best": self.best})
        return results


# ----------------------------------------------------------------------------------------------
# Resume checks
# ----------------------------------------------------------------------------------------------
def all_finite(tree) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (a scalar bool array)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def check_resume_config(cfg, workdir: pathlib.Path) -> None:
    """Refuses to resume a workdir whose ``config.json`` differs from ``cfg`` in what shapes the
    train state or the data order (``config_lib.RESUME_KEYS``), unless
    ``train.allow_config_change``; a workdir without a complete checkpoint is not compared."""
    saved = workdir / "config.json"
    if not complete_steps(workdir / "checkpoints") or not saved.is_file():
        return
    try:
        old = json.loads(saved.read_text())
    except ValueError:
        return  # a config.json cut short: nothing to compare with
    changes = config_lib.resume_changes(old, cfg)
    if not changes:
        return
    listing = ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
    if not cfg.train.allow_config_change:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with another configuration: {listing}. Resuming it would "
            "change the train state or the data order; use a new --workdir, or pass "
            "--config.train.allow_config_change=True to resume it anyway")
    log(f"resuming {workdir} with a changed configuration (train.allow_config_change): {listing}")


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def enable_compilation_cache(folder: str) -> str | None:
    """XLA's persistent compilation cache in ``folder`` (``train.compilation_cache``); returns the
    folder in use, or None.

    Nothing changes when the folder is empty, when a cache is configured already, or in a
    multi-process job: there JAX writes the cache from process 0 only, so on a restart process 0
    would load a step while the others compile it, and wait for them at the first collective.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not folder or jax.process_count() > 1:
        return None
    path = pathlib.Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"compilation cache off: cannot create {path} ({e.strerror})")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    log(f"XLA compilation cache: {path} (train.compilation_cache)")
    return str(path)


def run(cfg, workdir: str) -> dict | None:
    """Trains ``cfg.stage`` in ``workdir``; returns the last evaluation's results (or None).

    Before anything in the workdir is touched, process 0 locks it (``WORKDIR/.lock``) and every
    process checks that it can write there. From then on SIGTERM and SIGINT stop the job at the
    next step boundary, after saving that step (``faults.Interrupted``, exit status 128 + signum);
    on any other way out the checkpoint writes in flight are waited for.
    """
    stage = stages.get(cfg.stage)
    remote = faults.is_remote(workdir)
    if remote:  # pathlib would quietly turn gs://b/run into a local folder named gs:
        raise config_lib.ConfigError(
            f"--workdir={workdir}: the workdir must be a file-system path that every process "
            "sees (a shared file system, or the bucket mounted with gcsfuse; "
            "launch/tpu_vm.py --gcsfuse=BUCKET:/mnt/BUCKET mounts it on every TPU worker)")
    workdir = pathlib.Path(workdir).expanduser().absolute()
    for note in config_lib.resolve_platform_defaults(cfg):
        log(note)
    config_lib.validate(cfg, num_devices=jax.device_count())  # before any data is touched
    if jax.devices()[0].platform == "cpu":
        xla_cpu.unroll_threefry_on_cpu()  # a bad FINE_JAX_THREEFRY stops here, before any work
    enable_compilation_cache(cfg.train.compilation_cache)
    is_main = jax.process_index() == 0
    lock = None
    if not remote:
        faults.make_workdir(workdir)
        if is_main:
            lock = faults.WorkdirLock(workdir).acquire()
        try:
            faults.check_writable(workdir, workdir / "checkpoints")
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def abort_note() -> str:
        steps = complete_steps(workdir / "checkpoints")
        return (f"a restart with the same --workdir resumes from step {steps[-1]}, the last "
                "complete checkpoint" if steps else "no checkpoint was completed") + \
            "; an incomplete one is discarded"

    stop = faults.StopSignals(abort_note).install()
    errors_log = workdir / faults.BACKGROUND_LOG if is_main and not remote else None
    try:
        # Every step and evaluation of the job is traced at the config's float32 precision.
        with faults.quiet_background_errors(errors_log), \
                matmul_precision_scope(config_lib.model_config(cfg)):
            return _train(cfg, workdir, stage, is_main, stop)
    finally:
        close_all()  # no checkpoint write is left running, however the job ends
        stop.restore()
        if lock is not None:
            lock.release()


def _train(cfg, workdir: pathlib.Path, stage, is_main: bool, stop: faults.StopSignals):
    # --- data -------------------------------------------------------------------------------
    data = stage.training_data(cfg)
    if cfg.model.vocab_size in (0, -1, None):
        cfg.model.vocab_size = data.vocab_size  # sized from the dataset's own vocab
    elif cfg.model.vocab_size != data.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the dataset's vocab has "
            f"{data.vocab_size} entries; set --config.model.vocab_size={data.vocab_size}")
    config_lib.validate(cfg, num_devices=jax.device_count(), num_train_records=data.num_items)
    mesh = parallel.mesh_from_config(cfg)
    check_resume_config(cfg, workdir)
    if stop.signum is not None:
        log(f"{faults.signal_name(stop.signum)} before training started: stopping; nothing new "
            "was saved")
        raise faults.Interrupted(stop.signum)
    if is_main:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))

    bg = cfg.train.global_batch_size
    per_process = data.num_items // jax.process_count() * jax.process_count()
    spe = pipeline.steps_per_epoch(per_process, bg)
    total_steps = cfg.optim.epochs * spe if cfg.train.max_steps < 0 else cfg.train.max_steps
    log(f"fine_jax {stage.name} | devices: {jax.device_count()} x {jax.devices()[0].platform} | "
        f"{data.description} | global batch {bg} | {spe} steps/epoch | {total_steps} steps")
    log(f"host allocator: {allocator.active()} ({allocator.ENV})")
    if jax.devices()[0].platform == "cpu" and xla_cpu.unroll_threefry_on_cpu():
        log("random bits: threefry lowered without its loop (fine_jax.xla_cpu)")

    # --- model, optimiser, state ------------------------------------------------------------
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    if loss_cfg.mlm_overflow == "host" and jax.process_count() > 1:
        log("loss.mlm_overflow=host runs in one process only (the processes would have to agree on "
            "the step of every batch): the step catches an overflowing MLM batch itself")
        loss_cfg = dataclasses.replace(loss_cfg, mlm_overflow="step")
    optimizer, schedule = make_optimizer(cfg.optim, spe)
    make_queues = stage.make_queues(loss_cfg, cfg.model.embed_dim)
    # The state is born sharded (FSDP over the mesh): its shapes come from jax.eval_shape, and a
    # resume restores straight into the sharded target without building a state first.
    init, abstract_state = parallel.sharded_init(
        lambda r: create_state(model, optimizer, r, make_queues), mesh, cfg.parallel.fsdp_min_size,
        jax.random.PRNGKey(cfg.train.seed))
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_state)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(abstract_state["params"]))
    log(f"model ({model.config.variant}): {n_params / 1e6:.2f}M parameters; mesh "
        f"{dict(mesh.shape)}; {parallel.describe_shardings(abstract_state)}; loss per "
        + ("device (reference semantics)" if cfg.parallel.batch_semantics == "per_group"
           else "global batch"))

    step_flops = flops_lib.step_flops(cfg)
    peak_per_device, peak_source = flops_lib.device_peak_flops(
        jax.devices()[0], cfg.model.dtype, cfg.model.matmul_precision)
    peak_flops = peak_per_device * jax.device_count()
    log(f"model FLOPs: {flops_lib.summary(step_flops)}; peak {peak_per_device / 1e12:.3g} "
        f"TFLOP/s per device ({peak_source})")

    data_iter = iter(data.stream(cfg.train.seed, jax.process_index(), jax.process_count()))
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, abstract_state, data_iter)
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        state = init(jax.random.PRNGKey(cfg.train.seed))
        if initialize.requested(cfg):  # from a stage-1 run, converted or public weights
            state = jax.device_put(initialize.initialise(cfg, state, log), shardings)
        if cfg.init.vit_pretrain_steps:
            state, _ = vit_pretrain.pretrain_vit(cfg, model, state, data.vit_source, log, mesh)
            state = jax.device_put(state, shardings)
            ckpt.save(0, state, data_iter, force=True)  # a restart resumes after the warm-start
    start = int(start or 0)

    # --- train loop -------------------------------------------------------------------------
    groups = parallel.groups_from_config(cfg, mesh)
    repl = parallel.replicated(mesh)
    batch_shard = parallel.batch_sharding(mesh)

    def jit_step(loss_cfg):
        step_fn = stage.make_step(model, optimizer, loss_cfg, spe, schedule,
                                  total_steps=total_steps, deterministic=cfg.train.deterministic,
                                  groups=groups)
        return jax.jit(step_fn, in_shardings=(shardings, batch_shard, repl),
                       out_shardings=(shardings, repl), donate_argnums=0)

    jstep = jit_step(loss_cfg)
    # loss.mlm_overflow=host: the step above holds the gathered MLM head only; a batch with more
    # targets than its buffer (in any group) runs this every-position step instead.
    mlm_on_host = (cfg.stage == "pretrain" and loss_cfg.mlm_gather
                   and loss_cfg.mlm_overflow == "host")
    mlm_group = bg // groups.count
    full_mlm_step = None
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    selection = Selection(cfg, workdir, stage, writer, is_main)
    every = cfg.eval.every_epochs
    guard = faults.NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, log)
    params_finite = jax.jit(all_finite)
    # (step, device metrics) of the steps whose non-finite flag is not read yet. A step's flag is
    # read once the next step is dispatched (no wait for the device), and always before a save.
    unchecked: list[tuple[int, dict]] = []

    def stop_nonfinite(reason: str):
        ckpt.wait()
        last = ckpt.last_complete()
        where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
                 else f"there is no checkpoint in {ckpt.directory} yet")
        raise faults.NonFiniteError(
            f"{reason}; the update was not applied and nothing after it was saved; {where}. "
            f"Lower --config.optim.lr (now {cfg.optim.lr:g}) or check the data; "
            "--config.train.on_nonfinite=skip skips such steps instead")

    def check_finite(upto: int) -> None:
        while unchecked and unchecked[0][0] <= upto:
            s, m = unchecked.pop(0)
            host = jax.device_get({k: m[k] for k in ("loss", "nonfinite") if k in m})
            reason = guard.observe(s, *faults.nonfinite_flag(host))
            if reason is not None:
                stop_nonfinite(reason)

    def save(step: int, force: bool = False) -> bool:
        """Saves ``step`` unless it is saved already; never a state with non-finite values."""
        check_finite(step)
        if ckpt.has(step):
            return False
        if not bool(params_finite(state["params"])):
            stop_nonfinite(f"the parameters are not finite at step {step}")
        return ckpt.save(step, state, data_iter, force=force)

    def agreed_signal(step: int) -> int | None:
        """The stop request all processes act on at this step boundary. With several processes
        they vote at the logging steps (all at the same steps), so that all save the same step:
        a signal that reached only some of them still stops every one."""
        if jax.process_count() == 1:
            return stop.signum
        if step % cfg.train.log_every and step < total_steps:
            return None
        from jax.experimental import multihost_utils

        votes = multihost_utils.process_allgather(np.int32(stop.signum or 0))
        return int(np.max(votes)) or None

    def stop_on_signal(step: int, signum: int):
        name = faults.signal_name(signum)
        if step == start and not ckpt.has(step):
            log(f"{name}: stopping before the first step; nothing to save")
        else:
            save(step, force=True)
            ckpt.wait()
            log(f"{name}: saved step {step} in {ckpt.directory}; stopping (exit status "
                f"{128 + signum}). Rerun with the same --workdir to continue from there")
        raise faults.Interrupted(signum)

    t_last, n_last, input_wait = time.time(), start, 0.0
    t_start = time.time()
    step = start
    results = None
    evaluated_at = None
    bad_records = 0  # unreadable records the pipeline replaced (this process, this run)
    watchdog = faults.InputWatchdog(cfg.train.input_stall_warning_s, log)
    compiled = None
    try:
        while True:
            signum = agreed_signal(step)
            if signum is not None:  # SIGTERM / SIGINT: save this step, then exit
                stop_on_signal(step, signum)
            if step >= total_steps:
                break
            t_wait = time.perf_counter()
            watchdog.waiting(step)
            host_batch = next(data_iter)
            watchdog.got()
            bad_records += int(np.sum(host_batch.pop(pipeline.BAD_KEY, 0)))
            batch = parallel.global_batch(host_batch, mesh)
            input_wait += time.perf_counter() - t_wait
            rng = jax.random.fold_in(base_rng, step)
            labels = host_batch.get("mask_labels") if mlm_on_host else None
            if labels is not None and not objectives.mlm_batch_fits(
                    labels, mlm_group, objectives.mlm_buffer_rows(
                        mlm_group, labels.shape[1], loss_cfg.mlm_max_fraction)):
                if full_mlm_step is None:
                    log(f"step {step}: a batch with more MLM targets than the gathered buffer "
                        f"holds (loss.mlm_max_fraction={loss_cfg.mlm_max_fraction} of each "
                        f"group's {mlm_group} x {labels.shape[1]} positions); such batches run "
                        "the every-position MLM step (compiling it now)")
                    full_mlm_step = jit_step(dataclasses.replace(loss_cfg, mlm_gather=False))
                state, metrics = full_mlm_step(state, batch, rng)
            else:
                if compiled is None:
                    # Compiled ahead of the first call, so that the compiler's freed memory goes
                    # back to the system before the step's buffers are allocated (a lower peak).
                    compiled = jstep.lower(state, batch, rng).compile()
                    allocator.release_free_memory()
                try:
                    state, metrics = compiled(state, batch, rng)
                except (TypeError, ValueError) as e:  # another shape or sharding than compiled
                    log(f"step {step}: the step's arguments differ from the compiled ones "
                        f"({str(e).splitlines()[0][:160]}); compiling again")
                    compiled = jstep
                    state, metrics = jstep(state, batch, rng)
            step += 1
            unchecked.append((step, metrics))
            check_finite(step - 1)
            if step == start + 1:
                jax.block_until_ready(metrics)
                log(f"first step (with compilation) took {time.time() - t_start:.1f}s")
                t_last, n_last, input_wait = time.time(), step, 0.0
            if step % cfg.train.log_every == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                rate = (step - n_last) * bg / max(now - t_last, 1e-9) if step > n_last else 0.0
                eta = (total_steps - step) * bg / rate if rate > 0 else 0.0
                metrics.update(examples_per_s=rate, epoch=step / spe, bad_records=bad_records)
                metrics.update(throughput_metrics(step - n_last, now - t_last, input_wait, bg,
                                                  step_flops.total, peak_flops))
                writer.write(step, metrics)
                log(format_line(step, total_steps, metrics, stage.log_terms, rate, eta) +
                    (f" | {bad_records} unreadable records replaced" if bad_records else ""))
                check_finite(step)
                ckpt.poll()  # a failed background write ends the run here, not at the next save
                t_last, n_last, input_wait = now, step, 0.0
            if every and step % (every * spe) == 0 and step < total_steps:
                save(step, force=True)
                results = selection(model, state, mesh, step, step / spe)
                evaluated_at = step
                # the rate excludes the evaluation
                t_last, n_last, input_wait = time.time(), step, 0.0
            elif step % cfg.train.checkpoint_every == 0 and step < total_steps:
                save(step)
        save(step, force=True)
        watchdog.close()
        ckpt.wait()
        log(f"trained {step - start} steps in {time.time() - t_start:.1f}s; checkpoint at step "
            f"{step} in {workdir / 'checkpoints'}")
        if cfg.eval.at_end and evaluated_at != step:
            signum = agreed_signal(step)
            if signum is not None:  # stopped after the last step: the rerun evaluates
                log(f"{faults.signal_name(signum)}: stopping before the final evaluation; rerun "
                    f"with the same --workdir to evaluate step {step}")
                raise faults.Interrupted(signum)
            results = selection(model, state, mesh, step, step / spe)
    except BaseException:
        watchdog.close()
        writer.close()
        try:  # wait for the write in flight; the error that ends the run is the one raised
            ckpt.close()
        except Exception:  # noqa: BLE001
            pass
        raise
    writer.close()
    ckpt.close()
    if selection.best is not None:
        log(f"best: {selection.best['criterion']} = {selection.best['value']:.2f} at step "
            f"{selection.best['step']} ({workdir / BEST_DIR})")
    return results
