"""launch/tpu_vm.py and launch/slurm.py: the commands their dry runs print, parsed back and run
through bash with stand-ins for gcloud, sbatch, srun and the trainer."""
import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = ROOT / "launch" / "tpu_vm.py"
SLURM = ROOT / "launch" / "slurm.py"

TPU = ["--name=fine-test", "--zone=us-west4-a", "--project=my-proj"]
# Values that a shell would split, expand or choke on if a layer of quoting were missing.
OVERRIDES = {
    "data.caption_prefix": "a value  with spaces",
    "train.single": "it's",
    "train.double": 'say "hi"',
    "train.home": "$HOME/data",
    "train.backtick": "`echo expanded`",
    "train.subst": "$(echo expanded) ${HOME}",
    "train.meta": "a;b|c&&d>e <f * ? [x] \\ #",
    "train.empty": "",
}
CONFIG = "configs/my config's.py:base"
WORKDIR = "/mnt/my-bucket/runs/$USER `stage1` \"one\""
EXTRA = ["--flagfile=a b", "$HOME", "it's"]


def expected_train_argv(first=()):
    return (["--config=" + CONFIG, "--workdir=" + WORKDIR, "--distributed=auto"]
            + [f"--config.{k}={v}" for k, v in [*first, *OVERRIDES.items()]] + EXTRA)


def override_flags():
    return [f"--override={k}={v}" for k, v in OVERRIDES.items()]


def launch(script, *args, env=None):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def dry_run(script, *args):
    r = launch(script, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def commands(stdout):
    """The printed command lines, each parsed back into its argv."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def shell_words(command):
    """The words and operators (``;``, ``&&``, ``|`` ...) of a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def option(argv, name):
    values = [a[len(name) + 1:] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def kind(argv):
    """create, delete, scp, or the ssh step's purpose (install, data, run, logs)."""
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
    verb = argv[4]
    if verb != "ssh":
        return verb
    remote = option(argv, "--command")
    for what, marker in (("run", "fine_jax.train"), ("data", "gcloud storage cp"),
                         ("logs", "tail "), ("install", "pip install")):
        if marker in remote:
            return what
    raise AssertionError(remote)


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_home(tmp_path):
    """A home folder whose venv puts a stand-in ``python`` first on PATH: it appends its argv as
    JSON to $ARGV_LOG, prints a line and exits with $FAKE_EXIT."""
    home = tmp_path / "home dir"
    bin_dir = home / "bin"
    bin_dir.mkdir(parents=True)
    executable(bin_dir / "python", f"#!{sys.executable}\n"
               "import json, os, sys\n"
               "with open(os.environ['ARGV_LOG'], 'a') as f:\n"
               "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
               "print('step 1 loss 0.5', flush=True)\n"
               "sys.exit(int(os.environ.get('FAKE_EXIT', '0')))\n")
    for venv in (home / "fine_jax_venv", home / "my venv"):
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f"export PATH={shlex.quote(str(bin_dir))}:$PATH\n")
    (home / "fine_jax").mkdir()
    return home


def run_bash(code, home, env=None, **kwargs):
    full = dict(os.environ, HOME=str(home), ARGV_LOG=str(home / "argv.jsonl"), **(env or {}))
    return subprocess.run(["bash", "-c", code], env=full, capture_output=True, text=True,
                          timeout=30, **kwargs)


def logged_argvs(home):
    return [json.loads(line) for line in (home / "argv.jsonl").read_text().splitlines()]


# -- tpu_vm.py -------------------------------------------------------------------------------------

def test_tpu_run_passes_config_overrides_and_workdir_exactly(fake_home):
    out = dry_run(TPU_VM, "run", *TPU, "--config", CONFIG, "--workdir", WORKDIR,
                  *override_flags(), "--dry-run", "--", *EXTRA)
    [argv] = commands(out)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fine-test"]
    assert option(argv, "--zone") == "us-west4-a"
    assert option(argv, "--project") == "my-proj"
    assert option(argv, "--worker") == "all"
    remote = option(argv, "--command")

    # Statically: the remote shell's words contain the trainer's argv exactly.
    words = shell_words(remote)
    i = words.index("fine_jax.train")
    assert words[i - 2:i + 1] == ["python", "-m", "fine_jax.train"]
    n = len(expected_train_argv())
    assert words[i + 1:i + 1 + n] == expected_train_argv()
    assert not any(w.startswith(("--coordinator_address", "--num_processes", "--process_id"))
                   for w in words)

    # Run it as the worker's shell would: nothing is expanded, the output is streamed and teed.
    r = run_bash(remote, fake_home)
    assert r.returncode == 0, r.stderr
    assert logged_argvs(fake_home) == [["-m", "fine_jax.train", *expected_train_argv()]]
    assert "step 1 loss 0.5" in r.stdout
    assert "step 1 loss 0.5" in (fake_home / "fine_jax_logs" / "fine-test.log").read_text()

    # The trainer's exit status is the command's, through the tee.
    r = run_bash(remote, fake_home, env={"FAKE_EXIT": "3"})
    assert r.returncode == 3


def test_tpu_run_data_dir_and_env(fake_home):
    out = dry_run(TPU_VM, "run", *TPU, "--config", CONFIG, "--workdir", WORKDIR,
                  "--data-dir", "/mnt/data set", "--env", "MY_VAR=$x 'y'", *override_flags(),
                  "--venv", "~/my venv", "--dry-run", "--", *EXTRA)
    [argv] = commands(out)
    remote = option(argv, "--command")
    assert "export MY_VAR=" in remote
    r = run_bash(remote + '; echo "MY_VAR=$MY_VAR"', fake_home)
    assert r.returncode == 0, r.stderr
    assert logged_argvs(fake_home) == [
        ["-m", "fine_jax.train", *expected_train_argv([("data.data_dir", "/mnt/data set")])]]
    assert "MY_VAR=$x 'y'" in r.stdout.splitlines()


def test_tpu_all_runs_create_install_data_run_delete_in_order():
    out = dry_run(TPU_VM, "all", *TPU, "--accelerator-type=v5litepod-16", "--config", CONFIG,
                  "--workdir", WORKDIR, "--data-src=gs://my-bucket/fashiongen/", *override_flags(),
                  "--dry-run", "--", *EXTRA)
    argvs = commands(out)
    kinds = [kind(a) for a in argvs]
    assert kinds == ["create", "install", "scp", "install", "data", "run", "delete"]

    create, delete = argvs[0], argvs[-1]
    assert create[5] == "fine-test"
    assert option(create, "--accelerator-type") == "v5litepod-16"
    assert option(create, "--version") == "v2-alpha-tpuv5-lite"
    assert delete[4:6] == ["delete", "fine-test"] and "--quiet" in delete
    for a in argvs:
        assert option(a, "--zone") == "us-west4-a"
        assert option(a, "--project") == "my-proj"
        if a[4] in ("ssh", "scp"):
            assert option(a, "--worker") == "all"
            assert "fine-test" in a[5:] or any(x.startswith("fine-test:") for x in a)

    scp = argvs[2]
    assert "--recurse" in scp and str(ROOT) in scp and "fine-test:fine_jax" in scp
    install = shell_words(option(argvs[1], "--command"))
    assert "python3.12" in install and "venv" in install
    assert ["pip", "install", "-U", "pip"] == install[install.index("pip"):][:4]
    assert "jax[tpu]" in install
    assert "-e" in shell_words(option(argvs[3], "--command"))
    data = shell_words(option(argvs[4], "--command"))
    assert ["gcloud", "storage", "cp", "-r", "gs://my-bucket/fashiongen/*"] == \
        data[data.index("gcloud"):][:5]
    # The copied data is what the run reads.
    run = shell_words(option(argvs[5], "--command"))
    assert "--config.data.data_dir=~/fine_jax_data" in run
    assert run.index("--config.data.data_dir=~/fine_jax_data") < run.index(
        f"--config.{next(iter(OVERRIDES))}={next(iter(OVERRIDES.values()))}")

    keep = commands(dry_run(TPU_VM, "all", *TPU, "--accelerator-type=v4-32", "--config=c.py",
                            "--workdir=/mnt/b/r", "--keep", "--dry-run"))
    assert [kind(a) for a in keep] == ["create", "install", "scp", "install", "run"]
    assert option(keep[0], "--version") == "tpu-ubuntu2204-base"


def test_tpu_install_from_git_and_the_small_steps():
    [install] = commands(dry_run(TPU_VM, "install", *TPU, "--dry-run",
                                 "--source=git+https://github.com/acme/fine_jax.git@v1.2"))
    assert option(install, "--worker") == "all"
    words = shell_words(option(install, "--command"))
    assert ["git", "clone", "https://github.com/acme/fine_jax.git"] == \
        words[words.index("git"):][:3]
    assert ["checkout", "v1.2"] == words[words.index("checkout"):][:2]

    [create] = commands(dry_run(TPU_VM, "create", *TPU, "--accelerator-type=v6e-8", "--spot",
                                "--dry-run"))
    assert create[4:6] == ["create", "fine-test"] and "--spot" in create
    assert option(create, "--version") == "v2-alpha-tpuv6e"

    [logs] = commands(dry_run(TPU_VM, "logs", *TPU, "--follow", "--dry-run"))
    assert option(logs, "--worker") == "all"
    assert shell_words(option(logs, "--command")) == [
        "tail", "-n", "50", "-F", "$HOME/fine_jax_logs/fine-test.log"]

    [data] = commands(dry_run(TPU_VM, "data", *TPU, "--data-src=gs://b/d", "--data-dir=/mnt/d",
                              "--dry-run"))
    assert option(data, "--worker") == "all"
    assert shell_words(option(data, "--command"))[-2:] == ["gs://b/d/*", "/mnt/d"]

    assert commands(dry_run(TPU_VM, "delete", *TPU, "--dry-run")) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "fine-test", "--zone=us-west4-a",
         "--project=my-proj", "--quiet"]]


def test_tpu_all_deletes_after_a_failed_run(tmp_path):
    """Without --dry-run, with a stand-in gcloud whose run step fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.jsonl"
    executable(bin_dir / "gcloud", f"#!{sys.executable}\n"
               "import json, sys\n"
               f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
               "sys.exit(1 if any('fine_jax.train' in a for a in sys.argv) else 0)\n")
    env = dict(os.environ, PATH=str(bin_dir))
    args = ["all", *TPU, "--accelerator-type=v4-8", "--config=c.py", "--workdir=/mnt/b/r"]
    r = launch(TPU_VM, *args, env=env)
    assert r.returncode == 1
    assert "error: gcloud exited with status 1" in r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [kind(["gcloud", *c]) for c in calls] == [
        "create", "install", "scp", "install", "run", "delete"]
    # Each command was printed before it ran, as the dry run prints it.
    assert commands(r.stdout) == [["gcloud", *c] for c in calls]

    log.unlink()
    r = launch(TPU_VM, *args, "--keep", env=env)
    assert r.returncode == 1
    assert [json.loads(line)[3] for line in log.read_text().splitlines()][-1] == "ssh"


def test_tpu_missing_flag_or_gcloud_is_one_clear_error(tmp_path):
    r = launch(TPU_VM, "run", "--zone=z", "--config=c.py", "--workdir=/mnt/b/r", "--dry-run")
    assert r.returncode == 2
    assert "the following arguments are required: --name" in r.stderr
    r = launch(TPU_VM, "create", "--name=n", "--zone=z", "--dry-run")
    assert r.returncode == 2 and "--accelerator-type" in r.stderr
    r = launch(TPU_VM, "run", *TPU, "--config=c.py", "--workdir=/mnt/b/r", "--override=oops",
               "--dry-run")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = launch(TPU_VM, "delete", *TPU, "--dry-run", "--", "--x")
    assert r.returncode == 2 and "after --" in r.stderr

    env = dict(os.environ, PATH=str(tmp_path))  # no gcloud there
    r = launch(TPU_VM, "delete", *TPU, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: gcloud is not installed")
    assert r.stdout == ""


# -- slurm.py --------------------------------------------------------------------------------------

SLURM_ARGS = ["submit", "--nodes=4", "--gpus-per-node=8", "--cpus-per-task=12",
              "--time=2-00:00:00", "--job-name=fine-s1", "--output=logs/%x-%j.out",
              "--partition=gpu", "--account=proj1", "--venv=~/my venv",
              "--setup=export SETUP_RAN=yes", "--no-preallocate", "--config", CONFIG,
              "--workdir", WORKDIR, *override_flags()]


def test_slurm_dry_run_prints_the_script_and_sbatch(fake_home, tmp_path):
    out = dry_run(SLURM, *SLURM_ARGS, "--dry-run", "--", *EXTRA)
    lines = out.splitlines()
    assert lines[0] == "sbatch <<'FINE_JAX_SBATCH'" and lines[-1] == "FINE_JAX_SBATCH"
    body = lines[1:-1]
    assert body[0] == "#!/bin/bash"
    assert [line for line in body if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=fine-s1", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --time=2-00:00:00",
        "#SBATCH --output=logs/%x-%j.out", "#SBATCH --partition=gpu", "#SBATCH --account=proj1"]
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in body
    [srun] = [line for line in body if line.startswith("srun ")]
    assert shlex.split(srun) == ["srun", "python", "-m", "fine_jax.train",
                                 *expected_train_argv()]

    # Paste the output into bash with a stand-in sbatch, then run the script it received with a
    # stand-in srun: the trainer gets its argv exactly.
    bin_dir = tmp_path / "slurm bin"
    bin_dir.mkdir()
    received = tmp_path / "received.sbatch"
    executable(bin_dir / "sbatch", f"#!/bin/bash\ncat > {shlex.quote(str(received))}\n")
    executable(bin_dir / "srun", "#!/bin/bash\necho \"SETUP_RAN=$SETUP_RAN "
               "PREALLOCATE=$XLA_PYTHON_CLIENT_PREALLOCATE\"\nexec \"$@\"\n")
    path = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = run_bash(out, fake_home, env=path)
    assert r.returncode == 0, r.stderr
    assert received.read_text().splitlines() == body
    r = run_bash(f"source {shlex.quote(str(received))}", fake_home,
                 env=dict(path, SLURM_CPUS_PER_TASK="12"))
    assert r.returncode == 0, r.stderr
    assert "SETUP_RAN=yes PREALLOCATE=false" in r.stdout
    assert logged_argvs(fake_home) == [["-m", "fine_jax.train", *expected_train_argv()]]


def test_slurm_dry_run_with_script_out_writes_nothing(tmp_path):
    target = tmp_path / "job script.sbatch"
    out = dry_run(SLURM, "submit", "--config=c.py", "--workdir=/runs/a", "--dry-run",
                  f"--script-out={target}")
    lines = out.splitlines()
    assert lines[0] == f"cat > {shlex.quote(str(target))} <<'FINE_JAX_SBATCH'"
    assert lines[-2] == "FINE_JAX_SBATCH"
    assert shlex.split(lines[-1]) == ["sbatch", str(target)]
    assert not target.exists()
    assert "#SBATCH --nodes=1" in lines and "#SBATCH --gpus-per-node=8" in lines


def test_slurm_submit_writes_the_script_and_calls_sbatch(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_log = tmp_path / "sbatch.args"
    executable(bin_dir / "sbatch", f"#!/bin/bash\nprintf '%s\\n' \"$@\" > "
               f"{shlex.quote(str(args_log))}\necho 'Submitted batch job 42'\n")
    target = tmp_path / "job.sbatch"
    env = dict(os.environ, PATH=str(bin_dir))
    r = launch(SLURM, *SLURM_ARGS, f"--script-out={target}", env=env)
    assert r.returncode == 0, r.stderr
    assert args_log.read_text().splitlines() == [str(target)]
    assert "Submitted batch job 42" in r.stdout
    assert shlex.split(r.stdout.splitlines()[0]) == ["sbatch", str(target)]
    dry = dry_run(SLURM, *SLURM_ARGS, "--dry-run").splitlines()[1:-1]
    assert target.read_text().splitlines() == dry


def test_slurm_missing_flag_or_sbatch_is_one_clear_error(tmp_path):
    r = launch(SLURM, "submit", "--config=c.py", "--dry-run")
    assert r.returncode == 2
    assert "the following arguments are required: --workdir" in r.stderr
    r = launch(SLURM, "submit", "--config=c.py", "--workdir=w", "--job-name=a b", "--dry-run")
    assert r.returncode == 2 and "one word" in r.stderr

    target = tmp_path / "job.sbatch"
    r = launch(SLURM, "submit", "--config=c.py", "--workdir=w", f"--script-out={target}",
               env=dict(os.environ, PATH=str(tmp_path)))
    assert r.returncode == 2
    assert r.stderr.startswith("error: sbatch is not installed")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not target.exists()


def test_a_url_workdir_is_refused_before_anything_runs():
    for script, args in ((TPU_VM, ["all", *TPU, "--accelerator-type=v4-8"]),
                         (SLURM, ["submit"])):
        r = launch(script, *args, "--config=c.py", "--workdir=gs://b/r", "--dry-run")
        assert r.returncode == 2 and "gs://b/r" in r.stderr and "mount" in r.stderr
        assert r.stdout == ""


def test_gcsfuse_mounts_the_bucket_on_every_worker_before_the_run():
    out = dry_run(TPU_VM, "run", *TPU, "--config=c.py", "--gcsfuse=my-bucket:/mnt/my bucket",
                  "--workdir=/mnt/my bucket/run", "--dry-run")
    [argv] = commands(out)
    assert option(argv, "--worker") == "all"
    remote = option(argv, "--command")
    mount = remote.index("gcsfuse --implicit-dirs")
    assert "my-bucket '/mnt/my bucket'" in remote[mount:]
    assert mount < remote.index("fine_jax.train")
    words = shell_words(remote)
    assert "--workdir=/mnt/my bucket/run" in words
