"""Batch invariance: a sample's result must not depend on the batch it is computed in.

For each layout of :data:`INVARIANCE_LAYOUTS` (float32, per-channel scale), sample 0 with
its own cotangent is computed alone (batch 1), then as the first sample of batches of
:data:`BATCH_SIZES` next to ordinary random samples, and next to samples holding an
all-zero pixel, a pixel whose float32 squares overflow (1e25) and one whose squares
underflow (1e-25): the inputs that send a layer down special paths. Its output and input
gradient must be bitwise identical to the batch-1 ones.

Differences are reported as the output's distance in float32 ULPs and the input
gradient's in float32 machine epsilons relative to the slice's terms (the conformance
gradient measure: an elementwise ULP count of a gradient that cancels to nearly zero
would measure the cancellation). A backend may declare ``batch_invariance_ulps``, a bound
on both, for its framework's own code generation when the batch size changes (XLA
compiles a program per shape); changing the neighbours at the same batch size must stay
bitwise whatever it declares, since nothing but the library's own logic can explain that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from l2norm.conformance._measures import gradient_error, gradient_magnitudes
from l2norm.core.spec import Spec

if TYPE_CHECKING:
    from l2norm.conformance._registry import Backend

#: (label, shape, axis): small SSD-like feature maps, NCHW over axis 1 and NHWC over -1.
INVARIANCE_LAYOUTS: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("NCHW", (16, 32, 5, 5), 1),
    ("NHWC", (16, 5, 5, 32), -1),
)
BATCH_SIZES: tuple[int, ...] = (1, 3, 8, 16)
#: Pixel (index into the spatial grid) -> what the whole channel vector there becomes.
HOSTILE_PIXELS: tuple[tuple[tuple[int, int], str, float], ...] = (
    ((0, 0), "zero", 0.0),
    ((2, 3), "huge", 1e25),  # float32 squares overflow
    ((4, 1), "tiny", 1e-25),  # float32 squares underflow
)


@dataclass
class InvarianceResult:
    """How one backend's sample 0 moved across batches.

    Attributes:
        forward_ulps: the largest distance, in float32 ULPs, of sample 0's output in any
            batch from the batch-1 output.
        grad_eps: the same for its input gradient, in float32 machine epsilons relative
            to the slice's terms.
        bitwise: every batch gave bit-identical output and gradient.
        tolerance: the backend's declared ``batch_invariance_ulps``.
        failures: what went wrong, one line each (empty when passed).
    """

    backend: str
    forward_ulps: float = 0.0
    grad_eps: float = 0.0
    bitwise: bool = True
    tolerance: float = 0.0
    note: str = ""
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures and self.error is None


def ulp_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The largest distance between float32 arrays in units in the last place (the count
    of float32 numbers between them); inf when one side is NaN and the other not."""
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    if a.shape != b.shape:
        return float("inf")
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return float("inf")

    def ordered(v: np.ndarray) -> np.ndarray:
        # Sign-magnitude bits to a monotone integer line (-0.0 and +0.0 both map to 0).
        i = v.view(np.int32).astype(np.int64)
        return np.where(i < 0, np.int64(-(2**31)) - i, i)

    diff = np.abs(ordered(a) - ordered(b))
    diff = np.where(nan_a, 0, diff)
    return float(diff.max(initial=0))


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


def _sample_first(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)[:1]


def batch_inputs(
    layout: int, batch: int, hostile: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(x, scale, cotangent, axis)`` of one batch: sample 0 is the same in every batch of a
    layout; the other samples are random, and with ``hostile`` hold the
    :data:`HOSTILE_PIXELS`."""
    _, shape, axis = INVARIANCE_LAYOUTS[layout]
    channels = shape[axis]
    rng = np.random.default_rng(7_000 + layout)
    sample = rng.standard_normal((1, *shape[1:])) * 3.0
    sample_g = rng.standard_normal((1, *shape[1:]))
    scale = rng.uniform(0.5, 20.0, channels)
    # The neighbours depend on the batch size only: hostile and random batches of one size
    # differ exactly in the hostile pixels.
    others = np.random.default_rng(8_000 + 100 * layout + batch)
    x = np.concatenate([sample, others.standard_normal((batch - 1, *shape[1:])) * 3.0])
    g = np.concatenate([sample_g, others.standard_normal((batch - 1, *shape[1:]))])
    if hostile and batch > 1:
        for (h, w), _, value in HOSTILE_PIXELS:
            index = (slice(1, None), slice(None), h, w) if axis == 1 else (slice(1, None), h, w)
            x[index] = value if value == 0.0 else x[index] * value
    return x.astype(np.float32), scale.astype(np.float32), g.astype(np.float32), axis


def check_batch_invariance(backend: Backend) -> InvarianceResult:
    """Run the batch-invariance check (see the module docstring) on one backend."""
    result = InvarianceResult(
        backend.name, tolerance=backend.batch_invariance_ulps, note=backend.batch_invariance_note
    )
    if "float32" not in backend.dtypes:
        result.error = "the backend does not support float32"
        return result
    try:
        for layout, (label, _, _) in enumerate(INVARIANCE_LAYOUTS):
            _check_layout(backend, layout, label, result)
    except Exception as err:  # a crash is a failure, reported with its message
        result.error = repr(err)
    return result


def _run(backend: Backend, layout: int, batch: int, hostile: bool) -> tuple:
    x, scale, g, axis = batch_inputs(layout, batch, hostile)
    options = {"axis": axis}
    with np.errstate(all="ignore"):
        y = np.asarray(backend.forward(x, scale, dict(options)))
        dx, _ = backend.vjp(x, scale, g, dict(options))
    return _sample_first(y), _sample_first(dx)


def _check_layout(backend: Backend, layout: int, label: str, result: InvarianceResult) -> None:
    alone = _run(backend, layout, 1, False)
    x, scale, g, axis = batch_inputs(layout, 1, False)
    magnitude, _ = gradient_magnitudes(x, scale, g, Spec.create(axis=axis))
    f32 = np.dtype(np.float32)

    def grad_distance(a: np.ndarray, b: np.ndarray) -> float:
        if np.isnan(a).any() != np.isnan(b).any():
            return float("inf")
        return gradient_error(a, b, magnitude, None, None, None, f32, False)

    for batch in BATCH_SIZES[1:]:
        runs = {hostile: _run(backend, layout, batch, hostile) for hostile in (False, True)}
        for hostile, (y, dx) in runs.items():
            where = f"{label} batch {batch}" + (", hostile neighbours" if hostile else "")
            fwd, grad = ulp_distance(y, alone[0]), grad_distance(dx, alone[1])
            result.forward_ulps = max(result.forward_ulps, fwd)
            result.grad_eps = max(result.grad_eps, grad)
            same = _bits_equal(y, alone[0]) and _bits_equal(dx, alone[1])
            result.bitwise &= same
            if not same and max(fwd, grad) > backend.batch_invariance_ulps:
                result.failures.append(
                    f"{where}: output {fwd:g} ULP, input gradient {grad:.3g} eps from batch 1 "
                    f"(tolerance {backend.batch_invariance_ulps:g})"
                )
        # The neighbours alone changed: no reduction order can explain a difference.
        (y, dx), (yh, dxh) = runs[False], runs[True]
        if not (_bits_equal(y, yh) and _bits_equal(dx, dxh)):
            result.failures.append(
                f"{label} batch {batch}: hostile neighbours changed sample 0 (output "
                f"{ulp_distance(y, yh):g} ULP, input gradient {grad_distance(dx, dxh):.3g} eps)"
            )
