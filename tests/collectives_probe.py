"""Run as a script on 4 simulated CPU devices (``tests/test_parallel.py`` starts it): compiles the
stage-1 step on a ``data=4`` mesh with each batch semantics and prints, as JSON, the shapes of the
arrays its all-gathers produce.

    python tests/collectives_probe.py
"""
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import optax  # noqa: E402

from fine_jax import config as config_lib  # noqa: E402
from fine_jax import parallel, stages  # noqa: E402
from fine_jax.config import tiny_config  # noqa: E402
from fine_jax.models.fine import FashionFINE  # noqa: E402
from fine_jax.stages.common import create_state  # noqa: E402
from test_train_step import make_batch  # noqa: E402

BG = 16
_GATHER = re.compile(r"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? all-gather(?:-start)?\(")


def gathered_shapes(per_group: bool) -> list[str]:
    cfg = tiny_config(vocab_size=256, image_size=32, vision_depth=1, num_layers=2,
                      fusion_layer=1, intermediate_size=128, embed_dim=64)
    cfg.data.max_len = 16
    cfg.train.global_batch_size = BG
    cfg.loss.queue_size = 4 * BG
    model = FashionFINE(config_lib.model_config(cfg))
    loss_cfg = config_lib.loss_config(cfg)
    optimizer = optax.sgd(0.1)
    stage = stages.get("pretrain")
    mesh = parallel.make_mesh(4, 1)
    step = stage.make_step(model, optimizer, loss_cfg, 10,
                           groups=parallel.Groups(mesh, per_group=per_group))
    init = lambda r: create_state(model, optimizer, r, stage.make_queues(loss_cfg, 64))  # noqa
    jinit, abstract = parallel.sharded_init(init, mesh, 1 << 30, jax.random.PRNGKey(0))
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract)
    repl = parallel.replicated(mesh)
    jstep = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                    out_shardings=(shardings, repl))
    batch = parallel.global_batch(make_batch(cfg, 0), mesh)
    text = jstep.lower(jinit(jax.random.PRNGKey(0)), batch, jax.random.PRNGKey(1)).compile().as_text()
    return [m.group(1) for line in text.splitlines() if "all-gather" in line
            for m in [_GATHER.search(line)] if m]


if __name__ == "__main__":
    print("RESULT " + json.dumps({"per_group": gathered_shapes(True),
                                  "global": gathered_shapes(False)}))
