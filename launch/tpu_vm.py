#!/usr/bin/env python3
"""Train fine_jax on Cloud TPU VMs: one host or a multi-host pod slice.

    python launch/tpu_vm.py all --name=fine-s1 --zone=us-west4-a \\
        --accelerator-type=v5litepod-16 --config=configs/fashiongen.py \\
        --gcsfuse=my-bucket:/mnt/my-bucket --workdir=/mnt/my-bucket/runs/stage1 --data-src=gs://my-bucket/fashiongen

Subcommands, each a gcloud command or a few:

  create   gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version
  install  on every worker: a venv (python3.12 -m venv ~/fine_jax_venv), pip, jax[tpu] and
           fine_jax, from this checkout (copied to ~/fine_jax) or from git+URL@REF
  data     on every worker: gcloud storage cp -r gs://BUCKET/PATH/* to a local folder
  run      on every worker: python -m fine_jax.train, its output streamed here and appended to
           ~/fine_jax_logs/NAME.log on the worker
  logs     the end of that log on every worker (--follow to keep reading)
  delete   gcloud compute tpus tpu-vm delete NAME --zone --quiet
  all      create, install, data (with --data-src), run, then delete, also when a step fails
           (--keep keeps the TPU)

Every step on the workers runs on all of them (``ssh --worker=all``). Multi-host start-up needs no
flags: the trainer's ``--distributed=auto`` calls ``jax.distributed.initialize()``, which reads
the TPU environment. ``--dry-run`` prints the commands, one per line, shell-quoted, instead of
running them. More in launch/README.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import _common as common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The TPU VM software version for PyTorch/JAX by TPU generation (Cloud TPU "TPU software
# versions"), keyed by the accelerator type's prefix (v5litepod-16 -> v5litepod).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
DEFAULT_DATA_DIR = "~/fine_jax_data"


def runtime_version(args: argparse.Namespace) -> str:
    if args.runtime_version:
        return args.runtime_version
    family = args.accelerator_type.split("-")[0]
    if family not in RUNTIME_VERSIONS:
        common.fail(f"no default --runtime-version for --accelerator-type="
                    f"{args.accelerator_type}; pass one", 2)
    return RUNTIME_VERSIONS[family]


def gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    return command + ([f"--project={args.project}"] if args.project else [])


def ssh(args: argparse.Namespace, steps: list[str]) -> list[str]:
    """One ssh command running the shell ``steps`` (joined with ``; ``) on every worker."""
    return gcloud(args, "ssh", args.name) + ["--worker=all", f"--command={'; '.join(steps)}"]


def create(args: argparse.Namespace) -> list[list[str]]:
    command = gcloud(args, "create", args.name) + [
        f"--accelerator-type={args.accelerator_type}", f"--version={runtime_version(args)}"]
    return [command + (["--spot"] if args.spot else []) +
            (["--preemptible"] if args.preemptible else [])]


def git_source(source: str) -> tuple[str, str]:
    """``git+URL[@REF][#fragment]`` -> (URL, REF or "")."""
    url = source[len("git+"):].split("#")[0]
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    path, at, ref = path.rpartition("@") if "@" in path else (path, "", "")
    return f"{scheme}{sep}{host}{slash}{path}", ref


def install(args: argparse.Namespace) -> list[list[str]]:
    py, venv, remote = shlex.quote(args.python), common.shell_path(args.venv), args.remote_dir
    if remote.rstrip("/") in ("", "~", "/", "."):
        common.fail(f"--remote-dir={remote!r} would be replaced by the install; name a folder "
                    "of its own, such as ~/fine_jax", 2)
    target = common.shell_path(remote)
    venv_steps = [
        "set -e",
        # The TPU images' Ubuntu may lack this Python: take it from apt, else the deadsnakes PPA.
        f"if ! {{ command -v {py} >/dev/null && {py} -m venv {venv}; }}; then "
        "sudo apt-get -o DPkg::Lock::Timeout=600 update -q; "
        f"apt-cache show {py}-venv >/dev/null 2>&1 || {{ sudo add-apt-repository -y "
        "ppa:deadsnakes/ppa && sudo apt-get -o DPkg::Lock::Timeout=600 update -q; }; "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "
        f"{py} {py}-venv; {py} -m venv {venv}; fi",
        f"source {venv}/bin/activate",
        "pip install -U pip",
        f"pip install -U {shlex.quote(args.jax)}",
        f"rm -rf {target}",
    ]
    if args.source.startswith("git+"):
        url, ref = git_source(args.source)
        clone = [f"git clone {shlex.quote(url)} {target}"]
        if ref:
            clone.append(f"git -C {target} checkout {shlex.quote(ref)}")
        return [ssh(args, venv_steps + clone + [f"pip install -e {target}"])]
    if not os.path.isdir(args.source):
        common.fail(f"--source={args.source} is neither a folder nor git+URL[@REF]", 2)
    # scp's remote paths are relative to the home folder.
    dest = remote[2:] if remote.startswith("~/") else remote
    return [ssh(args, venv_steps),
            gcloud(args, "scp", "--recurse", "--worker=all", args.source, f"{args.name}:{dest}"),
            ssh(args, ["set -e", f"source {venv}/bin/activate", f"pip install -e {target}"])]


def data(args: argparse.Namespace, data_dir: str) -> list[list[str]]:
    src = args.data_src.rstrip("/")
    if not src.startswith("gs://"):
        common.fail(f"--data-src={args.data_src} is not a gs:// path", 2)
    dest = common.shell_path(data_dir)
    return [ssh(args, ["set -e", f"mkdir -p {dest}",
                       f"gcloud storage cp -r {shlex.quote(src + '/*')} {dest}"])]


def log_file(args: argparse.Namespace) -> str:
    return common.shell_path(args.log_dir) + "/" + shlex.quote(f"{args.name}.log")


def run(args: argparse.Namespace, extra: list[str], data_dir: str | None) -> list[list[str]]:
    common.check_workdir(args.workdir)
    mount = []
    if args.gcsfuse:
        bucket, _, point = args.gcsfuse.partition(":")
        if not bucket or not point.startswith("/"):
            common.fail(f"--gcsfuse={args.gcsfuse}: expected BUCKET:/ABSOLUTE/MOUNT/POINT", 2)
        q = shlex.quote(point)
        # Every worker mounts the bucket at the same path, so the workdir is one shared folder.
        mount = [f"sudo mkdir -p {q}", f"sudo chown \"$(id -u)\" {q}",
                 f"mountpoint -q {q} || gcsfuse --implicit-dirs --rename-dir-limit=200000 "
                 f"{shlex.quote(bucket)} {q}"]
        if not args.workdir.startswith(point.rstrip("/") + "/"):
            print(f"note: --workdir={args.workdir} is not under the mount point {point}",
                  file=sys.stderr)
    elif not args.workdir.startswith("/mnt/"):
        print(f"note: --workdir={args.workdir}: on a multi-host slice every worker must see the "
              "same folder (--gcsfuse=BUCKET:/mnt/BUCKET mounts a bucket on each)", file=sys.stderr)
    first = [("data.data_dir", data_dir)] if data_dir else []
    train = shlex.join(common.train_argv(args, extra, first))
    return [ssh(args, ["set -eo pipefail", f"mkdir -p {common.shell_path(args.log_dir)}", *mount,
                       f"source {common.shell_path(args.venv)}/bin/activate",
                       f"cd {common.shell_path(args.remote_dir)}", *common.exports(args.env),
                       f"{train} 2>&1 | tee -a {log_file(args)}"])]


def logs(args: argparse.Namespace) -> list[list[str]]:
    follow = ["-F"] if args.follow else []
    return [ssh(args, [shlex.join(["tail", "-n", str(args.lines), *follow]) + " " +
                       log_file(args)])]


def delete(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud(args, "delete", args.name) + ["--quiet"]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/tpu_vm.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are passed to python -m fine_jax.train as they are (run, all).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tpu = argparse.ArgumentParser(add_help=False)
    g = tpu.add_argument_group("the TPU VM")
    g.add_argument("--name", required=True, help="the TPU VM's name")
    g.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-central2-b (v4)")
    g.add_argument("--project", help="the Google Cloud project (default: gcloud's)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the commands, one per line, instead of running them")

    accelerator = argparse.ArgumentParser(add_help=False)
    g = accelerator.add_argument_group("creating it")
    g.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32, v5p-8")
    g.add_argument("--runtime-version", help="TPU VM software version; default by generation: "
                   + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()))
    capacity = g.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="a Spot TPU")
    capacity.add_argument("--preemptible", action="store_true", help="a preemptible TPU")

    layout = argparse.ArgumentParser(add_help=False)
    g = layout.add_argument_group("on the workers")
    g.add_argument("--venv", default="~/fine_jax_venv", help="the virtual environment")
    g.add_argument("--remote-dir", default="~/fine_jax",
                   help="the fine_jax checkout; run starts there, so --config may be relative")
    g.add_argument("--log-dir", default="~/fine_jax_logs",
                   help="run appends its output to LOG_DIR/NAME.log")
    g.add_argument("--gcsfuse", metavar="BUCKET:/MOUNT/POINT",
                   help="run mounts the bucket there on every worker first (gcsfuse), so that "
                   "--workdir=/MOUNT/POINT/... is one folder all workers share")

    setup = argparse.ArgumentParser(add_help=False)
    g = setup.add_argument_group("installing")
    g.add_argument("--source", default=REPO, help="a local fine_jax checkout, copied to "
                   "--remote-dir (default: this one), or git+URL[@REF], cloned there")
    g.add_argument("--python", default="python3.12", help="the venv's interpreter")
    g.add_argument("--jax", default="jax[tpu]", help="the pip requirement for JAX")

    def data_args(src: bool, src_required: bool = False) -> argparse.ArgumentParser:
        d = argparse.ArgumentParser(add_help=False)
        g = d.add_argument_group("data")
        if src:
            g.add_argument("--data-src", required=src_required, metavar="gs://BUCKET/PATH",
                           help="a dataset folder, copied into --data-dir on every worker")
        if src_required:
            g.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                           help=f"the folder on the workers (default {DEFAULT_DATA_DIR})")
        else:
            g.add_argument("--data-dir", help="the data folder on the workers, passed to the "
                           f"trainer as --config.data.data_dir (default: {DEFAULT_DATA_DIR} "
                           "when --data-src is given, else the config's)")
        return d

    train = argparse.ArgumentParser(add_help=False)
    common.add_train_args(train)

    def add(name, help, parents):
        return sub.add_parser(name, help=help, description=help, parents=parents)

    add("create", "create the TPU VM", [tpu, accelerator])
    add("install", "install Python, JAX and fine_jax on every worker", [tpu, layout, setup])
    add("data", "copy a dataset from GCS to every worker's disk", [tpu, data_args(True, True)])
    add("run", "train on every worker", [tpu, layout, data_args(False), train])
    lg = add("logs", "the end of the run's log on every worker", [tpu, layout])
    lg.add_argument("--lines", type=int, default=50, help="how many lines (default 50)")
    lg.add_argument("--follow", action="store_true", help="keep printing what is appended")
    add("delete", "delete the TPU VM", [tpu])
    a = add("all", "create, install, data, run, delete",
            [tpu, accelerator, layout, setup, data_args(True), train])
    a.add_argument("--keep", action="store_true", help="keep the TPU VM after the run")
    return p


def main(argv: list[str]) -> None:
    own, extra = common.split_extra(argv)
    p = parser()
    args = p.parse_args(own)
    if extra and args.command not in ("run", "all"):
        p.error("arguments after -- are only for run and all")

    data_dir = getattr(args, "data_dir", None)
    if args.command == "all" and args.data_src and not data_dir:
        data_dir = DEFAULT_DATA_DIR
    steps = {"create": lambda: create(args), "install": lambda: install(args),
             "data": lambda: data(args, data_dir), "run": lambda: run(args, extra, data_dir),
             "logs": lambda: logs(args), "delete": lambda: delete(args)}
    if args.command != "all":
        commands = steps[args.command]()
        if args.dry_run:
            for c in commands:
                print(shlex.join(c))
            return
        common.require_tool("gcloud", "https://cloud.google.com/sdk/docs/install")
        for c in commands:
            common.execute(c)
        return

    first = create(args)
    body = install(args) + (data(args, data_dir) if args.data_src else []) + run(args, extra,
                                                                                 data_dir)
    last = [] if args.keep else delete(args)
    if args.dry_run:
        for c in first + body + last:
            print(shlex.join(c))
        return
    common.require_tool("gcloud", "https://cloud.google.com/sdk/docs/install")
    for c in first:
        common.execute(c)
    try:
        for c in body:
            common.execute(c)
    finally:
        if last:
            print(f"deleting {args.name} (--keep keeps it)", file=sys.stderr, flush=True)
            for c in last:
                common.execute(c)


if __name__ == "__main__":
    main(sys.argv[1:])
