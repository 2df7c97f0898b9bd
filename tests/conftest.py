"""Pytest fixtures; the helpers they use live in tests/helpers.py (one tiny demo, tiny weights, paths)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import TORCH_FIXTURES  # noqa: E402

try:  # property-based tests (tests/test_properties.py); hypothesis is in the dev extra
    from datetime import timedelta

    from hypothesis import HealthCheck, settings

    # msdn (default, `make test`): reproducible, a fixed number of examples, 5 s per example at most
    # (a parser that is exponential in its input blows far past it; a loaded machine does not).
    settings.register_profile(
        "msdn",
        max_examples=40,
        deadline=timedelta(seconds=5),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    # fuzz: a longer random hunt, MSDN_HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_properties.py
    settings.register_profile(
        "fuzz",
        max_examples=800,
        deadline=timedelta(seconds=5),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    settings.load_profile(os.environ.get("MSDN_HYPOTHESIS_PROFILE", "msdn"))
except ImportError:  # pragma: no cover - without the dev extra the property tests are skipped
    pass


@pytest.fixture(scope="module")
def expected():
    """The exact values of every tensor in the .pth fixtures."""
    with np.load(os.path.join(TORCH_FIXTURES, "tiny_msdn_expected.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
