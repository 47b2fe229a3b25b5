"""Two processes on loopback with CPU collectives (gloo), two devices each: a real multi-process
job. It trains the embedded set with each process reading its own share of every batch, saves,
restarts from the checkpoint, and must then hold exactly the checkpoint's shards in each process
(parameters split across the processes), and continue bit for bit as an uninterrupted run does."""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from fine_jax.checkpoint import read_weights

HERE = pathlib.Path(__file__).resolve().parent
# The driver runs from tests/; the repository root makes fine_jax importable uninstalled too.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(workdir, data_dir, max_steps, out_dir, timeout=600):
    port = free_port()
    procs = []
    for pid in range(2):
        log = open(out_dir / f"log{pid}.txt", "a")
        procs.append((subprocess.Popen(
            [sys.executable, str(HERE / "multiprocess_driver.py"), str(pid), "2", str(port),
             str(workdir), str(data_dir), str(max_steps), str(out_dir / f"out{pid}.json")],
            stdout=log, stderr=subprocess.STDOUT, env=ENV), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(out_dir / f"log{pid}.txt").read_text() for pid in range(2)]
    for (proc, _), text in zip(procs, logs):
        assert proc.returncode == 0, text[-3000:]
    return logs, [json.loads((out_dir / f"out{pid}.json").read_text()) for pid in range(2)]


def losses(workdir):
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), steps  # the resume dropped the copied rows past step 4
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """An uninterrupted 6-step job, and the same job resumed from its step-4 checkpoint: a copy
    of its workdir as it stood after step 4's save (the step-6 checkpoint removed), run to 6."""
    data_dir = tmp_path_factory.mktemp("data")
    straight = tmp_path_factory.mktemp("straight")
    out = {"straight": run_job(straight, data_dir, 6, tmp_path_factory.mktemp("s")) + (straight,)}
    resumed = tmp_path_factory.mktemp("resumed") / "workdir"
    shutil.copytree(straight, resumed)
    steps = sorted(int(d.name) for d in (resumed / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [4, 6], steps
    shutil.rmtree(resumed / "checkpoints" / "6")
    out["resume"] = run_job(resumed, data_dir, 6, tmp_path_factory.mktemp("r")) + (resumed,)
    return out


def test_two_processes_restore_their_own_shards_of_the_checkpoint(jobs):
    logs, outs, workdir = jobs["resume"]
    assert all("process 1 of 2" in logs[1] or "process 0 of 2" in logs[0] for _ in (0,))
    assert all(f"resumed from {workdir / 'checkpoints'} at step 4" in text for text in logs)
    assert [o["step"] for o in outs] == [6, 6]
    saved, _ = read_weights(workdir, parts=("params", "momentum", "queues"), step=6)
    import hashlib

    checked = split_across = 0
    for key, first in outs[0]["shards"].items():
        part = key.split("'")[1]
        if part not in saved:
            continue
        # the checkpoint's array, by the same key path
        node = saved
        for name in key[1:-1].split("']['"):
            node = node[name.strip("'[]")]
        full = np.asarray(node)
        indices = [set(tuple(map(tuple, s[0])) for s in o["shards"][key]["shards"]) for o in outs]
        if first["sharded"] and indices[0].isdisjoint(indices[1]):
            split_across += 1
        for o in outs:
            for index, digest in o["shards"][key]["shards"]:
                piece = full[tuple(slice(a, b) for a, b in index)] if index else full
                assert hashlib.sha1(np.ascontiguousarray(piece)).hexdigest() == digest, key
                checked += 1
    assert checked > 100
    assert split_across > 10  # parameters really live half in each process


def test_a_resumed_two_process_run_continues_bit_for_bit(jobs):
    resumed, straight = losses(jobs["resume"][2]), losses(jobs["straight"][2])
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]
    assert len(set(straight.values())) == 6  # the steps saw different batches


def test_each_process_reads_its_own_share_of_every_epoch():
    """The global batch is one permutation of the whole dataset per epoch, dealt to the processes
    in turn (a distributed sampler), re-drawn every epoch."""
    from fine_jax.data import pipeline

    items = list(range(12))

    def transform(x, rng):
        return {"x": np.int64(x), "r": np.float64(rng.random())}

    def take(pi, pc, n):
        it = iter(pipeline.training_stream(items, transform, 4, seed=3, process_index=pi,
                                           process_count=pc, num_threads=1))
        return [next(it) for _ in range(n)]

    one, shares = take(0, 1, 6), [take(p, 2, 6) for p in range(2)]
    for k in range(6):
        a, b = shares[0][k]["x"], shares[1][k]["x"]
        assert set(a).isdisjoint(b)
        assert sorted(np.concatenate([a, b])) == sorted(one[k]["x"])
    epochs = [np.concatenate([shares[0][k]["x"] for k in range(e * 3, e * 3 + 3)]) for e in (0, 1)]
    assert sorted(epochs[0]) != sorted(epochs[1]) or list(epochs[0]) != list(epochs[1])
    firsts = [set(np.concatenate([one[k]["x"] for k in range(e * 3, e * 3 + 3)])) for e in (0, 1)]
    assert firsts[0] == firsts[1] == set(items)  # 12 items, 3 batches of 4: all of them each epoch
    # a record's random draws depend on its place in the global stream, not on the process count
    assert {float(r) for s in shares for r in s[0]["r"]} == {float(r) for r in one[0]["r"]}
