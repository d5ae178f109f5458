"""What tests of exported graphs share (tests/test_export.py for torch and ONNX,
tests/test_keras.py for TFLite and SavedModel): hostile inputs and the measure of the
exported formula's guarantee, :func:`l2norm.core.portable.forward_ulps` against the oracle."""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np

from l2norm.conformance._cases import Case, numpy_dtype
from l2norm.conformance._measures import forward_error, nonfinite_mismatches, round_to
from l2norm.core import oracle as _oracle
from l2norm.core.portable import forward_ulps
from l2norm.core.spec import Spec


def hostile_inputs(case_id: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``(x, scale, options)`` of a conformance case on hostile data (slices of zeros,
    squares that overflow, squares that underflow, subnormals, a NaN, ±Inf), with two
    more slices where there are enough: one of values near the dtype's largest, one
    ordinary slice holding the largest value itself."""
    case = Case.from_id(case_id)
    x, scale, _ = case.inputs()
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    axes = case.axes()
    rows = _oracle._rows(x.astype(np.float64), axes).copy()
    info = ml_dtypes.finfo(x.dtype) if x.dtype.name == "bfloat16" else np.finfo(x.dtype)
    top = float(info.max)
    if rows.shape[0] > 7:
        k = rows.shape[1]
        rows[6] = rng.uniform(0.25, 1.0, k) * top * rng.choice([-1, 1], k)
        rows[7, k // 3] = -top
    x = _oracle._unrows(rows, x, axes).astype(x.dtype)
    return x, scale, case.options


def exported_error(
    y: np.ndarray,
    x: np.ndarray,
    scale: np.ndarray | None,
    options: dict,
    flushes: bool = False,
) -> float:
    """The forward error of ``y`` in ULPs of ``x``'s dtype against the 60-digit oracle
    (NaN and Inf where the oracle has them, else an AssertionError), and assert it is
    within the exported graph's bound for this slice length.

    ``flushes``: the runtime reads subnormal numbers as zero and flushes subnormal results
    (TensorFlow's CPU kernels): the oracle gets the input as the runtime reads it and
    errors are measured with the smallest normal number as the floor of an ULP.
    """
    spec = Spec.create(**options)
    axes = spec.resolve(x.ndim)
    dtype = numpy_dtype(x.dtype.name)
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    if flushes:
        x = np.where(np.abs(x) < info.smallest_normal, np.zeros_like(x), x)
    with np.errstate(all="ignore"):
        want = round_to(_oracle.forward(x, scale, spec), dtype)
        y = np.asarray(y, np.float64)
        assert nonfinite_mismatches(y, want) == 0, (y, want)
        error = forward_error(y, want, dtype, flushes)
    bound = forward_ulps(dtype.name, math.prod(x.shape[a] for a in axes.norm))
    assert error <= bound, (error, bound)
    return error
