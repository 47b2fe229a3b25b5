"""The main job end to end on a tiny synthetic set: metrics, checkpoints, exact resume, evaluation,
and the clear errors for a missing dataset and an impossible config."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fine_jax import config as config_lib
from fine_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))

EVAL_KEYS = ["full/i2t_r1", "full/i2t_r5", "full/i2t_r10", "full/t2i_r1", "full/t2i_r5",
             "full/t2i_r10", "sample100/i2t_r1", "sample100/i2t_r5", "sample100/i2t_r10",
             "sample100/t2i_r1", "sample100/t2i_r5", "sample100/t2i_r10", "twin/i2t_acc",
             "twin/t2i_acc"]


def tiny_demo_config(data_dir, max_steps):
    import demo

    c = demo.get_config()
    c.data.data_dir = str(data_dir)
    c.data.synthetic_train_products = 40
    c.data.synthetic_eval_products = 20
    c.data.synthetic_views = 2
    c.model.update(dict(vision_width=32, hidden_size=32, intermediate_size=64, vision_heads=2,
                        num_heads=2, embed_dim=32, vision_depth=1, num_layers=2, fusion_layer=1,
                        patch_size=16))
    c.data.max_len = 40
    c.train.global_batch_size = 8
    c.loss.queue_size = 32
    c.train.max_steps = max_steps
    c.init.vit_pretrain_steps = 2  # the warm-start runs once; a resume must not repeat it
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.eval.batch_size = 16
    return c


def read_metrics(workdir):
    rows = [json.loads(l) for l in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def test_train_resume_and_evaluate(tmp_path, data_dir, capsys):
    # Uninterrupted: 6 steps.
    straight = tmp_path / "straight"
    results = train.run(tiny_demo_config(data_dir, 6), str(straight))
    out = capsys.readouterr().out
    assert "step 6/6" in out and "ex/s" in out and "ETA" in out and "itc" in out
    assert (straight / "checkpoints" / "6").is_dir()
    assert list((straight / "tb").iterdir()), "no TensorBoard event file"
    on_disk = json.loads((straight / "eval_results.json").read_text())
    for key in EVAL_KEYS:
        assert key in on_disk and 0.0 <= on_disk[key] <= 100.0, key
    assert on_disk == pytest.approx(results)
    assert (straight / "sample100_candidates.json").is_file()

    # Interrupted after 4 steps, then resumed in the same workdir up to 6.
    resumed = tmp_path / "resumed"
    train.run(tiny_demo_config(data_dir, 4), str(resumed))
    assert (resumed / "checkpoints" / "4").is_dir()
    assert "ViT warm-start 2/2" in capsys.readouterr().out
    train.run(tiny_demo_config(data_dir, 6), str(resumed))
    out = capsys.readouterr().out
    assert "resumed from" in out and "ViT warm-start" not in out
    a, b = read_metrics(straight), read_metrics(resumed)
    for step in (5, 6):
        for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_sym"):
            np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-4,
                                       err_msg=f"{key} at step {step} differs after resume")


def test_reference_config_without_data_stops_with_one_message(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "fine_jax.train", "--config=configs/fashiongen.py",
         f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={tmp_path / 'nowhere'}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "fashiongen_256_256_train.h5" in proc.stderr
    assert "--config.data.data_dir" in proc.stderr


def test_queue_not_divisible_by_global_batch_is_a_clear_error():
    c = config_lib.tiny_config()
    c.loss.queue_size = 1020
    with pytest.raises(config_lib.ConfigError, match="queue_size=1020 is not divisible"):
        config_lib.validate(c)
    c = config_lib.base_config()
    config_lib.validate(c)  # the reference configuration itself is valid
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 3 devices"):
        config_lib.validate(c, num_devices=3)
