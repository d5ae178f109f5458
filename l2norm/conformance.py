"""The conformance suite: one case list and one backend registry, framework-free.

``l2norm check`` and the test suite both run :func:`run_case` over :func:`cases`, so the
CLI and the tests can never disagree. Each adapter module registers its backend(s) with
:func:`register` when it is imported; the CLI imports the adapter modules listed in
:data:`ADAPTER_MODULES`.

Error measures (the tolerances are per backend and per dtype):

* forward: ``|y - y_ref| / ulp(y_ref)`` in the output dtype, maximised over the
  elements whose reference is finite. The ULP of the smallest subnormal floors the
  measure; a backend that flushes subnormals to zero (``flushes_subnormals``) is
  measured with the smallest normal number as the floor instead.
* gradients: ``|dx - dx_ref|`` divided by ``max |scale * g| / d(n)`` over the same
  slice, and ``|dscale - dscale_ref|`` divided by ``sum |g * x / d(n)|`` over the same
  channel, both in units of the dtype's machine epsilon: the backward adds terms of
  those sizes and may cancel them, so an elementwise ULP bound would measure the
  problem's conditioning, not the backend.
* non-finite mismatches: an element where the backend is NaN/Inf and the reference is
  not, or the other way round (NaN where the reference is NaN passes).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from l2norm import _oracle, reference
from l2norm._spec import EPS_MODES, FLOAT_DTYPES, PRESETS, Axes, Spec

__all__ = [
    "ADAPTER_MODULES",
    "Backend",
    "Case",
    "CaseResult",
    "backends",
    "cases",
    "get_backend",
    "register",
    "run_case",
]

#: The adapter modules the CLI imports; each registers its backends on import.
ADAPTER_MODULES: tuple[str, ...] = ("l2norm.torch", "l2norm.keras", "l2norm.jax")

Forward = Callable[[np.ndarray, "np.ndarray | None", dict], np.ndarray]
Vjp = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, dict], tuple]

#: Default bounds an adapter is held to: forward in ULPs of the output dtype,
#: gradients in machine epsilons relative to the slice (see the module docstring).
DEFAULT_FORWARD_ULPS = {"float16": 1.0, "bfloat16": 1.0, "float32": 4.0, "float64": 4.0}
DEFAULT_GRAD_EPS = {"float16": 2.0, "bfloat16": 2.0, "float32": 16.0, "float64": 16.0}


@dataclass(frozen=True)
class Backend:
    """A way to compute l2norm, checked against the reference.

    Attributes:
        name: the row label in ``l2norm check`` (``"torch"``, ``"keras-jax"``, ...).
        forward: ``forward(x, scale, options) -> y``; NumPy in, NumPy out; ``options``
            holds the keyword arguments of :func:`l2norm.l2_normalize`.
        vjp: ``vjp(x, scale, cotangent, options) -> (dx, dscale)``, NumPy in and out.
        forward_ulps / grad_eps: the bound per dtype.
        flushes_subnormals: measure forward errors with the smallest normal as floor.
        dtypes: the dtypes this backend supports.
        compare_to_oracle: compare with the exact decimal oracle instead of the reference
            (used by the reference itself).
    """

    name: str
    forward: Forward
    vjp: Vjp
    forward_ulps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FORWARD_ULPS))
    grad_eps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GRAD_EPS))
    flushes_subnormals: bool = False
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    compare_to_oracle: bool = False


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend in the registry and return it."""
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> dict[str, Backend]:
    """The registered backends, by name."""
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no backend named {name!r}; registered: {sorted(_REGISTRY)}") from None


def _reference_forward(x, scale, options):
    return reference.forward(x, scale, Spec.create(**options))


def _reference_vjp(x, scale, g, options):
    return reference.vjp(x, scale, g, Spec.create(**options))


# The reference is measured against the decimal oracle: within 1 ULP (it rounds once from
# a wider working precision), 2 for float64 where long double is no wider than double.
_FLOAT64_ULPS = 1.0 if reference._LONGDOUBLE_IS_WIDER else 4.0
register(
    Backend(
        name="numpy",
        forward=_reference_forward,
        vjp=_reference_vjp,
        forward_ulps={"float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": _FLOAT64_ULPS},
        grad_eps={"float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": 4.0},
        compare_to_oracle=True,
    )
)


# --------------------------------------------------------------------------- cases

#: (shape, axis, across_spatial): the layouts every option set is run on.
LAYOUTS: tuple[tuple[tuple[int, ...], Any, bool], ...] = (
    ((6, 8), -1, False),  # a plain batch of vectors
    ((2, 16, 3, 3), 1, False),  # NCHW, per pixel over C (SSD)
    ((2, 3, 3, 16), -1, False),  # NHWC
    ((3, 6, 7), 1, False),  # rank 3, channel axis in the middle
    ((2, 4, 3, 3), (1, 2), False),  # a tuple of axes; the first one is the channel axis
    ((6, 4, 3, 2), 1, True),  # Caffe across_spatial: one norm per sample
    # Many channels on a strided axis: kernels that add along it term after term lose
    # accuracy with its length. Run with a few option sets only (see cases()).
    ((2, 2048, 2, 2), 1, False),
)
#: The layouts every option set runs on; the others (the wide one) run WIDE_OPTION_SETS.
FULL_LAYOUTS = range(6)
WIDE_OPTION_SETS = ("default", "mode=add_sumsq")

#: Named option sets: the default, each eps placement, each preset, and a tiny eps that
#: leaves float32's underflowing squares outside the eps regime.
OPTION_SETS: dict[str, dict] = {
    "default": {},
    **{f"mode={m}": {"eps_mode": m} for m in EPS_MODES},
    **{f"preset={p}": {"preset": p} for p in PRESETS},
    "tiny-eps": {"eps_mode": "clamp_norm", "eps": 1e-30},
    "large-eps": {"eps_mode": "add_norm", "eps": 0.5},
}

SCALES: tuple[str, ...] = ("per_channel", "shared", "none")

#: Hostile magnitudes per dtype: squares that overflow, squares that underflow, subnormals.
HOSTILE = {
    "float16": {"huge": 700.0, "tiny": 2e-4, "subnormal": 3e-6},
    "bfloat16": {"huge": 3e19, "tiny": 1e-24, "subnormal": 5e-39},
    "float32": {"huge": 3e19, "tiny": 1e-24, "subnormal": 5e-41},
    "float64": {"huge": 3e160, "tiny": 1e-170, "subnormal": 1e-310},
}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def scale_values(kind: str, channels: int, rng: np.random.Generator) -> np.ndarray | None:
    """A float64 scale of one of :data:`SCALES`: per channel in [0.5, 20), shared 20, or
    None."""
    if kind == "per_channel":
        return rng.uniform(0.5, 20.0, size=(channels,))
    return {"shared": np.array([20.0]), "none": None}[kind]


@dataclass(frozen=True)
class Case:
    """One conformance case; :meth:`inputs` makes its arrays deterministically."""

    layout: int
    option_set: str
    scale_kind: str
    dtype: str
    data: str  # "random" or "hostile"

    @property
    def id(self) -> str:
        return f"{self.layout}:{self.option_set}:{self.scale_kind}:{self.dtype}:{self.data}"

    @classmethod
    def from_id(cls, case_id: str) -> Case:
        layout, option_set, scale_kind, dtype, data = case_id.split(":")
        case = cls(int(layout), option_set, scale_kind, dtype, data)
        if (
            not 0 <= case.layout < len(LAYOUTS)
            or option_set not in OPTION_SETS
            or scale_kind not in SCALES
            or dtype not in FLOAT_DTYPES
            or data not in ("random", "hostile")
        ):
            raise ValueError(f"not a conformance case id: {case_id!r}")
        return case

    @property
    def shape(self) -> tuple[int, ...]:
        return LAYOUTS[self.layout][0]

    @property
    def options(self) -> dict:
        _, axis, across = LAYOUTS[self.layout]
        return {"axis": axis, "across_spatial": across, **OPTION_SETS[self.option_set]}

    def axes(self) -> Axes:
        return Spec.create(**self.options).resolve(len(self.shape))

    def inputs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(x, scale, cotangent)`` in the case's dtype."""
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        dtype = numpy_dtype(self.dtype)
        x = rng.standard_normal(self.shape) * 3.0
        if self.data == "hostile":
            x = _plant_hostile_slices(x, self.axes(), HOSTILE[self.dtype], rng)
        cotangent = rng.standard_normal(self.shape)
        scale = scale_values(self.scale_kind, self.shape[self.axes().channel], rng)
        with np.errstate(over="ignore"):
            return (
                x.astype(dtype),
                None if scale is None else scale.astype(dtype),
                cotangent.astype(dtype),
            )


def _plant_hostile_slices(
    x: np.ndarray, axes: Axes, magnitudes: dict, rng: np.random.Generator
) -> np.ndarray:
    """Overwrite leading slices with zeros, huge, tiny and subnormal values, NaN and Inf."""
    rows = _oracle._rows(x, axes).copy()
    k = rows.shape[1]
    special = [
        np.zeros(k),
        rng.uniform(0.5, 1.0, k) * magnitudes["huge"] * rng.choice([-1, 1], k),
        rng.uniform(0.5, 1.0, k) * magnitudes["tiny"] * rng.choice([-1, 1], k),
        rng.uniform(0.5, 1.0, k) * magnitudes["subnormal"] * rng.choice([-1, 1], k),
        np.where(np.arange(k) == k // 2, np.nan, rows[0]),
        np.where(np.arange(k) == 0, np.inf, np.where(np.arange(k) == k - 1, -np.inf, rows[0])),
    ]
    for i, row in enumerate(special[: rows.shape[0]]):
        rows[i] = row
    return _oracle._unrows(rows, x, axes)


def cases(quick: bool = False) -> Iterator[Case]:
    """Every conformance case (or, with ``quick``, one in about five, still every dtype).

    Every layout meets every option set with a per-channel scale on hostile data; the
    shared and absent scales and the random data run on every layout with the default
    and the four eps placements. The wide layout (2048 channels) runs random data with
    :data:`WIDE_OPTION_SETS`.
    """
    all_cases: list[Case] = []
    for dtype in FLOAT_DTYPES:
        for layout, option_set in itertools.product(FULL_LAYOUTS, OPTION_SETS):
            all_cases.append(Case(layout, option_set, "per_channel", dtype, "hostile"))
        for layout, scale_kind, option_set in itertools.product(
            FULL_LAYOUTS, SCALES, ["default", *[f"mode={m}" for m in EPS_MODES]]
        ):
            all_cases.append(Case(layout, option_set, scale_kind, dtype, "random"))
        for layout in range(len(FULL_LAYOUTS), len(LAYOUTS)):
            for option_set in WIDE_OPTION_SETS:
                all_cases.append(Case(layout, option_set, "per_channel", dtype, "random"))
    if quick:
        all_cases = all_cases[::5]
    yield from all_cases


# --------------------------------------------------------------------------- measuring


@dataclass
class CaseResult:
    """How one backend did on one case."""

    case: Case
    backend: str
    forward_ulps: float
    grad_eps: float
    nonfinite: int
    passed: bool
    error: str | None = None


def _ulp(values: np.ndarray, dtype: np.dtype, floor_normal: bool) -> np.ndarray:
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    smallest_exponent = int(info.minexp)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(values)))
    exponent = np.where(np.isfinite(exponent), exponent, smallest_exponent)
    exponent = np.maximum(exponent, smallest_exponent)
    ulp = np.ldexp(1.0, (exponent - info.nmant).astype(np.int64))
    if floor_normal:
        ulp = np.maximum(ulp, float(info.smallest_normal))
    return ulp


def _nonfinite_mismatches(got: np.ndarray, want: np.ndarray) -> int:
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    bad = got_nan != want_nan
    both_finite_or_inf = ~got_nan & ~want_nan
    bad |= both_finite_or_inf & (np.isinf(got) | np.isinf(want)) & (got != want)
    return int(np.count_nonzero(bad))


def forward_error(got: np.ndarray, want: np.ndarray, dtype: np.dtype, flushes: bool) -> float:
    """Max ULP distance over the elements where the reference is finite."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want) & np.isfinite(got)
    if not finite.any():
        return 0.0
    diff = np.abs(got[finite] - want[finite]) / _ulp(want[finite], dtype, flushes)
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
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
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


def _round_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.asarray(values).astype(dtype).astype(np.float64)


def run_case(backend: Backend, case: Case) -> CaseResult:
    """Run one case through one backend and measure it against the reference (or oracle)."""
    x, scale, g = case.inputs()
    spec = Spec.create(**case.options)
    dtype = numpy_dtype(case.dtype)
    truth = _oracle if backend.compare_to_oracle else reference
    try:
        with np.errstate(all="ignore"):
            y = np.asarray(backend.forward(x, scale, dict(case.options)))
            dx, dscale = backend.vjp(x, scale, g, dict(case.options))
    except Exception as err:  # a crash is a failure, reported with its message
        return CaseResult(case, backend.name, math.inf, math.inf, 0, False, repr(err))
    with np.errstate(all="ignore"):
        # Rounded to the case's dtype: where the exact value overflows it, Inf is right.
        y_ref = _round_to(truth.forward(x, scale, spec), dtype)
        dx_ref, dscale_ref = truth.vjp(x, scale, g, spec)
        dx_ref = _round_to(dx_ref, dtype)
        if dscale_ref is not None:
            dscale_ref = _round_to(dscale_ref, dtype)
        dx_magnitude, dscale_magnitude = gradient_magnitudes(x, scale, g, spec)
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
    nonfinite = _nonfinite_mismatches(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))
    nonfinite += _nonfinite_mismatches(np.asarray(dx, np.float64), np.asarray(dx_ref, np.float64))
    if dscale is not None:
        nonfinite += _nonfinite_mismatches(
            np.asarray(dscale, np.float64).reshape(-1),
            np.asarray(dscale_ref, np.float64).reshape(-1),
        )
    passed = (
        fwd <= backend.forward_ulps[case.dtype]
        and grad <= backend.grad_eps[case.dtype]
        and nonfinite == 0
    )
    return CaseResult(case, backend.name, fwd, grad, nonfinite, passed)
