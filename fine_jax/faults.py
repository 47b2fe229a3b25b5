"""How a training job meets the faults it can meet, and how each one ends.

* **Signals.** :class:`StopSignals` turns the first SIGTERM or SIGINT into a request that the job
  honours at its next safe point: the training loop saves the current step, waits for the write
  and exits with status 128 + signum (:class:`Interrupted`, a ``SystemExit``); the ViT warm-start
  stops without saving anything. A second SIGINT (Ctrl-C pressed again) aborts at once; orbax
  writes a step into a temporary directory and renames it only when complete, so an abort never
  leaves a checkpoint that a restart would read.
* **Non-finite steps.** :class:`NonFiniteGuard` applies ``train.on_nonfinite`` to the per-step
  ``nonfinite`` flag (the step itself never applies such an update): stop at the first one, or
  skip up to ``train.max_nonfinite_skips`` in a row; :class:`NonFiniteError` is the one-line end.
* **The workdir.** :class:`WorkdirLock` keeps a second run out of a workdir in use
  (``WORKDIR/.lock``, ``fcntl.flock``); :func:`check_writable` refuses a workdir that cannot be
  written before any work is done.
* **A stuck input pipeline.** :class:`InputWatchdog` says so on the log when no batch has come
  for ``train.input_stall_warning_s`` seconds, and again while the wait goes on.
* **Background errors.** :func:`quiet_background_errors` sends what orbax's and other background
  threads log about a failure (tracebacks) to a file in the workdir, so that the console shows the
  one line the main thread ends with.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import pathlib
import signal
import socket
import sys
import threading
import traceback


class Interrupted(SystemExit):
    """The job stopped on a signal after saving what it could; the exit status is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was not finite (``train.on_nonfinite``); the message says where
    the last good checkpoint is and what to change."""


class WorkdirLocked(RuntimeError):
    """Another run holds the workdir."""


class WorkdirUnwritable(OSError):
    """The workdir (or its checkpoint folder) cannot be written."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def is_remote(path) -> bool:
    """A URL such as ``gs://bucket/run`` rather than a local (or mounted) path."""
    return "://" in str(path)


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
_ACTIVE: "StopSignals | None" = None


def stop_requested() -> int | None:
    """The signal number of a pending stop request of the running job, or None."""
    return _ACTIVE.signum if _ACTIVE is not None else None


class StopSignals:
    """SIGTERM / SIGINT handlers that record a stop request instead of raising.

    The job polls :attr:`signum` at its safe points. ``abort_message()`` says what a second SIGINT
    leaves behind; it is written with one ``write`` (safe in a handler) before ``os._exit``.
    Installed only from the main thread (elsewhere Python refuses signal handlers, and the job runs
    without them).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, abort_message=lambda: "a restart resumes from the last complete checkpoint"):
        self.signum: int | None = None
        self.abort_message = abort_message
        self._previous = {}
        self._aborting = False

    def install(self) -> "StopSignals":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        _ACTIVE = self
        return self

    def restore(self) -> None:
        """Puts the previous handlers back, unless a stop is under way: then the job is on its way
        out, and a further SIGINT still aborts at once (a repeated SIGTERM is still ignored)."""
        global _ACTIVE
        if self.signum is None:
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}
        if _ACTIVE is self:
            _ACTIVE = None

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum  # honoured at the next safe point; nothing printed here
            return
        if signum == signal.SIGINT:  # pressed again: stop now
            if self._aborting:  # a third SIGINT between the message and the exit: already leaving
                return
            self._aborting = True
            try:
                msg = f"second SIGINT: stopping now; {self.abort_message()}\n"
            except Exception:  # noqa: BLE001 - the message must never keep the process alive
                msg = "second SIGINT: stopping now\n"
            os.write(2, msg.encode())
            os._exit(128 + signum)
        # A repeated SIGTERM (schedulers resend it) changes nothing: the stop is under way.


_LEAVING_AFTER_STOP = False
_IN_COMMAND = False  # set by command_started(): a command, which exits after its job


def leaving_after_stop() -> None:
    """Says that the command is exiting because of a stop signal (its save is done)."""
    global _LEAVING_AFTER_STOP
    _LEAVING_AFTER_STOP = True


def _ignore_stop_signals_when_leaving() -> None:
    if _LEAVING_AFTER_STOP:
        for s in StopSignals.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def command_started() -> None:
    """Called once when a command starts (``cli.run_main``), before the libraries it uses
    register exit handlers.

    It marks the process as a command: a job that ends with an error or a stop keeps other
    threads' reports out of the console until the process exits (:func:`quiet_background_errors`).
    And it keeps the exit status of a stopped job: the interpreter's own shutdown puts SIG_DFL back for every signal that has a Python handler,
    after the exit handlers ran. A SIGINT in the last milliseconds of a stopped job's exit (Ctrl-C
    held down) then killed the process by the signal (status -2) instead of letting it end with
    128 + signum. Registered first, this handler runs last: from there on a job that is leaving
    after a stop ignores further stop signals (the interpreter keeps SIG_IGN), while a second
    SIGINT during the exit handlers and thread joins before it still aborts at once.
    """
    import atexit

    global _IN_COMMAND
    if not _IN_COMMAND:
        _IN_COMMAND = True
        atexit.register(_ignore_stop_signals_when_leaving)


# ----------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteGuard:
    """Applies ``train.on_nonfinite`` to the steps' flags, in step order.

    :meth:`observe` returns None to go on, or the reason to stop (the caller adds where the last
    good checkpoint is and raises :class:`NonFiniteError`).
    """

    def __init__(self, policy: str = "stop", max_skips: int = 20, log=print):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite={policy!r}: use stop or skip")
        self.policy, self.max_skips, self.log = policy, int(max_skips), log
        self.consecutive = 0
        self.skipped = 0  # this run, in total

    def observe(self, step: int, nonfinite: bool, loss: float = float("nan")) -> str | None:
        if not nonfinite:
            self.consecutive = 0
            return None
        what = f"non-finite loss/gradient at step {step} (loss {loss:.6g})"
        if self.policy == "stop":
            return what
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive > self.max_skips:
            return (f"{what}: {self.consecutive} non-finite steps in a row, more than "
                    f"train.max_nonfinite_skips={self.max_skips}")
        self.log(f"{what}: update skipped ({self.consecutive} in a row, at most {self.max_skips}; "
                 f"{self.skipped} skipped in this run)")
        return None


def nonfinite_flag(metrics: dict) -> tuple[bool, float]:
    """(the step was non-finite, its loss) from a step's host metrics. Without a ``nonfinite``
    entry a non-finite loss is the flag."""
    loss = float(metrics.get("loss", float("nan")))
    flag = metrics.get("nonfinite")
    if flag is None:
        return not math.isfinite(loss), loss
    return bool(float(flag) > 0) or not math.isfinite(loss), loss


# ----------------------------------------------------------------------------------------------
# The workdir
# ----------------------------------------------------------------------------------------------
LOCK_FILE = ".lock"


class WorkdirLock:
    """An exclusive ``flock`` on ``WORKDIR/.lock``, which holds the holder's pid, host and start
    time. The kernel drops it when the process ends, however it ends."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WorkdirUnwritable(f"cannot write to the workdir {self.path.parent}: "
                                    f"{e.strerror or e} ({self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A filesystem without locks: run unguarded rather than not at all.
                os.close(fd)
                print(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other run "
                      "uses this workdir", file=sys.stderr, flush=True)
                return self
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLocked(
                f"{self.path.parent} is in use by another run ({holder}); stop that run first, or "
                "choose another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its pid is not recorded yet"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")


def check_writable(*directories: pathlib.Path) -> None:
    """Creates and removes a probe file in each directory that exists (a path that exists but is
    not a directory is refused too); raises :class:`WorkdirUnwritable` naming the path."""
    for d in directories:
        d = pathlib.Path(d)
        if not d.exists():
            continue
        if not d.is_dir():
            raise WorkdirUnwritable(f"{d} is not a directory; the run writes its checkpoints there. "
                                    "Move it away or choose another --workdir")
        probe = d / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise WorkdirUnwritable(f"cannot write to {d}: {e.strerror or e}; free space or fix "
                                    "its permissions, or choose another --workdir") from None


def make_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirUnwritable(f"cannot create the workdir {workdir}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------
# Background errors
# ----------------------------------------------------------------------------------------------
BACKGROUND_LOG = "background_errors.log"


class _Divert(logging.Filter):
    """On the ``absl`` logger (orbax logs through it): ERROR records, and any with a traceback,
    go to the file only."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.exc_info:
            with contextlib.suppress(Exception):
                self.handler.handle(record)
            return False
        return True


class _MainThreadStderr:
    """``sys.stderr`` for the main thread; what other threads write there (tracebacks that native
    code prints when a write fails, say) goes to ``sink``."""

    def __init__(self, stream, sink):
        self._stream, self._sink = stream, sink

    def write(self, text):
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        self._sink(text)
        return len(text)

    def __getattr__(self, name):  # flush, fileno, encoding, isatty, ...
        return getattr(self._stream, name)


_LOG_PATH: pathlib.Path | None = None  # the background log of the latest job, for silence_teardown


class _BestEffortFileHandler(logging.FileHandler):
    """The background log is best effort: when the disk is full (the very fault it may be
    recording) a failed write is dropped, not reported on the console as a logging error."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def quiet_background_errors(log_path: pathlib.Path | None):
    """While active, orbax's error logs, uncaught exceptions of other threads, "exception
    ignored" reports and whatever other threads write to ``sys.stderr`` go to ``log_path``
    (None: dropped) instead of the console. The main thread's own exceptions are untouched: they
    end the job with their one line."""
    global _LOG_PATH
    _LOG_PATH = log_path
    if log_path is not None:
        handler: logging.Handler = _BestEffortFileHandler(log_path, delay=True)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(threadName)s %(pathname)s:%(lineno)d] %(message)s"))
    else:
        handler = logging.NullHandler()
    divert = _Divert(handler)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(divert)

    def append(text: str) -> None:
        if log_path is None:
            return
        with contextlib.suppress(OSError), open(log_path, "a") as f:
            f.write(text)

    def write(text: str) -> None:
        append(text if text.endswith("\n") else text + "\n")

    old_thread_hook, old_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args):
        write(f"uncaught in thread {getattr(args.thread, 'name', '?')}:\n" + "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    def unraisable_hook(args):
        write(f"{args.err_msg or 'exception ignored'}: {args.object!r}\n" + "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
    old_stderr = sys.stderr
    sys.stderr = _MainThreadStderr(old_stderr, append)

    def restore():
        if isinstance(sys.stderr, _MainThreadStderr):
            sys.stderr = old_stderr
        threading.excepthook, sys.unraisablehook = old_thread_hook, old_unraisable
        absl_logger.removeFilter(divert)
        handler.close()

    try:
        yield
    except BaseException:
        # A command that ends with an error or a stop prints its one line next and exits; orbax's
        # threads can still report the failure they saw (a failed restore's closed event loop,
        # say) in between, so there the diversion stays until the process ends.
        if not _IN_COMMAND:
            restore()
        raise
    restore()


def silence_teardown() -> None:
    """For a command that has printed its last line and exits: what the interpreter's shutdown
    still prints to stderr (native writers finishing after their Python side is gone) goes to the
    latest job's background log, or nowhere."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
        target = _LOG_PATH if _LOG_PATH is not None else os.devnull
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# metrics.jsonl on resume
# ----------------------------------------------------------------------------------------------
def truncate_metrics(path: pathlib.Path, last_step: int) -> int:
    """Drops the rows of ``path`` (JSON lines with a ``step``) past ``last_step``, and any line cut
    short by a kill, so that a resumed run's file reads as one curve. Returns the rows dropped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += bool(line.strip())
                continue
            if isinstance(row, dict) and int(row.get("step", 0)) > last_step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


class InputWatchdog:
    """Says on the log when the input pipeline has given the training loop no batch for
    ``after_s`` seconds, and again every ``after_s`` seconds while the wait goes on.

    A deadlocked data worker or a hung file system otherwise leaves a job silent forever. The
    loop brackets each ``next()`` with :meth:`waiting` and :meth:`got`; a daemon thread compares
    the clock. ``after_s <= 0`` turns it off (no thread).
    """

    def __init__(self, after_s: float, log, clock=None, poll_s: float | None = None):
        import time

        self.after_s = float(after_s)
        self._log, self._clock = log, clock or time.monotonic
        self._lock = threading.Lock()
        self._since: float | None = None
        self._step = 0
        self._warned = 0
        self._stop = threading.Event()
        self._thread = None
        if self.after_s > 0:
            poll = poll_s if poll_s is not None else min(10.0, self.after_s / 4)
            self._thread = threading.Thread(target=self._watch, args=(poll,), daemon=True,
                                            name="fine_jax-input-watchdog")
            self._thread.start()

    def waiting(self, step: int) -> None:
        with self._lock:
            self._since, self._step, self._warned = self._clock(), step, 0

    def got(self) -> None:
        with self._lock:
            self._since = None

    def check(self) -> str | None:
        """The message due now, if any (the watching thread calls this; tests may too)."""
        with self._lock:
            if self._since is None:
                return None
            waited = self._clock() - self._since
            if waited < self.after_s * (self._warned + 1):
                return None
            self._warned += 1
            step = self._step
        return (f"input pipeline: no batch for {waited:.0f}s (waiting for step {step}); a data "
                "worker process or the file system under data.data_dir may be stuck. The job "
                "goes on waiting: a second Ctrl-C stops it at once and a restart resumes from "
                "the last complete checkpoint (train.input_stall_warning_s sets this warning)")

    def _watch(self, poll: float) -> None:
        while not self._stop.wait(poll):
            message = self.check()
            if message:
                self._log(message)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "InputWatchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
