"""Command-line plumbing shared by the entry points: flags, and known errors as one line.

An error the user can fix (a config that cannot run, missing or malformed data, a checkpoint
that is not there or cannot be written, a workdir in use, a diverged run) ends the command with
exit status 2 and one line, ``config error: ...`` or ``error: ...``, never a traceback. A job
stopped by SIGTERM or SIGINT exits with 128 + the signal number (``fine_jax.faults``).
"""
from __future__ import annotations

import sys
from typing import Callable


def known_errors() -> dict:
    """{exception class: message prefix} of the errors that end a command with one line."""
    from fine_jax import config as config_lib
    from fine_jax import datasets, faults
    from fine_jax.checkpoint import CheckpointRestoreError, CheckpointWriteError, WeightsNotFound
    from fine_jax.data import fashioniq, pipeline

    return {config_lib.ConfigError: "config error", datasets.DatasetMissing: "error",
            fashioniq.FashionIQError: "error", pipeline.DataCorrupted: "error",
            WeightsNotFound: "error", faults.NonFiniteError: "error",
            faults.WorkdirLocked: "error", faults.WorkdirUnwritable: "error",
            CheckpointWriteError: "error", CheckpointRestoreError: "error"}


def run_main(fn: Callable[[], object]) -> None:
    """Runs ``fn`` with orbax's INFO logging off; a known error is one line on stderr, exit 2."""
    from fine_jax import faults

    faults.command_started()
    from absl import logging as absl_logging

    # orbax logs every checkpoint phase at INFO; keep the console to the progress lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    errors = known_errors()
    try:
        fn()
    except tuple(errors) as e:
        prefix = next(p for cls, p in errors.items() if isinstance(e, cls))
        print(f"{prefix}: {e}", file=sys.stderr)
        faults.silence_teardown()
        sys.exit(2)
    except faults.Interrupted:  # saved and stopping: the shutdown's noise must not follow
        faults.silence_teardown()
        faults.leaving_after_stop()
        raise
    except KeyboardInterrupt:  # Ctrl-C where no handler of the job's own was installed
        print("interrupted (SIGINT)", file=sys.stderr)
        sys.exit(130)


def define_config_flag() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "An ml_collections config file; configs/FILE.py:SIZE picks a named model "
        "size (base, tiny, demo).", lock_config=False)


def parse_flags(argv):
    """absl's flag parsing, with an override of a key the config does not have (a typo such as
    ``--config.train.log_evry=5``) reported as one ``config error:`` line instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        from fine_jax.config import base_config

        known = base_config()

        def exists(path: str) -> bool:
            node = known
            for part in path.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return False
                node = node[part]
            return True

        keys = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        unknown = [k for k in keys if not exists(k[len("--config."):])] or [str(e)]
        print(f"config error: unknown config key {', '.join(unknown)}; see fine_jax/config.py for "
              "the keys each block has", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpshort to see the flags.", file=sys.stderr)
        sys.exit(2)


def main(entry: Callable[[], object]) -> None:
    """``absl.app.run`` of ``entry`` (which reads the flags) with :func:`parse_flags` and
    :func:`run_main`, in a process re-executed first with a caching host allocator
    (``fine_jax.allocator``)."""
    from fine_jax import allocator

    allocator.reexec_if_needed()
    from absl import app

    app.run(lambda argv: run_main(entry), flags_parser=parse_flags)
