"""Shared pytest fixtures."""
import json
import os
import pathlib

import pytest

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' models are tiny: compiling their steps is most of the suite's time, and XLA's backend
# optimisations roughly double it while buying nothing at these sizes. XLA's older elemental emitter
# compiles the tiny step about a fifth faster than its fusion emitters, and the hundreds of small
# programs of an eager model init about twice as fast. Subprocesses inherit these flags.
_FAST_COMPILE = (" --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                 " --xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + _FAST_COMPILE


def pytest_configure(config):
    """A compilation cache shared by the tests of one run: many tests build the same tiny step,
    and compiling it is most of their time. Subprocesses the tests start inherit it."""
    import tempfile

    import jax

    config.addinivalue_line("markers", "fault_tolerance: jobs stopped by signals, kills and "
                            "faults, restarted in real processes (tests/test_resume.py)")

    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if cache is None:  # made here (the xdist workers inherit it): removed when the run ends
        cache = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
            prefix="fine_jax_test_xla_cache_")
        config._fine_jax_cache_dir = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The slowest files, slowest first (measured with --durations). pytest-xdist hands whole files to
# its workers in collection order, so starting the long ones first keeps one worker from running a
# long file alone at the end while the other idles.
SLOWEST_FIRST = ("test_train_step.py", "test_train_job.py", "test_resume.py", "test_parallel.py",
                 "test_speed_options.py", "test_stages.py", "test_convert.py",
                 "test_multiprocess.py", "test_notebook.py", "test_flops.py",
                 "test_data_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


def pytest_unconfigure(config):
    import shutil

    cache = getattr(config, "_fine_jax_cache_dir", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to the reference files in ../shared/data; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def reference_state_dict_shapes(shared_data):
    """{layout: {key: shape}} of the reference PyTorch models at the reference size."""
    return json.loads((shared_data / "reference_state_dict_shapes.json").read_text())


@pytest.fixture
def ref_tok(shared_data):
    """fine_jax's tokenizer on the reference vocab."""
    from fine_jax.data.text import Tokenizer

    return Tokenizer.from_vocab_file(shared_data / "vocab.txt")


@pytest.fixture
def hf_tok(shared_data):
    """transformers' BertTokenizer on the reference vocab, the symbols registered as special."""
    transformers = pytest.importorskip("transformers")
    from fine_jax.data.text import SYMBOL_TOKENS

    with open(shared_data / "vocab.txt", encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    # transformers 5.x: BertTokenizer(vocab_file=...) maps everything to [UNK]; vocab= works.
    tok = transformers.BertTokenizer(vocab=vocab)
    assert tok.add_tokens(list(SYMBOL_TOKENS), special_tokens=True) >= 0
    assert len(tok) == len(vocab)  # the symbols replace [unused0-8]: no new ids
    return tok
