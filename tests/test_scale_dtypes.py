"""The one scale dtype rule (:func:`l2norm.core.spec.scale_compute_dtype`) in every framework.

NumPy, torch, JAX and Keras (the current backend: the ``keras`` marker, scripts/test runs it
once per backend) x (input dtype, scale dtype):

* an accepted mix (a float scale no wider than the compute precision, float32 or float64
  for float64 input) gives the output within 1 ULP of the oracle computed from the exactly
  widened scale, in the input's dtype; the scale's gradient has the scale's dtype and is
  within the conformance suite's 2 eps of the oracle's (in the coarser of the two dtypes:
  it is rounded to the scale's dtype), the input's gradient within 2 eps of the input's;
* a refused mix (a wider scale, an integer or bool scale) raises TypeError naming both
  dtypes;
* a Python number is taken at the compute precision: the same bits as a 0-d array of it;
* RMSNorm follows the same rule, except the presets whose formula promotes the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import l2norm
import l2norm.jax
import l2norm.torch
from l2norm import reference
from l2norm.conformance import forward_error, gradient_error, gradient_magnitudes
from l2norm.core import oracle
from l2norm.core.spec import FLOAT_DTYPES, RMSSpec, Spec, machine_eps
from l2norm.testing.frameworks import (
    keras_to_numpy,
    keras_vjp,
    numpy_to_keras,
    numpy_to_torch,
    torch_to_numpy,
)

FRAMEWORKS = ("numpy", "torch", "jax", pytest.param("keras", marks=pytest.mark.keras))
SPEC = Spec.create(axis=-1)
RMS = RMSSpec.create(axis=-1)


def _compute(x_dtype: str) -> str:
    """The compute precision the rule states: float64 for float64 input, else float32."""
    return "float64" if x_dtype == "float64" else "float32"


#: Every float mix whose scale is no wider than the compute precision: 13 of 16.
ACCEPTED = [(x, s) for x in FLOAT_DTYPES for s in FLOAT_DTYPES if s != "float64" or x == "float64"]
#: A wider scale, or one without float values.
REFUSED = [
    ("float16", "float64"),
    ("bfloat16", "float64"),
    ("float32", "float64"),
    ("float32", "int32"),
    ("float64", "int32"),
    ("bfloat16", "bool"),
]


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def _data(x_dtype: str, s_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, scale, g)``: ordinary activations of shape (3, 8), a scale around 1 (or ones
    for a non-float scale), a cotangent."""
    rng = np.random.default_rng(24)
    x = rng.standard_normal((3, 8)).astype(_np_dtype(x_dtype))
    scale = 1.0 + 0.25 * rng.standard_normal(8)
    scale = (scale if s_dtype in FLOAT_DTYPES else np.ones(8)).astype(_np_dtype(s_dtype))
    g = rng.standard_normal((3, 8)).astype(_np_dtype(x_dtype))
    return x, scale, g


@contextlib.contextmanager
def _x64(framework: str) -> Iterator[None]:
    """JAX (and Keras on JAX) with float64 arrays, so that each dtype is what it says."""
    on_jax = framework == "jax"
    if framework == "keras":  # imported only by the keras runs (the backend is set by then)
        import keras

        on_jax = keras.backend.backend() == "jax"
    with jax.enable_x64(True) if on_jax else contextlib.nullcontext():
        yield


def _run(framework: str, x: np.ndarray, scale: Any, g: np.ndarray | None, rms: bool = False):
    """``(y, dx, dscale)`` as NumPy arrays in the framework's dtypes (``dx`` / ``dscale``
    None where ``g`` is None or the scale is a number)."""
    number = not isinstance(scale, np.ndarray)
    if framework == "numpy":
        if rms:
            return l2norm.rms_norm(x, scale), None, None
        y = l2norm.l2_normalize(x, scale)
        if g is None:
            return y, None, None
        dx, ds = l2norm.l2_normalize_vjp(x, scale, g)
        return y, dx, None if number else ds
    if framework == "torch":
        xt = numpy_to_torch(x).requires_grad_(g is not None)
        st = scale if number else numpy_to_torch(scale)
        track = g is not None and not number
        st = st.requires_grad_(True) if track else st
        op = l2norm.torch.rms_norm if rms else l2norm.torch.l2_normalize
        y = op(xt, st, dim=-1)
        if g is None:
            return torch_to_numpy(y), None, None
        inputs = [xt, st] if track else [xt]
        grads = torch.autograd.grad(y, inputs, numpy_to_torch(g))
        ds = torch_to_numpy(grads[1]) if track else None
        return torch_to_numpy(y), torch_to_numpy(grads[0]), ds
    if framework == "jax":
        op = l2norm.jax.rms_norm if rms else l2norm.jax.l2_normalize
        xj, sj = jnp.asarray(x), scale if number else jnp.asarray(scale)
        if g is None:
            return np.asarray(op(xj, sj)), None, None
        if number:
            y, pullback = jax.vjp(lambda a: op(a, sj), xj)
            return np.asarray(y), np.asarray(pullback(jnp.asarray(g))[0]), None
        y, pullback = jax.vjp(op, xj, sj)
        dx, ds = pullback(jnp.asarray(g))
        return np.asarray(y), np.asarray(dx), np.asarray(ds)
    from l2norm import keras as l2keras  # imports Keras: only in the keras runs

    op = l2keras.rms_norm if rms else l2keras.l2_normalize
    xk, sk = numpy_to_keras(x), scale if number else numpy_to_keras(scale)
    y = keras_to_numpy(op(xk, sk))
    if g is None:
        return y, None, None
    if number:
        (dx,) = keras_vjp(lambda a: op(a, sk), [xk], numpy_to_keras(g))
        return y, keras_to_numpy(dx), None
    dx, ds = keras_vjp(op, [xk, sk], numpy_to_keras(g))
    return y, keras_to_numpy(dx), keras_to_numpy(ds)


def _coarser(a: str, b: str) -> str:
    return max(a, b, key=machine_eps)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("x_dtype, s_dtype", ACCEPTED)
def test_an_accepted_mix_is_the_exactly_widened_scale(framework, x_dtype, s_dtype):
    x, scale, g = _data(x_dtype, s_dtype)
    with _x64(framework):
        y, dx, ds = _run(framework, x, scale, g)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert ds.dtype == scale.dtype and ds.shape == scale.shape
    # The oracle from the scale's exact values: the widening to the compute precision is
    # exact, so these are the values every framework must use.
    assert forward_error(y, oracle.forward(x, scale, SPEC), x.dtype, False) <= 1.0
    dx_want, ds_want = oracle.vjp(x, scale, g, SPEC)
    dx_size, ds_size = gradient_magnitudes(x, scale, g, SPEC)
    assert gradient_error(dx, dx_want, dx_size, None, None, None, x.dtype, False) <= 2.0
    coarser = _np_dtype(_coarser(x_dtype, s_dtype))
    assert gradient_error(ds, ds_want, ds_size, None, None, None, coarser, False) <= 2.0


LOWERINGS = [
    ("torch", "ops"),
    ("torch", "cpu-kernel"),
    ("torch", "triton"),  # the interpreter without a GPU
    ("jax", "ops"),
    ("jax", "cpu-kernel"),
    ("jax", "pallas"),  # interpreted without a GPU
]


@pytest.mark.parametrize("framework, lowering", LOWERINGS)
@pytest.mark.parametrize("x_dtype, s_dtype", [("float32", "bfloat16"), ("bfloat16", "float16")])
def test_every_lowering_takes_the_widened_scale(framework, lowering, x_dtype, s_dtype):
    """The accepted mixes reach each kernel in a dtype it takes (the compute precision)."""
    x, scale, g = _data(x_dtype, s_dtype)
    module = l2norm.torch if framework == "torch" else l2norm.jax
    with module.use_lowering(lowering), _x64(framework):
        assert module.lowering_for(x if framework == "jax" else numpy_to_torch(x)) == lowering
        y, dx, ds = _run(framework, x, scale, g)
    assert ds.dtype == scale.dtype
    assert forward_error(y, oracle.forward(x, scale, SPEC), x.dtype, False) <= 1.0
    _, ds_want = oracle.vjp(x, scale, g, SPEC)
    _, ds_size = gradient_magnitudes(x, scale, g, SPEC)
    coarser = _np_dtype(_coarser(x_dtype, s_dtype))
    assert gradient_error(ds, ds_want, ds_size, None, None, None, coarser, False) <= 2.0


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("x_dtype, s_dtype", REFUSED)
def test_a_refused_mix_names_both_dtypes(framework, x_dtype, s_dtype):
    x, scale, _ = _data(x_dtype, s_dtype)
    both = rf"{s_dtype}\b.*\b{x_dtype}"
    with _x64(framework), pytest.raises(TypeError, match=both):
        _run(framework, x, scale, None)
    if s_dtype == "float64":  # the message says what to do
        with _x64(framework), pytest.raises(TypeError, match="Cast the scale to float32"):
            _run(framework, x, scale, None)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("x_dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("number", [0.1, 3])
def test_a_python_number_is_taken_at_the_compute_precision(framework, x_dtype, number):
    x, _, g = _data(x_dtype, "float32")
    as_array = np.asarray(number, _compute(x_dtype))
    with _x64(framework):
        y, dx, _ = _run(framework, x, number, g)
        y_array, dx_array, _ = _run(framework, x, as_array, g)
    np.testing.assert_array_equal(y, y_array, strict=True)
    np.testing.assert_array_equal(dx, dx_array, strict=True)
    assert forward_error(y, oracle.forward(x, as_array, SPEC), x.dtype, False) <= 1.0


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rms_norm_follows_the_rule(framework):
    # The default (fused) RMSNorm: a bfloat16 weight with float32 input is widened exactly.
    x, w, _ = _data("float32", "bfloat16")
    with _x64(framework):
        y, _, _ = _run(framework, x, w, None, rms=True)
    assert y.dtype == x.dtype
    assert forward_error(y, oracle.forward(x, w, RMS.spec("float32")), x.dtype, False) <= 1.0
    # A Python number: the same bits as a 0-d array of it in the compute precision.
    with _x64(framework):
        y_number, _, _ = _run(framework, x, 3, None, rms=True)
        y_array, _, _ = _run(framework, x, np.asarray(3, np.float32), None, rms=True)
    np.testing.assert_array_equal(y_number, y_array, strict=True)
    assert (
        forward_error(y_number, 3 * oracle.forward(x, None, RMS.spec("float32")), x.dtype, False)
        <= 1
    )
    for s_dtype in ("float64", "int32"):
        x, w, _ = _data("float32", s_dtype)
        with _x64(framework), pytest.raises(TypeError, match=rf"{s_dtype}\b.*\bfloat32"):
            _run(framework, x, w, None, rms=True)


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_rms_presets_that_promote_the_weight_keep_their_formula(framework):
    """``"flax"`` computes in the promoted dtype of x and w (Flax's rule): a float64
    weight with float32 input makes a float64 output, nothing is rounded. An integer
    weight is refused as by every preset."""
    x, w, _ = _data("float32", "float64")
    ops = {
        "numpy": lambda x, w: l2norm.rms_norm(x, w, preset="flax"),
        "torch": lambda x, w: torch_to_numpy(
            l2norm.torch.rms_norm(numpy_to_torch(x), numpy_to_torch(w), preset="flax")
        ),
        "jax": lambda x, w: np.asarray(l2norm.jax.rms_norm(x, w, preset="flax")),
    }
    with _x64(framework):
        y = ops[framework](x, w)
    assert y.dtype == np.float64
    want = oracle.forward(x.astype(np.float64), w, RMS.spec("float64"))
    assert forward_error(y, want, np.dtype(np.float64), False) <= 1.0
    x, w, _ = _data("float32", "int32")
    with _x64(framework), pytest.raises(TypeError, match=r"int32\b.*\bfloat32"):
        ops[framework](x, w)


def test_jax_rule_reads_the_dtype_jax_gives_the_array():
    """With x64 off, JAX makes a NumPy float64 array float32 (its canonicalization): the
    rule then sees a float32 scale, as any JAX code would."""
    x, scale, _ = _data("float32", "float64")
    with jax.enable_x64(False):
        y = np.asarray(l2norm.jax.l2_normalize(x, scale))
    assert forward_error(y, oracle.forward(x, scale.astype(np.float32), SPEC), x.dtype, False) <= 1
    with jax.enable_x64(True), pytest.raises(TypeError, match="float64, wider"):
        l2norm.jax.l2_normalize(x, scale)


def test_torch_layer_with_a_bfloat16_weight_trains_on_float32_input():
    layer = l2norm.torch.L2Norm(8, dtype=torch.bfloat16)
    x = torch.randn(2, 8, 3)
    y = layer(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and layer.weight.grad.dtype == torch.bfloat16
    want = oracle.forward(x.numpy(), torch_to_numpy(layer.weight), Spec.create(axis=1))
    assert forward_error(torch_to_numpy(y), want, np.dtype(np.float32), False) <= 1.0
    with pytest.raises(TypeError, match="float64, wider"):
        l2norm.torch.L2Norm(8, dtype=torch.float64)(x)


def test_a_list_of_python_numbers_is_weakly_typed_in_numpy():
    """``[20.0] * C`` has no dtype: NumPy takes it at the compute precision, as a number,
    where ``np.asarray`` alone would make it a float64 array (refused with float32 input)."""
    x, _, _ = _data("float32", "float32")
    values = [float(v) for v in np.linspace(0.5, 2.0, x.shape[-1])]
    want = reference.l2_normalize(x, np.asarray(values, np.float32), axis=-1)
    for scale in (values, tuple(values)):
        got = reference.l2_normalize(x, scale, axis=-1)
        np.testing.assert_array_equal(got, want, strict=True)
    with pytest.raises(TypeError, match="float64"):
        reference.l2_normalize(x, np.asarray(values), axis=-1)
