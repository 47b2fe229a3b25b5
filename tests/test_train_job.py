"""The main job end to end on a tiny synthetic set, all three stages: metrics, per-epoch evaluation
and the best checkpoint, exact resume, stages 2 and 3 from stage 1, the evaluation tool, and the
one-line errors for a missing dataset and impossible configs."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax import evaluate, trainer
from fine_jax.checkpoint import BEST_DIR, best_info

REPO = pathlib.Path(__file__).resolve().parents[1]

EVAL_KEYS = ["full/i2t_r1", "full/i2t_r5", "full/i2t_r10", "full/t2i_r1", "full/t2i_r5",
             "full/t2i_r10", "full/sum", "sample100/i2t_r1", "sample100/i2t_r5",
             "sample100/i2t_r10", "sample100/t2i_r1", "sample100/t2i_r5", "sample100/t2i_r10",
             "sample100_mean/i2t_r1", "sample100_std/i2t_r1", "sample100_clean/t2i_r1",
             "twin/i2t_acc", "twin/t2i_acc"]
TINY_MODEL = dict(vision_width=32, hidden_size=32, intermediate_size=64, vision_heads=2,
                  num_heads=2, embed_dim=32, vision_depth=1, num_layers=2, fusion_layer=1,
                  patch_size=16)


def tiny(config_file, data_dir, max_steps, **train):
    c = config_lib.load_config_file(REPO / "configs" / config_file)
    c.data.data_dir = str(data_dir)
    c.data.synthetic_train_products = 40
    c.data.synthetic_eval_products = 20
    c.data.synthetic_views = 2
    c.data.synthetic_tgir_train = 48
    c.data.synthetic_tgir_eval = 24
    c.model.update(TINY_MODEL)
    c.data.max_len = 40
    c.train.global_batch_size = 8
    c.loss.queue_size = 32
    c.train.max_steps = max_steps
    c.init.vit_pretrain_steps = 2 if c.stage == "pretrain" else 0
    c.init.vit = ""  # the demo's shipped ViT does not fit the tiny model
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.batch_size = 16
    c.eval.sample100_draws = 2
    c.train.update(train)
    return c


def read_metrics(workdir):
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}, [r for r in rows if "eval/full/sum" in r
                                                         or "eval/tgir/select" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
    """A stage-1 run of one epoch (80 images / 8 = 10 steps), evaluated at its end."""
    workdir = tmp_path_factory.mktemp("stage1")
    c = tiny("demo.py", data_dir, 10)
    c.eval.every_epochs = 1
    results = trainer.run(c, str(workdir))
    return workdir, c, results


def test_stage1_evaluates_every_epoch_and_keeps_the_best(stage1, capsys):
    workdir, c, results = stage1
    steps, evals = read_metrics(workdir)
    assert sorted(steps) == list(range(1, 11))
    assert [r["step"] for r in evals] == [10]  # 80 rows / 8 = 10 steps: one epoch, then the end
    on_disk = json.loads((workdir / "eval_results.json").read_text())
    assert on_disk["criterion"] == "full/sum"
    latest, best = on_disk["latest"], on_disk["best"]
    for key in EVAL_KEYS:
        assert 0.0 <= latest["results"][key] <= 100.0 or key == "full/sum", key
    assert latest["results"] == pytest.approx(results)
    assert best["value"] == pytest.approx(results["full/sum"]) and best["step"] == 10
    assert best_info(workdir)["step"] == 10 and (workdir / BEST_DIR).is_dir()
    assert (workdir / "sample100_candidates.json").is_file()
    assert list((workdir / "tb").iterdir()), "no TensorBoard event file"
    # Speed: pairs/s, the step's MFU against the measured CPU peak, and the input wait.
    for row in list(steps.values())[1:]:
        assert row["pairs_per_s"] > 0 and row["step_s"] > 0
        assert 0.0 < row["mfu"] < 1.0
        assert 0.0 <= row["input_wait_frac"] <= 1.0 and row["input_wait_s"] >= 0.0


def test_throughput_metrics():
    m = trainer.throughput_metrics(steps=10, seconds=5.0, input_wait=0.5, batch=8,
                                   flops_per_step=2e9, peak_flops=1e10)
    assert m == pytest.approx({"pairs_per_s": 16.0, "step_s": 0.5, "input_wait_s": 0.05,
                               "input_wait_frac": 0.1, "mfu": 0.4})
    assert trainer.throughput_metrics(0, 1.0, 0.0, 8, 1e9, 1e10) == {}
    line = trainer.format_line(3, 10, {"loss": 1.0, "temp": 0.07, "alpha": 0.4, **m}, ("loss",),
                               16.0, 3.0)
    assert "16.0 pairs/s | MFU 40.0% | input wait 10%" in line


def test_resume_continues_exactly(data_dir, tmp_path, capsys):
    straight = tmp_path / "straight"
    trainer.run(_no_eval(tiny("demo.py", data_dir, 6)), str(straight))
    resumed = tmp_path / "resumed"
    trainer.run(_no_eval(tiny("demo.py", data_dir, 4)), str(resumed))
    assert (resumed / "checkpoints" / "4").is_dir()
    assert "ViT warm-start 2/2" in capsys.readouterr().out
    trainer.run(_no_eval(tiny("demo.py", data_dir, 6)), str(resumed))
    out = capsys.readouterr().out
    assert "resumed from" in out and "ViT warm-start" not in out
    a, b = read_metrics(straight)[0], read_metrics(resumed)[0]
    for step in (5, 6):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_sym"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-4,
                                       err_msg=f"{key} at step {step} differs after resume")


def test_a_batch_of_another_shape_than_compiled_is_compiled_again(data_dir, tmp_path, capsys,
                                                                   monkeypatch):
    # The trainer compiles its step ahead of the first call; a later batch of another shape (here
    # one text position shorter at step 3) must not stop the run: it is logged and compiled again.
    original, calls = trainer.parallel.global_batch, []

    def shorter_third(host_batch, mesh):
        calls.append(1)
        if len(calls) == 3:
            host_batch = {k: v[:, :-1] if np.ndim(v) == 2 and np.shape(v)[1] == 40 else v
                          for k, v in host_batch.items()}
        return original(host_batch, mesh)

    monkeypatch.setattr(trainer.parallel, "global_batch", shorter_third)
    c = _no_eval(tiny("demo.py", data_dir, 5))
    c.init.vit_pretrain_steps = 0
    trainer.run(c, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "step 2: the step's arguments differ from the compiled ones" in out
    steps = read_metrics(tmp_path / "run")[0]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) for r in steps.values())


def _no_eval(c):
    c.eval.every_epochs = 0
    c.eval.at_end = False
    return c


def test_stage2_starts_from_the_best_stage1_checkpoint(stage1, data_dir, tmp_path, capsys):
    workdir1, _, _ = stage1
    c = tiny("demo_retrieval.py", data_dir, 6)
    c.init.checkpoint = str(workdir1)
    c.eval.every_epochs = 1
    results = trainer.run(c, str(tmp_path / "s2"))
    out = capsys.readouterr().out
    assert "the best checkpoint, step 10" in out and "fine_jax retrieval" in out
    assert "train products 40" in out and "5 steps/epoch" in out
    steps, evals = read_metrics(tmp_path / "s2")
    assert set(steps[1]) >= {"loss_itc", "loss_itm"} and "loss_mlm" not in steps[1]
    assert [r["step"] for r in evals] == [5, 6]
    for key in EVAL_KEYS:
        assert key in results


def test_stage3_starts_from_stage1_and_scores_fashioniq(stage1, data_dir, tmp_path, capsys):
    workdir1, _, _ = stage1
    c = tiny("demo_tgir.py", data_dir, 4)
    c.init.checkpoint = str(workdir1)
    results = trainer.run(c, str(tmp_path / "s3"))
    out = capsys.readouterr().out
    assert "fine_jax tgir" in out and "train triplets 48" in out
    assert "queues/fusion" in out  # kept fresh: stage 1 has no fusion queue
    for cat in ("dress", "shirt", "toptee"):
        for k in ("r1", "r5", "r10", "r50"):
            assert 0.0 <= results[f"tgir/{cat}/{k}"] <= 100.0
    assert results["tgir/select"] == pytest.approx(sum(
        results[f"tgir/{cat}/r10"] + results[f"tgir/{cat}/r50"]
        for cat in ("dress", "shirt", "toptee")))
    assert json.loads((tmp_path / "s3" / "eval_results.json").read_text())["criterion"] == \
        "tgir/select"


def test_evaluate_tool_scores_a_workdir_without_the_training_split(stage1, tmp_path):
    workdir, c, results = stage1
    c = c.copy_and_resolve_references()
    scored = evaluate.evaluate(c, workdir, out=tmp_path / "ev", log=lambda *_: None)
    assert scored == pytest.approx(results)
    report = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert report["step"] == 10 and report["results"] == pytest.approx(results)


def run_cli(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)


def test_evaluate_refuses_a_workdir_without_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("fine_jax.evaluate", "--config=configs/demo.py",
                   f"--checkpoint={tmp_path / 'empty'}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "neither a fine_jax weights checkpoint" in proc.stderr


def test_reference_config_without_data_stops_with_one_message(tmp_path):
    proc = run_cli("fine_jax.train", "--config=configs/fashiongen.py",
                   f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "fashiongen_256_256_train.h5" in proc.stderr
    assert "--config.data.data_dir" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.model.num_heads=3", "hidden_size=128 is not divisible by model.num_heads=3"),
    ("--config.train.log_every=0", "train.log_every=0 must be at least 1"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every=0 must be at least 1"),
    ("--config.train.log_evry=5", "unknown config key --config.train.log_evry;"),
    ("--config.loss.queue_size=1000", "queue_size=1000 is not divisible"),
    ("--config.train.global_batch_size=128 --config.loss.queue_size=1024",
     "larger than the training set"),
])
def test_impossible_configs_are_one_line_before_any_work(tmp_path, data_dir, override, message):
    proc = run_cli("fine_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path / 'wd'}",
                   f"--config.data.data_dir={data_dir}", "--config.data.synthetic_train_products=40",
                   "--config.data.synthetic_eval_products=20", "--config.data.synthetic_views=2",
                   *override.split())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error:") and message in lines[-1], proc.stderr
    assert "first step" not in proc.stdout


def test_queue_not_divisible_by_global_batch_is_a_clear_error():
    c = config_lib.tiny_config()
    c.loss.queue_size = 1020
    with pytest.raises(config_lib.ConfigError, match="queue_size=1020 is not divisible"):
        config_lib.validate(c)
    c = config_lib.base_config()
    config_lib.validate(c)  # the reference configuration itself is valid
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 3 devices"):
        config_lib.validate(c, num_devices=3)
    c.stage = "tgir"  # stage 3 enqueues 2 x 128 image rows per step
    c.data.source = "fashioniq"
    c.loss.queue_size = 128 * 3
    with pytest.raises(config_lib.ConfigError, match="twice the global batch"):
        config_lib.validate(c)


def test_malformed_lr_scales_is_a_config_error():
    c = config_lib.tiny_config()
    c.optim.lr_scales = "itm_head"
    with pytest.raises(config_lib.ConfigError, match="optim.lr_scales: 'itm_head' is not PATTERN=SCALE"):
        config_lib.validate(c)
    c.optim.lr_scales = "text_encoder/layer_[2-9]|itm_head=2.0"
    config_lib.validate(c)


def test_every_named_size_is_selectable_by_name():
    for name in config_lib.SIZES:
        for f in ("demo.py", "fashiongen.py", "fashiongen_retrieval.py", "fashioniq_tgir.py"):
            c = config_lib.load_config_file(REPO / "configs" / f, name)
            config_lib.validate(c)
            if name == "tiny":
                assert c.model.hidden_size == 64 and c.model.vision_depth == 2
    with pytest.raises(config_lib.ConfigError, match="unknown model size 'huge'"):
        config_lib.load_config_file(REPO / "configs" / "demo.py", "huge")


def test_itm_reranking_is_reported_under_its_own_keys(stage1, tmp_path):
    workdir, c, results = stage1
    c = c.copy_and_resolve_references()
    c.eval.itm_rerank_k = 3
    scored = evaluate.evaluate(c, workdir, out=tmp_path / "ev", log=lambda *_: None)
    for key in EVAL_KEYS:  # the contrastive results are unchanged
        assert scored[key] == pytest.approx(results[key]), key
    for group in ("full_itm", "sample100_itm", "twin_itm"):
        assert any(k.startswith(group + "/") for k in scored), group
    # Re-ranking reorders within the top 3 only: R@10 cannot change, R@1 and R@5 can.
    assert scored["full_itm/i2t_r10"] == pytest.approx(results["full/i2t_r10"])
    assert scored["full_itm/t2i_r10"] == pytest.approx(results["full/t2i_r10"])


@pytest.mark.parametrize("config_file", ["fashiongen.py", "fashiongen_retrieval.py",
                                         "fashioniq_tgir.py"])
def test_reference_configs_run_on_small_data_in_the_real_layouts(config_file, tmp_path, capsys):
    """The reference configs at the tiny size, on a FashionGen release / FashionIQ folder the test
    writes: two steps, a checkpoint, an evaluation with the stage's protocols."""
    from test_data_fashioniq import WORDS, write_fashioniq
    from test_data_sources import write_release

    from fine_jax.data.text import SYMBOL_TOKENS
    from fine_jax.models.fine import resolve_dtype

    c = config_lib.load_config_file(REPO / "configs" / config_file, "tiny")
    if c.stage == "tgir":
        root = write_fashioniq(tmp_path / "fiq")
        (root / "vocab.txt").write_text("\n".join(["[PAD]", *SYMBOL_TOKENS, "[UNK]", "[CLS]",
                                                   "[SEP]", "[MASK]", *WORDS]) + "\n")
    else:
        root = write_release(tmp_path / "fg", n_train=12, n_val=8)
    c.data.data_dir = str(root)
    c.data.lexicon = "none"  # no WordNet files on the test machine
    c.model.vocab_size = 0
    c.train.update(global_batch_size=4, max_steps=2, log_every=1)
    c.loss.queue_size = 32
    c.eval.update(batch_size=8, sample100_queries=5, sample100_negatives=3, sample100_draws=2)
    results = trainer.run(c, str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "checkpoints" / "2").is_dir()
    # model.dtype=auto is resolved for this platform, logged, and saved resolved.
    dtype = resolve_dtype("auto")[0]
    out = capsys.readouterr().out
    assert f"model.dtype=auto: {dtype} (" in out
    assert "model.matmul_precision=auto: default (CPU" in out
    saved = json.loads((tmp_path / "wd" / "config.json").read_text())["model"]
    assert saved["dtype"] == dtype and saved["matmul_precision"] == "default"
    criterion = json.loads((tmp_path / "wd" / "eval_results.json").read_text())["criterion"]
    assert criterion == ("tgir/select" if c.stage == "tgir" else "full/sum")
    assert np.isfinite(results[criterion])


def test_the_job_runs_at_the_configured_matmul_precision(data_dir, tmp_path, monkeypatch):
    """The whole job (its steps and evaluations) is traced under model.matmul_precision, and JAX's
    own setting is left as it was."""
    import jax

    seen = []
    monkeypatch.setattr(trainer, "_train", lambda *a: seen.append(
        jax.config.jax_default_matmul_precision))
    before = jax.config.jax_default_matmul_precision
    for precision, expected in (("float32", "float32"), ("auto", before)):
        c = tiny("demo.py", data_dir, 1)
        c.model.matmul_precision = precision
        trainer.run(c, str(tmp_path / precision))
        assert seen[-1] == expected and c.model.matmul_precision != "auto"
    assert jax.config.jax_default_matmul_precision == before


def test_evaluate_by_default_writes_beside_the_run_without_touching_its_results(stage1):
    workdir, c, results = stage1
    before = (workdir / "eval_results.json").read_text()
    evaluate.evaluate(c.copy_and_resolve_references(), workdir, log=lambda *_: None)
    assert (workdir / "eval_results.json").read_text() == before
    written = json.loads((workdir / "evaluation" / "step_10" / "eval_results.json").read_text())
    assert written["results"] == pytest.approx(results)


def test_default_evaluation_folders_keep_each_kind_of_evaluation_apart():
    c = config_lib.tiny_config()
    assert evaluate.default_out_name(c, 10) == "step_10"
    assert evaluate.default_out_name(c, None) == "weights"
    c.eval.itm_rerank_k = 16
    assert evaluate.default_out_name(c, 10) == "step_10_itm_rerank16"
    c.stage = "tgir"
    assert evaluate.default_out_name(c, 10) == "step_10_tgir"


def test_compilation_cache_is_written_and_read_by_a_second_process(tmp_path):
    """train.compilation_cache: the first process writes its compiled program, a second one
    loads it; "" leaves the cache off; a cache named by the environment wins."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from fine_jax import trainer\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "print('CACHE', trainer.enable_compilation_cache(sys.argv[1]))\n"
        "f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())\n"
        "print('VALUE', float(f(jnp.arange(12.0).reshape(3, 4))))\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = str(REPO)

    def run(folder, extra_env=None):
        out = subprocess.run([sys.executable, "-c", script, folder], capture_output=True,
                             text=True, env={**env, **(extra_env or {})}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    cache = tmp_path / "xla"
    first = run(str(cache))
    assert f"CACHE {cache}" in first and any(cache.iterdir())
    files = sorted(p.name for p in cache.iterdir())
    second = run(str(cache))
    assert sorted(p.name for p in cache.iterdir()) == files  # read, nothing new compiled
    assert first.splitlines()[-1] == second.splitlines()[-1]
    assert "CACHE None" in run("")
    other = tmp_path / "env"
    assert f"CACHE {other}" in run(str(cache), {"JAX_COMPILATION_CACHE_DIR": str(other)})


def test_mlm_overflow_on_the_host_runs_the_every_position_step(data_dir, tmp_path, capsys):
    """loss.mlm_overflow=host: a batch with more MLM targets than the gathered buffer runs a
    second, every-position step, with the loss the in-step conditional computes."""
    runs = {}
    for where in ("step", "host"):
        c = tiny("demo.py", data_dir, 2, deterministic=True)
        c.init.vit_pretrain_steps = 0
        c.eval.at_end = False
        c.loss.update(mlm_overflow=where, mlm_max_fraction=0.01)  # 4 rows: every batch overflows
        trainer.run(c, str(tmp_path / where))
        runs[where] = read_metrics(tmp_path / where)[0]
        out = capsys.readouterr().out
        assert out.count("such batches run the every-position MLM step") == (where == "host")
    for step in (1, 2):
        for key in ("loss", "loss_mlm", "loss_itm", "grad_norm"):
            assert runs["host"][step][key] == pytest.approx(runs["step"][step][key], rel=1e-5), key


def test_mlm_overflow_is_checked():
    c = config_lib.tiny_config()
    c.loss.mlm_overflow = "device"
    with pytest.raises(config_lib.ConfigError, match="loss.mlm_overflow='device': use step or host"):
        config_lib.validate(c)
