"""Shared test configuration: hypothesis profiles; without a GPU, Triton's interpreter
switched on (the Triton lowering's tests run on CPU tensors), then Triton loaded before any
test imports TensorFlow (:mod:`l2norm.tensorflow._preload` says why).

``HYPOTHESIS_PROFILE=thorough`` for a long local run; CI uses the bounded, deterministic
default ("ci"). Every test starts from generators seeded by its own id (:func:`_seeded`), so
an unseeded draw (``torch.randn``, ``np.random.rand``) gives the same data in every run and
whatever ran before it.
"""

import os
import random
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from l2norm.testing.frameworks import triton_interpreter_without_gpu

triton_interpreter_without_gpu()
import l2norm.tensorflow._preload  # noqa: E402, F401  (after the interpreter switch: it imports triton)

settings.register_profile(
    "ci",
    max_examples=30,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """Seed Python's, NumPy's and (if loaded) torch's global generators from the test id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the legacy global generator is what it seeds)
    torch = sys.modules.get("torch")  # no framework import here: a test that needs it has it
    if torch is not None:
        torch.manual_seed(seed)
