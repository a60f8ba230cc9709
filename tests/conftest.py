"""Shared fixtures: tiny random models built in-process (no downloads)."""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads spin by default; on a shared 2-core machine that makes tiny models 5-10x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated.*")

import pytest  # noqa: E402
import torch  # noqa: E402
from testkit import DEVICE, random_model, random_tokens  # noqa: E402,F401  (the fixtures below use them)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per pytest-xdist worker (and for the subprocesses its tests start): two workers
    # on two cores, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture
def device() -> torch.device:
    """The device of the device tier's models (CIRCUITCTL_TEST_DEVICE, default cpu)."""
    return DEVICE


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (use with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    the models are tiny, and on a shared 2-core machine multi-threaded small matmuls are far
    slower than single-threaded ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ln_mlp_model():
    return random_model(0)


@pytest.fixture
def attn_only_model():
    return random_model(1, attn_only=True, normalization_type=None, n_layers=3)


TIERS = ("unit", "ground_truth", "cli", "browser")  # tests/<tier>/: marked with the tier's name


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (its directory): `-m unit`, `-m "not cli"`, ...; the ground-truth
    tier, which exercises the models, is also the device tier (`-m device`)."""
    cuda_missing = DEVICE.type == "cuda" and not torch.cuda.is_available()
    for item in items:
        parts = item.path.parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "ground_truth" in parts:
            item.add_marker(pytest.mark.device)
            if cuda_missing:
                item.add_marker(pytest.mark.skip(reason="CIRCUITCTL_TEST_DEVICE=cuda but CUDA is not available"))
