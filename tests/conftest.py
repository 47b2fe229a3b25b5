"""Shared pytest fixtures."""
import json
import os
import pathlib

import pytest

# Tests run on CPU; keep XLA from grabbing every core's worth of threads per test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
