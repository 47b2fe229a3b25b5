#!/usr/bin/env python3
"""Train fine_jax on GPU nodes under SLURM, one process per GPU.

    python launch/slurm.py submit --nodes=2 --gpus-per-node=8 --partition=gpu \\
        --venv=~/fine_jax_venv --config=configs/fashiongen.py --workdir=/shared/runs/stage1 \\
        --override=data.data_dir=/shared/data/fashiongen

``submit`` writes an sbatch script (to --script-out, else a temporary file) and submits it with
``sbatch SCRIPT``. The script asks for NODES x GPUS_PER_NODE tasks, activates the environment and
runs ``srun python -m fine_jax.train ... --distributed=auto``: each task's
``jax.distributed.initialize()`` reads SLURM's environment (SLURM_JOB_NODELIST, SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID) and uses its own local GPU. ``--dry-run`` prints the script and the
sbatch command as shell input, ready to paste, and neither writes nor submits anything. More in
launch/README.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

import _common as common

HEREDOC_END = "FINE_JAX_SBATCH"


def sbatch_value(option: str, value) -> str:
    """``#SBATCH --option=value``; sbatch reads these lines itself, so a value must be one word."""
    value = str(value)
    if not value or any(c.isspace() for c in value):
        common.fail(f"--{option}={value!r}: an #SBATCH value must be one word without spaces", 2)
    return f"#SBATCH --{option}={value}"


def script(args: argparse.Namespace, extra: list[str]) -> str:
    """The sbatch script."""
    lines = ["#!/bin/bash",
             sbatch_value("job-name", args.job_name),
             sbatch_value("nodes", args.nodes),
             sbatch_value("ntasks-per-node", args.gpus_per_node),
             sbatch_value("gpus-per-node", args.gpus_per_node),
             sbatch_value("cpus-per-task", args.cpus_per_task),
             sbatch_value("time", args.time),
             sbatch_value("output", args.output)]
    for option in ("partition", "account", "chdir"):
        if getattr(args, option):
            lines.append(sbatch_value(option, getattr(args, option)))
    for arg in args.sbatch_arg:
        if "\n" in arg or not arg.startswith("-"):
            common.fail(f"--sbatch-arg={arg!r}: expected one sbatch option such as --exclusive", 2)
        lines.append(f"#SBATCH {arg}")
    lines += ["",
              "# One task per GPU. --distributed=auto: jax.distributed.initialize() takes the",
              "# coordinator, process count and process id from SLURM_JOB_NODELIST, SLURM_NTASKS",
              "# and SLURM_PROCID, and each process's GPU from SLURM_LOCALID.",
              "set -e"]
    if args.setup:
        lines.append(args.setup)
    if args.venv:
        lines.append(f"source {common.shell_path(args.venv)}/bin/activate")
    if args.no_preallocate:
        lines.append("export XLA_PYTHON_CLIENT_PREALLOCATE=false")
    lines += common.exports(args.env)
    # srun does not take --cpus-per-task from the allocation on every SLURM version.
    lines.append('export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"')
    common.check_workdir(args.workdir)
    lines.append(shlex.join(["srun", *args.srun_arg, *common.train_argv(args, extra)]))
    return "\n".join(lines) + "\n"


def dry_run(text: str, script_out: str | None) -> str:
    """Shell input that does what ``submit`` would: the script as a quoted here-document (no
    expansion inside), written to --script-out and submitted, or fed to sbatch on stdin."""
    end = HEREDOC_END
    while end in text.splitlines():
        end += "_"
    if script_out is None:
        return f"sbatch <<'{end}'\n{text}{end}\n"
    path = shlex.quote(script_out)
    return f"cat > {path} <<'{end}'\n{text}{end}\n{shlex.join(['sbatch', script_out])}\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are passed to python -m fine_jax.train as they are.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("submit", help="write the sbatch script and submit it",
                       description="Write the sbatch script and submit it.")
    g = s.add_argument_group("the job (#SBATCH lines)")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one task each (default 8)")
    g.add_argument("--cpus-per-task", type=int, default=8,
                   help="CPU cores per task, for the input pipeline (default 8)")
    g.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    g.add_argument("--job-name", default="fine_jax", help="(default fine_jax)")
    g.add_argument("--output", default="%x-%j.out",
                   help="the job's log, SLURM patterns allowed (default %%x-%%j.out: "
                   "JOBNAME-JOBID.out in the submission folder)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--chdir", help="the job's working folder (default: the submission folder); "
                   "a relative --config is found from there")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option, e.g. --sbatch-arg=--exclusive; repeat for more")
    g = s.add_argument_group("the environment")
    g.add_argument("--venv", help="a virtual environment with fine_jax, activated first")
    g.add_argument("--setup", help="shell commands run before that, e.g. 'module load cuda'")
    g.add_argument("--no-preallocate", action="store_true",
                   help="export XLA_PYTHON_CLIENT_PREALLOCATE=false (JAX then allocates GPU "
                   "memory as needed instead of 75%% up front)")
    g.add_argument("--srun-arg", action="append", default=[], metavar="OPTION",
                   help="an option for srun, e.g. --srun-arg=--kill-on-bad-exit=1")
    common.add_train_args(s)
    g = s.add_argument_group("submitting")
    g.add_argument("--script-out", metavar="PATH",
                   help="where to write the script (default: a temporary file)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the script and the sbatch command instead of writing and "
                   "submitting")
    return p


def main(argv: list[str]) -> None:
    own, extra = common.split_extra(argv)
    args = parser().parse_args(own)
    for option in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(args, option) < 1:
            parser().error(f"--{option.replace('_', '-')} must be at least 1")
    text = script(args, extra)
    if args.dry_run:
        sys.stdout.write(dry_run(text, args.script_out))
        return
    common.require_tool("sbatch", "run this on a SLURM login node")
    if args.script_out:
        path = args.script_out
        with open(path, "w") as f:
            f.write(text)
    else:
        fd, path = tempfile.mkstemp(prefix="fine_jax-", suffix=".sbatch")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    print(f"wrote {path}", file=sys.stderr)
    common.execute(["sbatch", path])


if __name__ == "__main__":
    main(sys.argv[1:])
