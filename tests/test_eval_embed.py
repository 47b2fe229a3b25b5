"""Data-parallel embedding: every device embeds its share of each batch, padding is dropped, and
the result equals the one-device result (8 simulated CPU devices in a subprocess)."""
import os
import subprocess
import sys

import numpy as np

from fine_jax import parallel
from fine_jax.eval.embed import Embedder, padded_batch_size

_SCRIPT = """
import numpy as np, jax
from fine_jax import parallel
from fine_jax.eval.embed import Embedder
assert jax.device_count() == 8
mesh = parallel.make_mesh()
emb = Embedder(mesh, batch_size=12)  # rounded up to 16, a multiple of the 8 devices
assert emb.batch_size == 16
rng = np.random.default_rng(0)
x = rng.normal(size=(37, 5)).astype(np.float32)
w = rng.normal(size=(5, 3)).astype(np.float32)
fn = lambda p, a: a @ p
seen = []
def batches():
    for s in range(0, 37, 10):  # host batches of 10, 10, 10, 7
        yield (x[s:s + 10],)
out = emb(fn, emb.params(w), batches())
np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-6)
print("EMBED_OK", out.shape)
"""


def test_embedder_on_one_device_drops_the_padding():
    mesh = parallel.make_mesh()
    emb = Embedder(mesh, batch_size=4)
    assert padded_batch_size(5, mesh) == 5 * 1
    x = np.arange(22, dtype=np.float32).reshape(11, 2)
    out = emb(lambda p, a, b: a.sum(-1) * p + b, emb.params(np.float32(2.0)),
              [(x[:6], np.ones(6, np.float32)), (x[6:], np.ones(5, np.float32))])
    np.testing.assert_allclose(out, x.sum(-1) * 2 + 1)


def test_embedder_on_eight_simulated_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "EMBED_OK (37, 3)" in proc.stdout, proc.stderr[-3000:]
