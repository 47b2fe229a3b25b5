"""Faults of a training job, in real processes with real signals: every restart continues exactly
where the job stopped, and no fault ends in a traceback or loses a checkpoint.

SIGTERM / SIGINT at any step (a checkpoint step included, a second Ctrl-C while saving, during the
ViT warm-start), SIGKILL (during a save too), a diverging run, a second run in the same workdir, a
changed config on resume, an unwritable checkpoint folder and a full disk. Each job is
``python -m fine_jax.train`` on the embedded synthetic set at a tiny size; one uninterrupted run
(the module's ``reference``) is the curve every interrupted one must reproduce bit for bit.

Run them alone with ``python -m pytest -q tests/test_resume.py`` (or ``-m fault_tolerance``).
"""
import itertools
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax import faults
from fine_jax.checkpoint import Checkpointer, complete_steps, read_weights

pytestmark = pytest.mark.fault_tolerance

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8  # 80 training images / batch 8: 10 steps per epoch, so no epoch boundary
TINY = {
    "data.synthetic_train_products": 40, "data.synthetic_eval_products": 20,
    "data.synthetic_views": 2, "data.max_len": 40,
    "model.vision_width": 32, "model.hidden_size": 32, "model.intermediate_size": 64,
    "model.vision_heads": 2, "model.num_heads": 2, "model.embed_dim": 32, "model.vision_depth": 1,
    "model.num_layers": 2, "model.fusion_layer": 1, "model.patch_size": 16,
    "train.global_batch_size": 8, "loss.queue_size": 32, "train.max_steps": STEPS,
    "train.log_every": 1, "train.checkpoint_every": 3, "train.keep_checkpoints": 10,
    "init.vit_pretrain_steps": 0, "init.vit": "", "eval.every_epochs": 0, "eval.at_end": False,
}
_counter = itertools.count()
# The job under a file-size limit: writes past it fail with EFBIG, as writes to a full disk fail
# with ENOSPC (SIGXFSZ, which would kill the process instead, is ignored).
FILE_SIZE_LIMIT = """
import resource, runpy, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0}))
runpy.run_module("fine_jax.train", run_name="__main__", alter_sys=True)
"""
# The job with an input pipeline that gives nothing for 2.5 s before its fourth batch (the
# iterator's own class is patched: the checkpoint saves the pipeline's state through it).
STALLED_PIPELINE = """
import builtins, runpy, time
import fine_jax.trainer

def stalling_iter(x):
    it = builtins.iter(x)
    next_batch, calls = type(it).__next__, []
    def stalled(self):
        calls.append(1)
        if len(calls) == 4:
            time.sleep(2.5)
        return next_batch(self)
    type(it).__next__ = stalled
    return it

fine_jax.trainer.iter = stalling_iter
runpy.run_module("fine_jax.train", run_name="__main__", alter_sys=True)
"""


class Job:
    """``python -m fine_jax.train`` on the tiny config in ``workdir``, stdout/stderr to files."""

    def __init__(self, workdir, data_dir, max_file_size=None, quick_compile=False, script=None,
                 **overrides):
        """``quick_compile``: XLA's CPU backend without optimisation, for a job whose program no
        other job compiles and whose numbers no other job must match (it compiles in half the
        time)."""
        self.workdir = pathlib.Path(workdir)
        values = dict(TINY, **{k.replace("__", "."): v for k, v in overrides.items()})
        logs = f"{self.workdir.name}.job{next(_counter)}"
        self.out_path = self.workdir.parent / f"{logs}.out"
        self.err_path = self.workdir.parent / f"{logs}.err"
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if quick_compile:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_backend_optimization_level=0").strip()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            launch = ["-m", "fine_jax.train"] if max_file_size is None else \
                ["-c", FILE_SIZE_LIMIT.format(max_file_size)]
            if script is not None:  # the job run by a script that changes one of its parts
                launch = ["-c", script]
            self.proc = subprocess.Popen(
                [sys.executable, *launch, "--config=configs/demo.py", f"--workdir={workdir}",
                 f"--config.data.data_dir={data_dir}",
                 *(f"--config.{k}={v}" for k, v in values.items())],
                cwd=REPO, env=env, stdout=out, stderr=err)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_until(self, condition, what: str, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (status {self.proc.returncode}) before {what}:\n"
                            f"{self.out[-3000:]}\n{self.err[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.003)

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def finish(self, timeout: float = 180.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def rows(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


WALL_CLOCK = ("examples_per_s", "pairs_per_s", "step_s", "input_wait_s", "input_wait_frac", "mfu")


def curve(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock columns: what must match bit for bit."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows(workdir)]


def has_step_entry(workdir, step: int):
    """The checkpoint directory of ``step`` exists, complete or still being written."""
    def check():
        folder = pathlib.Path(workdir) / "checkpoints"
        return folder.is_dir() and any(p.name == str(step) or p.name.startswith(f"{step}.")
                                       for p in folder.iterdir())
    return check


def params(workdir, step: int) -> list[np.ndarray]:
    weights, _ = read_weights(workdir, parts=("params",), step=step)
    return [np.asarray(x) for x in _leaves(weights["params"])]


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def assert_clean_exit(job: Job, status: int) -> None:
    rc = job.finish()
    assert rc == status, f"status {rc}, wanted {status}:\n{job.out[-3000:]}\n{job.err[-3000:]}"
    assert "Traceback" not in job.out + job.err, job.err[-5000:]


def one_line(text: str, needle: str) -> str:
    found = [line for line in text.splitlines() if needle in line]
    assert len(found) == 1, f"{needle!r} on {len(found)} lines:\n{text[-3000:]}"
    return found[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run, a checkpoint at every step."""
    workdir = tmp_path_factory.mktemp("reference") / "wd"
    job = Job(workdir, data_dir, train__checkpoint_every=1)
    assert_clean_exit(job, 0)
    assert [r["step"] for r in rows(workdir)] == list(range(1, STEPS + 1))
    assert complete_steps(workdir / "checkpoints") == list(range(1, STEPS + 1))
    return workdir


# ----------------------------------------------------------------------------------------------
# Signals and kills: the resumed curve is the uninterrupted one, bit for bit
# ----------------------------------------------------------------------------------------------
def test_sigterm_then_restart_matches_the_uninterrupted_run(reference, data_dir, tmp_path):
    workdir = tmp_path / "wd"
    job = Job(workdir, data_dir)
    job.wait_until(lambda: len(rows(workdir)) >= 4, "step 4")  # past the checkpoint at step 3
    job.signal(signal.SIGTERM)
    assert_clean_exit(job, 128 + signal.SIGTERM)
    line = one_line(job.out, "SIGTERM")
    stopped = int(line.split("saved step ")[1].split()[0])
    assert stopped >= 4 and "Rerun with the same --workdir" in line, line
    assert complete_steps(workdir / "checkpoints")[-1] == stopped
    assert [r["step"] for r in rows(workdir)] == list(range(1, stopped + 1))

    again = Job(workdir, data_dir)
    assert_clean_exit(again, 0)
    assert f"at step {stopped}" in one_line(again.out, "resumed from")
    assert curve(workdir) == curve(reference)


def test_sigint_at_a_checkpoint_step_and_a_second_ctrl_c(reference, data_dir, tmp_path):
    """One SIGINT as step 6's checkpoint is being written (the step is kept, not written twice);
    in another job SIGINT after SIGINT (Ctrl-C held down: the second aborts while the first one's
    save runs, or as the job exits). Neither leaves a traceback or a checkpoint that differs from
    the uninterrupted run's."""
    once, twice = tmp_path / "once", tmp_path / "twice"
    jobs = {once: Job(once, data_dir), twice: Job(twice, data_dir)}  # their start-ups overlap
    waiting = dict(jobs)
    deadline = time.time() + 120
    while waiting and time.time() < deadline:
        for workdir, job in list(waiting.items()):
            if has_step_entry(workdir, 6)() or job.proc.poll() is not None:
                job.signal(signal.SIGINT)
                del waiting[workdir]
        time.sleep(0.003)
    while jobs[twice].proc.poll() is None and time.time() < deadline:
        jobs[twice].signal(signal.SIGINT)
        time.sleep(0.003)
    for workdir, job in jobs.items():
        assert_clean_exit(job, 128 + signal.SIGINT)
        steps = complete_steps(workdir / "checkpoints")
        for step in steps:  # every complete checkpoint is the uninterrupted run's, exactly
            for a, b in zip(params(workdir, step), params(reference, step), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{workdir.name} step {step}")
    line = one_line(jobs[once].out, "SIGINT")
    stopped = int(line.split("saved step ")[1].split()[0])
    assert stopped >= 6 and complete_steps(once / "checkpoints")[-1] == stopped
    # Usually the second SIGINT lands during the first one's save and aborts it; on a slow or
    # loaded machine the save can finish first, and the job then stops as after one SIGINT.
    if "second SIGINT: stopping now" in jobs[twice].err:
        line = one_line(jobs[twice].err, "second SIGINT: stopping now")
        assert "a restart with the same --workdir resumes from step " in line, line
    else:
        one_line(jobs[twice].out, "SIGINT: saved step")
    assert complete_steps(twice / "checkpoints")[0] == 3


LATE_SIGINT = """
import os, signal
from fine_jax import cli, faults

class SigintAtTeardown:  # deleted with the module's globals, after the interpreter's signal reset
    def __del__(self, kill=os.kill, pid=os.getpid(), sigint=signal.SIGINT):
        kill(pid, sigint)  # bound at definition: os itself may be gone by then

_late = SigintAtTeardown()  # an underscore name: cleared in the first pass over the globals

def job():
    stop = faults.StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop request
        raise faults.Interrupted(stop.signum)
    finally:
        stop.restore()

cli.run_main(job)
"""


def test_a_sigint_in_the_last_moments_of_a_stopped_exit_keeps_its_status(tmp_path):
    """Ctrl-C held down while a stopped job exits: a SIGINT after the interpreter has put the
    default handlers back must not kill it by the signal (status -2); it ends with 130."""
    script = tmp_path / "late_sigint.py"
    script.write_text(LATE_SIGINT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 128 + signal.SIGINT, (out.returncode, out.stderr[-2000:])


HELD_CTRL_C = """
import os, signal, threading, time
from fine_jax import faults

def slow_message():  # SIGINTs keep arriving while the abort message is made
    time.sleep(0.5)
    return "a restart resumes from step 3"

stop = faults.StopSignals(slow_message).install()
os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop request

def press():
    while True:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)

threading.Thread(target=press, daemon=True).start()
while True:
    time.sleep(0.01)
"""


def test_ctrl_c_held_down_aborts_once_with_one_message(tmp_path):
    """SIGINT after SIGINT: the second aborts, and the ones that arrive while it writes its message
    neither print it again nor change the exit status."""
    script = tmp_path / "held_ctrl_c.py"
    script.write_text(HELD_CTRL_C)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 128 + signal.SIGINT, (out.returncode, out.stderr[-2000:])
    assert out.stderr.count("second SIGINT: stopping now") == 1, out.stderr[-2000:]
    assert "a restart resumes from step 3" in out.stderr


LATE_THREAD_REPORT = """
import sys, threading
from fine_jax import cli, faults
from fine_jax.config import ConfigError

def job():
    try:
        with faults.quiet_background_errors(sys.argv[1]):
            raise ConfigError("the job's own error")
    finally:  # the error has left the job's context; a library thread reports what it saw
        def report():
            sys.stderr.write("a background writer's late note\\n")
            1 / 0
        thread = threading.Thread(target=report)
        thread.start()
        thread.join()

cli.run_main(job)
"""


def test_a_failing_command_keeps_late_thread_reports_off_the_console(tmp_path):
    """A command that ends with its one error line: what other threads print after the error left
    the job (orbax's threads after a failed restore) goes to the background log, not the console."""
    script, log = tmp_path / "late_report.py", tmp_path / "background_errors.log"
    script.write_text(LATE_THREAD_REPORT)
    out = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["config error: the job's own error"], out.stderr
    text = log.read_text()
    assert "ZeroDivisionError" in text and "late note" in text


def test_sigkill_and_sigkill_during_a_save_restart_from_the_last_complete_checkpoint(
        reference, data_dir, tmp_path):
    workdir = tmp_path / "wd"
    # 1. Killed after its checkpoint at step 5 is complete, with no other one due for a while
    # (max_steps only sets where the run ends): metrics.jsonl holds rows past it.
    job = Job(workdir, data_dir, train__checkpoint_every=5, train__max_steps=40)
    job.wait_until(lambda: complete_steps(workdir / "checkpoints") == [5] and
                   len(rows(workdir)) >= 6, "the checkpoint of step 5 and step 6")
    job.signal(signal.SIGKILL)
    job.finish()
    assert complete_steps(workdir / "checkpoints") == [5]
    assert len(rows(workdir)) > 5

    # 2. Restarted: resumes there, drops the rows past it, and is killed as soon as the
    # directory of step 6's checkpoint appears (while orbax writes it, or just after).
    job = Job(workdir, data_dir, train__checkpoint_every=1)
    job.wait_until(has_step_entry(workdir, 6), "the checkpoint of step 6")
    job.signal(signal.SIGKILL)
    job.finish()
    assert "at step 5" in one_line(job.out, "resumed from")
    assert "dropped" in one_line(job.out, "metrics.jsonl")
    last = complete_steps(workdir / "checkpoints")[-1]
    assert last in (5, 6)

    # 3. Restarted again: from the last complete checkpoint, any half-written one ignored.
    job = Job(workdir, data_dir)
    assert_clean_exit(job, 0)
    assert f"at step {last}" in one_line(job.out, "resumed from")
    assert curve(workdir) == curve(reference)
    assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def test_signal_during_the_vit_warm_start_and_a_second_run_in_the_same_workdir(data_dir,
                                                                               tmp_path):
    workdir = tmp_path / "wd"
    job = Job(workdir, data_dir, quick_compile=True, init__vit_pretrain_steps=3000)
    job.wait_until(lambda: "ViT warm-start 2/3000" in job.out, "the warm-start")
    config_before = (workdir / "config.json").read_text()
    metrics_before = (workdir / "metrics.jsonl").exists()

    # (another log_every: had it written its config.json, the file would differ)
    second = Job(workdir, data_dir, init__vit_pretrain_steps=3000, train__log_every=2)
    assert_clean_exit(second, 2)
    line = second.err.strip().splitlines()[-1]
    assert line.startswith("error:") and "in use by another run" in line, second.err
    assert f"pid {job.proc.pid} on host " in line and "started " in line, line
    assert "fine_jax pretrain" not in second.out  # it stopped before reading anything
    assert (workdir / "config.json").read_text() == config_before
    assert (workdir / "metrics.jsonl").exists() == metrics_before

    assert job.proc.poll() is None
    job.signal(signal.SIGINT)
    assert_clean_exit(job, 128 + signal.SIGINT)
    line = one_line(job.out, "warm-start interrupted")
    assert line.startswith("SIGINT:") and "nothing was saved" in line and "redoes" in line, line
    assert complete_steps(workdir / "checkpoints") == []


# ----------------------------------------------------------------------------------------------
# A diverging run
# ----------------------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_one_line_and_keeps_its_good_checkpoints(data_dir, tmp_path):
    """lr 1e6 (the warm-up's first epoch runs at optim.warmup_lr, then the step blows up): exit
    status 2, one line naming the step and the last good checkpoint; no checkpoint holds a
    non-finite value, and those from before the blow-up are kept."""
    workdir = tmp_path / "wd"
    job = Job(workdir, data_dir, quick_compile=True, optim__lr=1e6, train__max_steps=16,
              train__checkpoint_every=2, train__keep_checkpoints=2)
    assert_clean_exit(job, 2)
    line = job.err.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss/gradient at step "), job.err
    bad = int(line.split("at step ")[1].split()[0])
    assert "the update was not applied" in line and "--config.optim.lr" in line
    good = int(line.split("the last good checkpoint is step ")[1].split()[0])
    steps = complete_steps(workdir / "checkpoints")
    assert steps and steps[-1] == good < bad and len(steps) == 2
    assert f"in {workdir / 'checkpoints'}" in line
    for step in steps:
        for leaf in params(workdir, step):
            assert np.all(np.isfinite(leaf)), f"step {step}"
    logged = {r["step"]: r for r in rows(workdir)}
    assert logged[bad]["nonfinite"] == 1.0 and all(
        logged[s]["nonfinite"] == 0.0 for s in logged if s < bad)


def test_nonfinite_guard_stops_or_skips():
    guard = faults.NonFiniteGuard("stop", 20, log=lambda *_: None)
    assert guard.observe(1, False, 1.0) is None
    assert "step 2" in guard.observe(2, True, float("nan"))

    logged = []
    guard = faults.NonFiniteGuard("skip", 2, log=logged.append)
    assert guard.observe(1, True) is None and guard.observe(2, True) is None
    assert guard.observe(3, False, 1.0) is None  # a finite step resets the count
    assert guard.observe(4, True) is None and guard.observe(5, True) is None
    reason = guard.observe(6, True)
    assert "3 non-finite steps in a row" in reason and "max_nonfinite_skips=2" in reason
    assert len(logged) == 4 and "update skipped" in logged[0]
    assert faults.nonfinite_flag({"loss": float("inf")}) == (True, float("inf"))
    assert faults.nonfinite_flag({"loss": 1.0, "nonfinite": 1.0})[0]
    assert not faults.nonfinite_flag({"loss": 1.0, "nonfinite": 0.0})[0]


# ----------------------------------------------------------------------------------------------
# Resuming with another config
# ----------------------------------------------------------------------------------------------
def test_a_changed_config_is_refused_and_the_override_continues(reference, data_dir, tmp_path):
    def copy(name):
        shutil.copytree(reference, tmp_path / name, ignore=shutil.ignore_patterns(".lock"))
        return tmp_path / name

    wider = Job(copy("wider"), data_dir, model__intermediate_size=128)
    batch = Job(copy("batch"), data_dir, train__global_batch_size=16)
    allowed = Job(copy("allowed"), data_dir, quick_compile=True, train__global_batch_size=16,
                  train__allow_config_change=True, train__max_steps=STEPS + 2)
    shape = Job(copy("shape"), data_dir, model__intermediate_size=128,
                train__allow_config_change=True)
    for job, change in ((wider, "model.intermediate_size 64 -> 128"),
                        (batch, "train.global_batch_size 8 -> 16")):
        assert_clean_exit(job, 2)
        line = job.err.strip().splitlines()[-1]
        assert line.startswith("config error:") and change in line, job.err
        assert "--config.train.allow_config_change=True" in line
        assert "resumed from" not in job.out and "first step" not in job.out
        saved = json.loads((job.workdir / "config.json").read_text())  # not overwritten
        assert saved["model"]["intermediate_size"] == 64 and saved["train"]["global_batch_size"] == 8

    assert_clean_exit(shape, 2)
    line = shape.err.strip().splitlines()[-1]
    assert line.startswith(f"error: could not restore step {STEPS} from "), shape.err
    assert_clean_exit(allowed, 0)
    assert "train.global_batch_size 8 -> 16" in one_line(allowed.out, "changed configuration")
    assert [r["step"] for r in rows(allowed.workdir)] == list(range(1, STEPS + 3))
    assert complete_steps(allowed.workdir / "checkpoints")[-1] == STEPS + 2


def test_resume_keys_are_the_state_and_data_order_ones():
    old = config_lib.tiny_config()
    new = config_lib.tiny_config(hidden_size=32)
    new.train.seed += 1
    new.train.log_every = 7  # neither shapes the state nor orders the data
    new.train.checkpoint_every = 3
    new.optim.lr = 1.0
    new.parallel.fsdp = 2  # a checkpoint restores onto any mesh
    new.parallel.data = 4
    new.data.batch_groups = "twins"  # another data order
    new.optim.lr_scales = "itm_head=2"  # another optimiser state
    changed = [k for k, _, _ in config_lib.resume_changes(json.loads(old.to_json_best_effort()),
                                                          new)]
    assert changed == ["data.batch_groups", "model.hidden_size", "optim.lr_scales", "train.seed"]
    for key, value, message in (("on_nonfinite", "ignore", "use stop or skip"),
                                ("max_nonfinite_skips", -1, "must be >= 0")):
        bad = config_lib.tiny_config()
        bad.train[key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(bad)


# ----------------------------------------------------------------------------------------------
# Unwritable checkpoints
# ----------------------------------------------------------------------------------------------
def test_unwritable_checkpoints_end_with_one_line(reference, data_dir, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoint folder must go")
    full = tmp_path / "full"
    shutil.copytree(reference, full, ignore=shutil.ignore_patterns(".lock"))
    # The limit is below the largest array of the state (the 96 KiB patch embedding): however
    # orbax packs the arrays into data files (fewer and larger, or under load more and smaller),
    # the file that holds that array cannot be written.
    jobs = [Job(blocked, data_dir),
            Job(full, data_dir, max_file_size=64 * 1024, train__max_steps=STEPS + 2,
                train__checkpoint_every=1)]

    assert_clean_exit(jobs[0], 2)
    line = jobs[0].err.strip().splitlines()[-1]
    assert line == (f"error: {blocked / 'checkpoints'} is not a directory; the run writes its "
                    "checkpoints there. Move it away or choose another --workdir"), jobs[0].err
    assert "fine_jax pretrain" not in jobs[0].out

    assert_clean_exit(jobs[1], 2)
    line = jobs[1].err.strip().splitlines()[-1]
    assert line == (f"error: could not write checkpoint step {STEPS + 1} to {full / 'checkpoints'}: "
                    f"File too large (errno 27); the last complete checkpoint is step {STEPS}"), \
        jobs[1].err
    assert complete_steps(full / "checkpoints") == list(range(1, STEPS + 1))  # nothing removed
    for a, b in zip(params(full, STEPS), params(reference, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "File too large" in (full / faults.BACKGROUND_LOG).read_text()  # the details


# ----------------------------------------------------------------------------------------------
# The pieces, in-process
# ----------------------------------------------------------------------------------------------
def test_a_step_saved_twice_is_kept_and_close_is_safe_twice(tmp_path):
    import jax.numpy as jnp

    ckpt = Checkpointer(tmp_path / "checkpoints")
    state = {"w": jnp.arange(1000.0)}
    assert ckpt.save(3, state)
    assert not ckpt.save(3, state, force=True)  # in flight: kept, no StepAlreadyExistsError
    ckpt.wait()
    assert not ckpt.save(3, state, force=True)  # complete: kept
    ckpt.close()
    ckpt.close()
    assert complete_steps(tmp_path / "checkpoints") == [3]


def test_a_failed_write_is_raised_once_and_close_stays_safe(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from fine_jax.checkpoint import CheckpointWriteError

    ckpt = Checkpointer(tmp_path / "checkpoints")
    state = {"w": jnp.arange(1000.0)}
    ckpt.save(2, state)
    ckpt.wait()
    ckpt.save(4, state)
    ckpt.wait()
    real_wait = ckpt.manager.wait_until_finished

    def failing_wait():  # what orbax raises in the main thread after a background failure
        real_wait()
        raise ValueError("OUT_OF_RANGE: Error writing ... [os_error_code='28']")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", failing_wait)
    ckpt._pending = 6
    with pytest.raises(CheckpointWriteError) as failure:
        ckpt.close()
    assert str(failure.value) == (f"could not write checkpoint step 6 to {tmp_path / 'checkpoints'}"
                                  ": No space left on device (errno 28); the last complete "
                                  "checkpoint is step 4")
    ckpt.close()  # closed already: nothing raised twice
    assert ckpt.manager is None and complete_steps(tmp_path / "checkpoints") == [2, 4]


def test_metrics_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)]
    lines.insert(3, json.dumps({"step": 3, "eval/full/sum": 5.0}))
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # the last line cut by a kill
    assert faults.truncate_metrics(path, 3) == 4
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 1.0},
        {"step": 3, "eval/full/sum": 5.0}]
    assert faults.truncate_metrics(path, 3) == 0


def test_background_errors_go_to_the_log_file(tmp_path, capfd, caplog):
    import threading

    from absl import logging as absl_logging

    log_file = tmp_path / "errors.log"
    with faults.quiet_background_errors(log_file):
        absl_logging.error("orbax: background save failed")
        absl_logging.warning("a warning stays on the console")
        thread = threading.Thread(target=lambda: 1 / 0, name="writer")
        thread.start()
        thread.join()
    assert "ZeroDivisionError" not in capfd.readouterr().err
    console = [r.getMessage() for r in caplog.records]
    assert console == ["a warning stays on the console"]
    text = log_file.read_text()
    assert "background save failed" in text and "ZeroDivisionError" in text
    assert logging.getLogger("absl").filters == []


def test_input_watchdog_speaks_after_the_threshold_and_again_while_the_wait_goes_on():
    now = [0.0]
    watchdog = faults.InputWatchdog(300, log=lambda _: None, clock=lambda: now[0], poll_s=3600)
    assert watchdog.check() is None  # not waiting
    watchdog.waiting(7)
    now[0] = 299.0
    assert watchdog.check() is None
    now[0] = 300.5
    message = watchdog.check()
    assert "no batch for 300s" in message and "step 7" in message
    assert "train.input_stall_warning_s" in message
    assert watchdog.check() is None  # once per threshold, not once per poll
    now[0] = 610.0
    assert "no batch for 610s" in watchdog.check()
    watchdog.got()
    now[0] = 5000.0
    assert watchdog.check() is None  # the batch came
    watchdog.waiting(8)  # the next wait counts from its own start
    now[0] = 5299.0
    assert watchdog.check() is None
    watchdog.close()
    assert faults.InputWatchdog(0, log=print)._thread is None  # 0 = off


def test_input_watchdog_thread_logs_a_stalled_next_and_stops_when_closed():
    lines = []
    stalled = iter(lambda: time.sleep(0.8) or 1, None)  # a pipeline that takes 0.8 s per batch
    with faults.InputWatchdog(0.25, log=lines.append, poll_s=0.02) as watchdog:
        watchdog.waiting(3)
        next(stalled)
        watchdog.got()
        seen = len(lines)
        time.sleep(0.3)
        assert len(lines) == seen  # nothing while no one waits
    assert 2 <= seen <= 4, lines  # at about 0.25, 0.5 and 0.75 s
    assert all("waiting for step 3" in line for line in lines)
    assert not watchdog._thread.is_alive()


def test_a_stalled_input_pipeline_is_reported_on_the_console_and_the_job_goes_on(data_dir,
                                                                                 tmp_path):
    job = Job(tmp_path / "stall", data_dir, script=STALLED_PIPELINE,
              train__input_stall_warning_s=1.0)
    assert job.finish() == 0, job.err[-3000:]
    warnings = [line for line in job.out.splitlines() if line.startswith("input pipeline:")]
    assert 1 <= len(warnings) <= 3, job.out[-3000:]  # at about 1 and 2 s of the 2.5 s wait
    assert all("waiting for step 3" in line for line in warnings), warnings
    assert len(rows(tmp_path / "stall")) == STEPS
