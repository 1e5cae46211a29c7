"""Shared fixtures for the tests (assertions live in helpers.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

from helpers import fresh_seed

# Without a GPU the Triton kernels run on the CPU in Triton's interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every run draws fresh inputs (hypothesis' default); keep the example counts sized for a 2-core CI machine.
settings.register_profile("softxent", max_examples=40, deadline=None)
settings.load_profile("softxent")

# The backends every op test runs on ("triton" where the triton package is installed: the dev extra
# installs it).
IMPLS = ["torch", *(["triton"] if importlib.util.find_spec("triton") else [])]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    """The backend under test. On a CUDA machine the Triton kernels need CUDA tensors: a module whose
    tensors stay on the CPU (no module-level ``DEVICE = "cuda"``) skips its "triton" cases there."""
    on_cuda = getattr(request.module, "DEVICE", "cpu") == "cuda"
    if request.param == "triton" and torch.cuda.is_available() and not on_cuda:
        pytest.skip(
            "this module's tensors are on the CPU and impl='triton' runs on CUDA tensors here; "
            "the kernels' GPU tests are test_triton_*.py and test_lean.py"
        )
    return request.param


@pytest.fixture
def rng() -> torch.Generator:
    """A torch generator with a fresh seed each run (printed on failure); SOFTXENT_TEST_SEED replays one."""
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    print(f"torch generator seed: {seed}")  # shown by pytest when the test fails
    return generator
