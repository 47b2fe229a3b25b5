"""What the launch scripts share: quoting, the trainer's argv, and printing or running commands.

Every command is an argv list. It is printed with ``shlex.join`` (one line, ready to paste) and
run with ``subprocess`` without a shell, so a value reaches the trainer exactly as it was given.
A command that another shell runs later (gcloud's ``--command``, a batch script) is built from
``shlex.quote``-d parts for the same reason.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys

TRAIN = ["python", "-m", "fine_jax.train"]

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def shell_path(path: str) -> str:
    """``path`` quoted for the shell that will use it, a leading ``~/`` becoming ``"$HOME"/``
    (expanded by that shell, on the machine that runs the command) and the rest taken literally."""
    if path in ("~", "~/"):
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def override(text: str) -> tuple[str, str]:
    """argparse type of ``--override KEY=VALUE``: a dotted config key and any value."""
    key, sep, value = text.partition("=")
    if not sep or not _KEY.match(key):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with a dotted config key such as train.log_every=10, got {text!r}")
    return key, value


def check_workdir(workdir: str) -> None:
    """The trainer writes its workdir through the file system: a URL is refused here, before
    anything runs, with the way to mount it."""
    if "://" in workdir:
        fail(f"--workdir={workdir}: fine_jax needs a file-system path that every process sees; "
             "mount the bucket (tpu_vm.py --gcsfuse=BUCKET:/mnt/BUCKET does it on every worker) "
             "and pass --workdir=/mnt/BUCKET/...", 2)


def env_assignment(text: str) -> tuple[str, str]:
    """argparse type of ``--env NAME=VALUE``: an environment variable name and any value."""
    name, sep, value = text.partition("=")
    if not sep or not _ENV_NAME.match(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The flags passed through to ``python -m fine_jax.train``."""
    g = parser.add_argument_group("training (passed to python -m fine_jax.train)")
    g.add_argument("--config", required=True, metavar="FILE[:SIZE]",
                   help="config file, e.g. configs/fashiongen.py or configs/fashiongen.py:base")
    g.add_argument("--workdir", required=True,
                   help="checkpoints, metrics and results; an existing one is resumed. A path "
                   "every process sees (a shared file system, or a bucket mounted with gcsfuse); "
                   "a gs:// URL is refused")
    g.add_argument("--override", action="append", type=override, default=[],
                   metavar="KEY=VALUE", help="a config override, passed as --config.KEY=VALUE; "
                   "repeat for more")
    g.add_argument("--env", action="append", type=env_assignment, default=[],
                   metavar="NAME=VALUE", help="an environment variable for the trainer; repeat "
                   "for more")


def train_argv(args: argparse.Namespace, extra: list[str],
               first_overrides: list[tuple[str, str]] = ()) -> list[str]:
    """``python -m fine_jax.train --config=... --workdir=... --distributed=auto --config.k=v ...``
    and the arguments given after ``--``. ``first_overrides`` come before the user's, which win."""
    argv = TRAIN + [f"--config={args.config}", f"--workdir={args.workdir}", "--distributed=auto"]
    argv += [f"--config.{k}={v}" for k, v in [*first_overrides, *args.override]]
    return argv + list(extra)


def exports(env: list[tuple[str, str]]) -> list[str]:
    """``export NAME=VALUE`` lines, the values quoted."""
    return [f"export {name}={shlex.quote(value)}" for name, value in env]


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the script's own arguments, the arguments after the first ``--``)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def require_tool(tool: str, hint: str) -> None:
    """Exit 2 with one line when ``tool`` is not on PATH."""
    if shutil.which(tool) is None:
        fail(f"{tool} is not installed or not on PATH ({hint}); --dry-run prints the commands "
             "without running them", 2)


def execute(command: list[str]) -> None:
    """Print ``command`` as one shell-quoted line, then run it; a failure ends the script with
    one line and exit status 1."""
    print(shlex.join(command), flush=True)
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as e:
        fail(f"{command[0]} exited with status {e.returncode}: {shlex.join(command)}", 1)
