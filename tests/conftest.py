"""Pytest fixtures; the helpers they use live in tests/helpers.py (one tiny demo, tiny weights, paths)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import TORCH_FIXTURES  # noqa: E402


@pytest.fixture(scope="module")
def expected():
    """The exact values of every tensor in the .pth fixtures."""
    with np.load(os.path.join(TORCH_FIXTURES, "tiny_msdn_expected.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
