"""The NumPy reference against independent oracles, its properties and its errors.

Bounds this file enforces (forward, in ULPs of the output dtype, against an exact
oracle at 60+ significant digits): float16 <= 0.5 (+ the oracle's own rounding to
float64: 1 in total), bfloat16 <= 1, float32 <= 1, float64 <= 1 (x86-64, where
``np.longdouble`` is wider than double; 4 elsewhere).
"""

from __future__ import annotations

import math

import ml_dtypes
import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from l2norm import PRESETS, Spec, conformance, l2_normalize, l2_normalize_vjp, reference
from l2norm.core import oracle

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
FORWARD_ULPS = {
    "float16": 1.0,
    "bfloat16": 1.0,
    "float32": 1.0,
    "float64": 1.0 if reference._LONGDOUBLE_IS_WIDER else 4.0,
}
MODES = ["add_sumsq", "add_norm", "clamp_sumsq", "clamp_norm"]


def finite_values(dtype_name: str) -> st.SearchStrategy[float]:
    """Every finite value of the dtype is fair game: zeros, subnormals, extremes."""
    info = ml_dtypes.finfo(DTYPES[dtype_name])
    big = float(info.max)
    width = 64 if dtype_name == "float64" else 32
    return st.floats(-big, big, allow_nan=False, allow_infinity=False, width=width).map(
        lambda v: float(np.asarray(v).astype(DTYPES[dtype_name]))
    )


@st.composite
def arrays_and_spec(draw, dtype_name: str):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
    magnitude = draw(st.sampled_from(["any", "ordinary"]))
    elements = finite_values(dtype_name) if magnitude == "any" else st.floats(-1e3, 1e3)
    x = draw(hnp.arrays(np.float64, shape, elements=elements)).astype(DTYPES[dtype_name])
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    mode = draw(st.sampled_from(MODES))
    eps = draw(st.sampled_from([None, 1e-30, 1e-6, 0.5]))
    return x, Spec.create(axis=axis, eps_mode=mode, eps=eps)


def mp_denominator(mode: str, n: mpmath.mpf, eps: mpmath.mpf) -> mpmath.mpf:
    if mode == "add_sumsq":
        return mpmath.sqrt(n * n + eps)
    if mode == "add_norm":
        return n + eps
    if mode == "clamp_sumsq":
        return max(n, mpmath.sqrt(eps))
    return max(n, eps)


def mp_forward(x: np.ndarray, spec: Spec) -> np.ndarray:
    """An mpmath oracle written independently of l2norm.core.oracle (80 digits)."""
    with mpmath.workdps(80):
        axes = spec.resolve(x.ndim)
        moved = np.moveaxis(x.astype(np.float64), axes.norm[0], -1)
        out = np.empty(moved.shape)
        eps = mpmath.mpf(spec.eps)
        for index in np.ndindex(moved.shape[:-1]):
            values = [mpmath.mpf(float(v)) for v in moved[index]]
            n = mpmath.sqrt(mpmath.fsum(v * v for v in values))
            d = mp_denominator(spec.eps_mode, n, eps)
            out[index] = [float(v / d) for v in values]
        return np.moveaxis(out, -1, axes.norm[0])


def ulp_error(got: np.ndarray, exact: np.ndarray, dtype: np.dtype) -> float:
    return conformance.forward_error(got, exact.astype(dtype), dtype, flushes=False)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@given(data=st.data())
def test_forward_matches_mpmath_oracle(dtype_name, data):
    x, spec = data.draw(arrays_and_spec(dtype_name))
    got = reference.forward(x, None, spec)
    assert got.dtype == x.dtype
    error = ulp_error(got, mp_forward(x, spec), x.dtype)
    assert error <= FORWARD_ULPS[dtype_name], f"{error} ULP on {x!r} with {spec}"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@given(data=st.data())
def test_forward_and_vjp_match_decimal_oracle_with_scale(dtype_name, data):
    x, spec = data.draw(arrays_and_spec(dtype_name))
    axes = spec.resolve(x.ndim)
    channels = x.shape[axes.channel]
    scale = data.draw(
        hnp.arrays(np.float64, (channels,), elements=st.floats(-30, 30)).map(
            lambda s: s.astype(x.dtype)
        )
    )
    g = data.draw(hnp.arrays(np.float64, x.shape, elements=st.floats(-10, 10))).astype(x.dtype)
    y = reference.forward(x, scale, spec)
    y_exact = oracle.forward(x, scale, spec)
    with np.errstate(over="ignore"):
        assert ulp_error(y, y_exact, x.dtype) <= FORWARD_ULPS[dtype_name]
    dx, ds = reference.vjp(x, scale, g, spec)
    dx_exact, ds_exact = oracle.vjp(x, scale, g, spec)
    with np.errstate(all="ignore"):
        dx_mag, ds_mag = conformance.gradient_magnitudes(x, scale, g, spec)
        error = conformance.gradient_error(
            dx,
            dx_exact.astype(x.dtype),
            dx_mag,
            ds,
            ds_exact.astype(x.dtype),
            ds_mag,
            x.dtype,
            flushes=False,
        )
    assert error <= conformance.get_backend("numpy").grad_eps[dtype_name]
    assert np.all(np.isfinite(dx) | ~np.isfinite(dx_exact.astype(x.dtype)))


# ------------------------------------------------------------------ gradient checks


def mp_loss(x: list, shape, spec: Spec, scale, g) -> mpmath.mpf:
    """<g, l2_normalize(x)> in mpmath: differentiate it numerically at 60 digits."""
    arr = np.array(x, dtype=object).reshape(shape)
    axes = spec.resolve(len(shape))
    moved = np.moveaxis(arr, axes.norm[0], -1)
    g_moved = np.moveaxis(np.asarray(g, dtype=object), axes.norm[0], -1)
    s_moved = np.moveaxis(np.asarray(scale, dtype=object), axes.norm[0], -1)
    eps = mpmath.mpf(spec.eps)
    total = mpmath.mpf(0)
    for index in np.ndindex(moved.shape[:-1]):
        values = list(moved[index])
        n = mpmath.sqrt(mpmath.fsum(v * v for v in values))
        d = mp_denominator(spec.eps_mode, n, eps)
        total += mpmath.fsum(
            mpmath.mpf(float(gi)) * mpmath.mpf(float(si)) * v / d
            for gi, si, v in zip(g_moved[index], s_moved[index], values, strict=True)
        )
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("zero_slice", [False, True])
def test_vjp_against_central_differences(mode, zero_slice):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 4))
    if zero_slice:
        x[1] = 0.0
    scale = rng.uniform(0.5, 3.0, size=4)
    g = rng.standard_normal((3, 4))
    spec = Spec.create(axis=-1, eps_mode=mode, eps=1e-3)
    dx, dscale = reference.vjp(x, scale, g, spec)
    full_scale = np.broadcast_to(scale, x.shape)
    with mpmath.workdps(60):
        h = mpmath.mpf("1e-25")
        flat = [mpmath.mpf(float(v)) for v in x.reshape(-1)]
        numeric = []
        for i in range(len(flat)):
            up, down = list(flat), list(flat)
            up[i] += h
            down[i] -= h
            # One-sided at a kink of the clamp modes is not an issue: the zero slice sits
            # inside the clamp (n = 0 < threshold), where the function is linear.
            diff = mp_loss(up, x.shape, spec, full_scale, g) - mp_loss(
                down, x.shape, spec, full_scale, g
            )
            numeric.append(float(diff / (2 * h)))
    np.testing.assert_allclose(dx.reshape(-1), numeric, rtol=1e-13, atol=1e-13)
    y_unscaled = reference.forward(x, None, spec)
    np.testing.assert_allclose(dscale, np.sum(g * y_unscaled, axis=0), rtol=1e-13)


@pytest.mark.parametrize("mode", MODES)
def test_vjp_is_adjoint_of_jvp(mode):
    """<vjp(g), v> == <g, J v>, with J v from complex-free central differences."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 6)) * 2
    v = rng.standard_normal(x.shape)
    g = rng.standard_normal(x.shape)
    scale = rng.uniform(1, 20, size=6)
    spec = Spec.create(axis=-1, eps_mode=mode, eps=1e-2)
    dx, _ = reference.vjp(x, scale, g, spec)
    h = 1e-6
    jv = (reference.forward(x + h * v, scale, spec) - reference.forward(x - h * v, scale, spec)) / (
        2 * h
    )
    assert math.isclose(float(np.sum(dx * v)), float(np.sum(g * jv)), rel_tol=1e-8)


def test_add_norm_gradient_at_zero_is_scale_over_eps():
    g = np.arange(1.0, 5.0).reshape(1, 4)
    dx, _ = l2_normalize_vjp(np.zeros((1, 4)), 20.0, g, eps_mode="add_norm", eps=1e-10)
    np.testing.assert_array_equal(dx, 20.0 * g / 1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_gradient_is_finite_for_extreme_finite_inputs(mode, dtype_name):
    dtype = DTYPES[dtype_name]
    info = ml_dtypes.finfo(dtype)
    for magnitude in [0.0, float(info.smallest_subnormal), float(info.max) / 4]:
        x = np.full((2, 3), magnitude).astype(dtype)
        g = np.ones((2, 3), dtype)
        # A large eps keeps the exact gradient inside every dtype's range.
        dx, ds = l2_normalize_vjp(x, np.ones(3, dtype), g, eps_mode=mode, eps=0.5)
        assert np.all(np.isfinite(dx.astype(np.float64))), (magnitude, dx)
        assert np.all(np.isfinite(ds.astype(np.float64)))


# ------------------------------------------------------------------ presets vs peers


def _peer_formulas(x: np.ndarray) -> dict[str, np.ndarray]:
    """Each peer's formula written out in float64 over the last axis (../shared/peers.md)."""
    s = np.sum(x * x, axis=-1, keepdims=True)
    n = np.sqrt(s)
    return {
        "caffe": x / np.sqrt(s + 1e-10),
        "ssd.pytorch": x / (n + 1e-10),
        "mmdet": x / (n + 1e-10),
        "torchvision": x / np.maximum(n, 1e-12),
        "tensorflow": x / np.sqrt(np.maximum(s, 1e-12)),
        "ssd_keras": x / np.sqrt(np.maximum(s, 1e-12)),
        "keras": x / np.maximum(n, 1e-12),
    }


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("magnitude", [1.0, 1e-7, 1e-13])
def test_preset_reproduces_peer_formula(preset, magnitude):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8)) * magnitude
    x[0] = 0.0
    expected = _peer_formulas(x)[preset]
    got = l2_normalize(x, preset=preset)
    np.testing.assert_allclose(got, expected, rtol=4 * np.finfo(np.float64).eps, atol=0)


# ------------------------------------------------------------------ properties

finite_f64 = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5),
    # No subnormals: scaling them by a power of two is not exact.
    elements=st.floats(-1e6, 1e6).filter(lambda v: v == 0 or abs(v) > 1e-200),
)


@given(x=finite_f64, a=st.floats(0.1, 10), b=st.floats(0.1, 10))
def test_linear_in_scale(x, a, b):
    c = x.shape[-1]
    ya = l2_normalize(x, np.full(c, a))
    yb = l2_normalize(x, np.full(c, b))
    yab = l2_normalize(x, np.full(c, a + b))
    np.testing.assert_allclose(yab, ya + yb, rtol=1e-14, atol=1e-300)


@given(x=finite_f64)
def test_idempotent_with_unit_scale(x):
    y = l2_normalize(x)
    # Only slices whose norm is well above eps are unit vectors after one pass.
    assume(np.all(np.linalg.norm(x, axis=-1) > 1e-6))
    np.testing.assert_allclose(l2_normalize(y), y, rtol=4e-16, atol=1e-300)


@given(x=finite_f64, exponent=st.integers(-40, 40))
def test_invariant_to_positive_rescaling(x, exponent):
    factor = 2.0**exponent  # an exact rescaling
    norms = np.linalg.norm(x, axis=-1)
    assume(np.all(norms > 1e-6) and np.all(norms * factor > 1e-6))  # outside the eps regime
    np.testing.assert_array_equal(l2_normalize(x * factor), l2_normalize(x))


@given(x=finite_f64, seed=st.integers(0, 2**32 - 1))
def test_equivariant_to_permutations_of_other_axes(x, seed):
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    np.testing.assert_array_equal(l2_normalize(x[perm]), l2_normalize(x)[perm])


def test_nan_poisons_only_its_slice_and_inf_gives_the_limit_direction():
    x = np.array([[1.0, np.nan, 2.0], [np.inf, 5.0, -np.inf], [np.inf, 1.0, 1.0], [3.0, 4.0, 0]])
    y = l2_normalize(x, np.array([1.0, 2.0, 3.0]))
    assert np.all(np.isnan(y[0]))
    np.testing.assert_allclose(y[1], [1 / np.sqrt(2), 0.0, -3 / np.sqrt(2)], rtol=1e-15)
    np.testing.assert_array_equal(y[2], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(y[3], [0.6, 1.6, 0.0], rtol=1e-15)
    dx, _ = l2_normalize_vjp(x, np.ones(3), np.ones_like(x))
    assert np.all(np.isnan(dx[0]))
    np.testing.assert_array_equal(dx[1:3], 0.0)


@pytest.mark.parametrize(
    ("dtype_name", "value"),
    [("float32", 1e20), ("float32", 1e-25), ("float16", 600.0), ("bfloat16", 1e20)],
)
def test_squares_that_overflow_or_underflow_still_normalize(dtype_name, value):
    x = np.array([[3 * value, 4 * value]]).astype(DTYPES[dtype_name])
    y = l2_normalize(x, eps=1e-37)
    expected = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64))).astype(x.dtype)
    np.testing.assert_array_equal(y, expected)


def test_tuple_axis_scale_runs_along_first_axis_and_across_spatial():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    scale = np.array([1.0, 2.0, 3.0])
    y = l2_normalize(x, scale, axis=(1, 2, 3))
    z = l2_normalize(x, scale, axis=1, across_spatial=True)
    np.testing.assert_array_equal(y, z)
    norms = np.sqrt(np.sum(x * x, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(y, x / norms * scale[None, :, None, None], rtol=1e-14)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": np.arange(4)}, TypeError, "int64"),
        ({"x": np.array([True, False])}, TypeError, "bool"),
        ({"x": np.ones(3, np.complex64)}, TypeError, "complex64"),
        ({"x": np.float32(1.0)}, ValueError, "0-d"),
        ({"axis": 2}, ValueError, "axis 2 is out of range for an input of rank 2"),
        ({"axis": (1, -1)}, ValueError, "repeats"),
        ({"axis": 1.5}, TypeError, "1.5"),
        ({"scale": np.ones(2)}, ValueError, r"shape \(2,\).*3 channels"),
        ({"scale": np.ones((3, 1))}, ValueError, r"shape \(3, 1\)"),
        ({"scale": np.array([True, True, True])}, TypeError, "bool"),
        ({"eps": 0.0}, ValueError, "eps must be a positive finite float, got 0.0"),
        ({"eps": -1e-3}, ValueError, "-0.001"),
        ({"eps": float("inf")}, ValueError, "inf"),
        ({"eps": "1e-3"}, TypeError, "'1e-3'"),
        ({"eps_mode": "sqrt"}, ValueError, "unknown eps_mode 'sqrt'"),
        ({"preset": "caffee"}, ValueError, "unknown preset 'caffee'"),
        ({"preset": "caffe", "eps": 1e-5}, ValueError, "conflicts with eps=1e-05"),
        ({"preset": "caffe", "eps_mode": "add_norm"}, ValueError, "conflicts with eps_mode"),
        ({"across_spatial": True, "axis": 0}, ValueError, "cannot be 0"),
        ({"across_spatial": True, "axis": (1, 2)}, ValueError, "single int"),
        ({"across_spatial": "yes"}, TypeError, "'yes'"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", np.ones((2, 3)))
    scale = kwargs.pop("scale", None)
    with pytest.raises(error, match=match):
        l2_normalize(x, scale, **kwargs)


def test_vjp_rejects_a_cotangent_of_another_shape():
    with pytest.raises(ValueError, match=r"cotangent has shape \(3,\)"):
        l2_normalize_vjp(np.ones((2, 3)), None, np.ones(3))


def test_preset_with_its_own_eps_is_accepted():
    spec = Spec.create(preset="caffe", eps=1e-10)
    assert (spec.eps_mode, spec.eps) == PRESETS["caffe"]


@pytest.mark.parametrize(
    ("shape", "axis"), [((2, 0, 3), 1), ((0, 4, 3), 1), ((2, 4, 0), 1), ((3, 0), -1)]
)
def test_zero_size_inputs_give_empty_results(shape, axis):
    """Any axis of size zero (the channels included) gives results of the input's shape,
    and the scale's gradient over no data is zero."""
    x = np.zeros(shape, np.float32)
    scale = np.full(shape[axis], 2.0, np.float32)
    y = l2_normalize(x, scale, axis=axis)
    dx, dscale = l2_normalize_vjp(x, scale, np.ones_like(x), axis=axis)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.float32
    assert dscale.shape == scale.shape and not dscale.any()
