"""Error measures and :func:`run_case`: one backend on one case against the reference.

The measures are described in the :mod:`l2norm.conformance` docstring.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from l2norm import reference
from l2norm.conformance._cases import Case, numpy_dtype
from l2norm.core import oracle as _oracle
from l2norm.core.spec import Spec

if TYPE_CHECKING:
    from l2norm.conformance._registry import Backend


@dataclass
class CaseResult:
    """How one backend did on one case."""

    case: Any
    backend: str
    forward_ulps: float
    grad_eps: float
    nonfinite: int
    passed: bool
    error: str | None = None


def _finfo(dtype: np.dtype) -> Any:
    return ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)


def ulp(values: np.ndarray, dtype: np.dtype, floor_normal: bool = False) -> np.ndarray:
    """The ULP of ``dtype`` at each of ``values`` (float64), at least the ULP of the
    smallest subnormal, or the smallest normal number with ``floor_normal``."""
    info = _finfo(dtype)
    smallest_exponent = int(info.minexp)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(values)))
    exponent = np.where(np.isfinite(exponent), exponent, smallest_exponent)
    exponent = np.maximum(exponent, smallest_exponent)
    result = np.ldexp(1.0, (exponent - info.nmant).astype(np.int64))
    if floor_normal:
        result = np.maximum(result, float(info.smallest_normal))
    return result


def nonfinite_mismatches(got: np.ndarray, want: np.ndarray) -> int:
    """How many elements are NaN on one side only, or Inf on one side (or of the other
    sign); NaN against NaN passes."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64).reshape(got.shape)
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    bad = got_nan != want_nan
    both_finite_or_inf = ~got_nan & ~want_nan
    bad |= both_finite_or_inf & (np.isinf(got) | np.isinf(want)) & (got != want)
    return int(np.count_nonzero(bad))


def round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` rounded to ``dtype`` and back to float64 (how a reference in float64 is
    compared with a result in ``dtype``)."""
    with np.errstate(over="ignore"):
        return np.asarray(values).astype(dtype).astype(np.float64)


def forward_error(got: np.ndarray, want: np.ndarray, dtype: np.dtype, flushes: bool) -> float:
    """Max ULP distance over the elements where the reference is finite."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want) & np.isfinite(got)
    if not finite.any():
        return 0.0
    diff = np.abs(got[finite] - want[finite]) / ulp(want[finite], dtype, flushes)
    return float(diff.max())


def gradient_error(
    dx: np.ndarray,
    dx_ref: np.ndarray,
    dx_magnitude: np.ndarray,
    dscale: np.ndarray | None,
    dscale_ref: np.ndarray | None,
    dscale_magnitude: np.ndarray | None,
    dtype: np.dtype,
    flushes: bool,
) -> float:
    """Max gradient error in machine epsilons of ``dtype``.

    ``dx_magnitude`` (broadcastable to ``dx``) is each slice's ``max |scale * g| / d(n)``,
    the size of the terms the backward adds up; ``dscale_magnitude`` is each channel's
    ``sum |g * x / d(n)|``. Errors are measured relative to those, so a result that
    cancels to nearly zero is held to what any backward-stable computation can give.
    """
    info = _finfo(dtype)
    eps = float(info.eps)
    # Below the smallest normal number, relative error loses meaning: one subnormal step
    # counts as one eps (and a flushed subnormal as one eps for a flushing backend).
    floor = float(info.smallest_normal) / (eps if flushes else 1.0)
    worst = _relative_error(dx, dx_ref, dx_magnitude, floor)
    if dscale_ref is not None:
        worst = max(worst, _relative_error(dscale, dscale_ref, dscale_magnitude, floor))
    return worst / eps


def _relative_error(got, want, magnitude, floor: float) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64).reshape(got.shape)
    magnitude = np.broadcast_to(np.asarray(magnitude, dtype=np.float64), want.shape)
    finite = np.isfinite(want) & np.isfinite(got)
    # Where the reference is exactly right to within the dtype's smallest step, allow it.
    allowed = np.where(np.isfinite(magnitude), np.maximum(magnitude, floor), floor)
    rel = np.where(finite, np.abs(got - want), 0.0) / allowed
    return float(np.max(rel, initial=0.0))


def gradient_magnitudes(
    x: np.ndarray, scale: np.ndarray | None, g: np.ndarray, spec: Spec
) -> tuple[np.ndarray, np.ndarray | None]:
    """The term sizes :func:`gradient_error` measures against, in float64."""
    axes = spec.resolve(x.ndim)
    x64 = x.astype(np.float64)
    g64 = np.abs(g.astype(np.float64))
    sigma = g64 if scale is None else g64 * np.abs(_oracle._scale_full(scale, x, axes))
    d = reference.denominator(x64, spec)
    dx_magnitude = np.max(sigma, axis=axes.norm, keepdims=True) / d
    if scale is None:
        return dx_magnitude, None
    gu = g64 * np.abs(reference.forward(x64, None, spec))
    dscale_magnitude = np.sum(gu) if scale.size == 1 else np.sum(gu, axis=axes.reduced)
    return dx_magnitude, np.asarray(dscale_magnitude).reshape(-1)


def _expected(case: Any, oracle: bool) -> tuple:
    """The case's inputs and what the reference (or the oracle) says about them."""
    x, scale, g = case.inputs()
    spec = Spec.create(**case.options)
    dtype = numpy_dtype(case.dtype)
    truth = _oracle if oracle else reference
    with np.errstate(all="ignore"):
        # Rounded to the case's dtype: where the exact value overflows it, Inf is right.
        y_ref = round_to(truth.forward(x, scale, spec), dtype)
        dx_ref, dscale_ref = truth.vjp(x, scale, g, spec)
        # The input gradient saturates at the dtype's largest finite value rather than
        # overflow (reference.saturate: an all-zero float16 pixel must not stop training).
        dx_ref = reference.saturate(dx_ref, dtype).astype(np.float64)
        if dscale_ref is not None:
            dscale_ref = round_to(dscale_ref, dtype)
        dx_magnitude, dscale_magnitude = gradient_magnitudes(x, scale, g, spec)
    return x, scale, g, y_ref, dx_ref, dscale_ref, dx_magnitude, dscale_magnitude


# Every backend is measured on the same cases: compute each case's expectations once.
_expected_cached = functools.lru_cache(maxsize=2048)(_expected)


def run_case(backend: Backend, case: Case) -> CaseResult:
    """Run one case through one backend and measure it against the reference (or oracle).

    ``case`` is a :class:`Case`, or any object with its ``inputs()``, ``options`` and
    ``dtype`` (a test may draw its own inputs).
    """
    oracle = backend.compare_to_oracle
    expected = _expected_cached(case, oracle) if isinstance(case, Case) else _expected(case, oracle)
    x, scale, g, y_ref, dx_ref, dscale_ref, dx_magnitude, dscale_magnitude = expected
    dtype = numpy_dtype(case.dtype)
    # Copies: the cached arrays must survive a backend that writes into its inputs.
    scale_in = None if scale is None else scale.copy()
    try:
        with np.errstate(all="ignore"):
            y = np.asarray(backend.forward(x.copy(), scale_in, dict(case.options)))
            dx, dscale = backend.vjp(x.copy(), scale_in, g.copy(), dict(case.options))
    except Exception as err:  # a crash is a failure, reported with its message
        return CaseResult(case, backend.name, math.inf, math.inf, 0, False, repr(err))
    problems = []
    if y.shape != x.shape or y.dtype != x.dtype:
        problems.append(f"forward returned {y.dtype}{y.shape}, expected {x.dtype}{x.shape}")
    dx = np.asarray(dx)
    if dx.shape != x.shape:
        problems.append(f"dx has shape {dx.shape}, expected {x.shape}")
    if (dscale is None) != (scale is None):
        problems.append("dscale is None exactly when scale is None")
    if problems:
        return CaseResult(case, backend.name, math.inf, math.inf, 0, False, "; ".join(problems))
    with np.errstate(all="ignore"):
        fwd = forward_error(y, y_ref, dtype, backend.flushes_subnormals)
        grad = gradient_error(
            dx,
            dx_ref,
            dx_magnitude,
            dscale,
            dscale_ref,
            dscale_magnitude,
            dtype,
            backend.flushes_subnormals,
        )
        nonfinite = nonfinite_mismatches(y, y_ref) + nonfinite_mismatches(dx, dx_ref)
        if dscale is not None:
            nonfinite += nonfinite_mismatches(
                np.asarray(dscale).reshape(-1), np.asarray(dscale_ref).reshape(-1)
            )
    passed = (
        fwd <= backend.forward_ulps[case.dtype]
        and grad <= backend.grad_eps[case.dtype]
        and nonfinite == 0
    )
    return CaseResult(case, backend.name, fwd, grad, nonfinite, passed)
