"""Shared fixtures: quiet TensorFlow, the real metadata location, tiny generated data."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_ZSL = Path(os.environ.get("MSDN_SHARED_DATA", REPO.parent / "shared" / "data" / "zsl"))


TORCH_FIXTURES = str(REPO / "tests" / "fixtures")


def torch_fixture(stem: str) -> str:
    """Path of a tiny .pth fixture written once by real PyTorch (tests/fixtures/make_torch_fixtures.py)."""
    return os.path.join(TORCH_FIXTURES, stem + ".pth")


@pytest.fixture(scope="module")
def expected():
    """The exact values of every tensor in the .pth fixtures."""
    with np.load(os.path.join(TORCH_FIXTURES, "tiny_msdn_expected.npz")) as npz:
        return {k: npz[k] for k in npz.files}


def shared_zsl_dir() -> Path:
    """The real CUB/SUN/AWA2 metadata, or skip: it is provided beside the checkout in CI only."""
    if not SHARED_ZSL.is_dir():
        pytest.skip(f"real zsl metadata not found at {SHARED_ZSL}; CI provides ../shared "
                    "(set MSDN_SHARED_DATA to point elsewhere)")
    return SHARED_ZSL


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tiny_problem(rng, B=4, R=6, F=10, K=5, D=4, C=7, unseen=(3, 6)):
    """Random non-zero weights and inputs of a tiny MSDN (channel-first features like the reference)."""
    seen = [c for c in range(C) if c not in unseen]
    mask_bias = -np.ones((1, C))
    mask_bias[0, list(unseen)] = 1.0
    return {
        "fmap_bfr": rng.random((B, F, R)) + 0.05,
        "V": rng.normal(size=(K, D)),
        "W_1": rng.normal(scale=0.7, size=(D, F)),
        "W_2": rng.normal(scale=0.7, size=(D, F)),
        "W_1_1": rng.normal(scale=0.7, size=(F, D)),
        "W_2_1": rng.normal(scale=0.7, size=(D, F)),
        "att": rng.random((C, K)),
        "labels": rng.choice(seen, size=B),
        "seen": seen,
        "unseen": list(unseen),
        # The margin (docs/reference.md §2): random and non-zero, so that every term sees it.
        "bias": float(rng.uniform(0.3, 1.7)),
        "mask_bias": mask_bias,
    }
