"""Shared test configuration: hypothesis profiles; without a GPU, Triton's interpreter
switched on (the Triton lowering's tests run on CPU tensors), then Triton loaded before any
test imports TensorFlow (:mod:`l2norm._preload` says why).

``HYPOTHESIS_PROFILE=thorough`` for a long local run; CI uses the bounded, deterministic
default ("ci").
"""

import os

from hypothesis import HealthCheck, settings

from l2norm.testing.frameworks import triton_interpreter_without_gpu

triton_interpreter_without_gpu()
import l2norm._preload  # noqa: E402, F401  (after the interpreter switch: it imports triton)

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
