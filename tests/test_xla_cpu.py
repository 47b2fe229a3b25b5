"""The CPU lowering of random bits (fine_jax.xla_cpu): same bits, no loop.

Run in a fresh process: the lowering rule is process-wide, and the comparison needs JAX's own
lowering first.
"""
import json
import os
import subprocess
import sys

PROBE = r"""
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
from fine_jax import xla_cpu

key = jax.random.PRNGKey(7)
def draws(k):
    a, b = jax.random.split(k)
    x = jnp.ones((3, 17, 33))
    mask = nn.Dropout(0.1, deterministic=False).apply({}, x, rngs={"dropout": a})
    return (jax.random.bits(b, (5, 7)), jax.random.uniform(a, (4, 9)),
            jax.random.categorical(b, jnp.linspace(-1.0, 1.0, 11), shape=(6,)), mask)

def run():
    f = jax.jit(lambda k: draws(k))  # a new function: nothing cached from an earlier lowering
    text = f.lower(key).as_text()
    return [jnp.asarray(o).tolist() for o in f(key)], text.count("stablehlo.while")

before, loops_before = run()
applied = xla_cpu.unroll_threefry_on_cpu()
after, loops_after = run()
print(json.dumps({"applied": applied, "again": xla_cpu.unroll_threefry_on_cpu(),
                  "same": before == after, "loops_before": loops_before,
                  "loops_after": loops_after}))
"""


def test_unrolled_threefry_gives_the_same_bits_without_a_loop():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["applied"] and r["again"]
    assert r["same"], "the unrolled lowering changed the random bits"
    assert r["loops_before"] > 0, "JAX's default CPU lowering no longer loops: the switch is moot"
    assert r["loops_after"] == 0


def test_loop_keeps_jax_lowering_and_a_bad_value_is_named():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "FINE_JAX_THREEFRY": "loop"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert not r["applied"] and r["same"] and r["loops_after"] == r["loops_before"] > 0
    env["FINE_JAX_THREEFRY"] = "unroled"
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode != 0
    assert "FINE_JAX_THREEFRY='unroled': use unrolled or loop" in out.stderr
