"""RMSNorm (the L2 op with ``eps_mode="add_meansq"``) in every framework.

* every framework's ``rms_norm`` / ``RMSNorm`` against the 60-digit oracle in ULPs, and its
  gradient against the reference's VJP (the conformance measures);
* each preset against its peer's formula, written here in NumPy (float64 arithmetic, the
  peer's casts where the peer casts), and against the peer itself where it is installed
  (``torch.nn.RMSNorm``, ``F.rms_norm``, Flax's RMSNorm, ``keras.layers.RMSNormalization``);
* a few of the checks the peers' own RMSNorm tests make, run against ours.

The Keras tests carry the ``keras`` marker: scripts/test runs them once per backend.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen, nnx

import l2norm
import l2norm.jax
import l2norm.linen
import l2norm.nnx
from l2norm import conformance, reference
from l2norm.conformance import forward_error, gradient_error, gradient_magnitudes
from l2norm.core import oracle as _oracle
from l2norm.core.spec import FLOAT_DTYPES, RMSSpec, machine_eps, promote_float
from l2norm.testing import assert_matches_reference
from l2norm.testing.frameworks import (
    keras_to_numpy,
    keras_vjp,
    numpy_to_keras,
    numpy_to_torch,
    torch_to_numpy,
)
from l2norm.torch import RMSNorm as TorchRMSNorm
from l2norm.torch import rms_norm as torch_rms_norm

HALF = ("float16", "bfloat16")
PRESETS = (None, *l2norm.RMS_PRESETS)


def _dtype(name: str):
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def _weight(dtype: str, size: int = 16, seed: int = 1) -> np.ndarray:
    """A weight around 1."""
    w = 1.0 + 0.25 * np.random.default_rng(seed).standard_normal(size)
    return w.astype(_dtype(dtype))


def _data(dtype: str, seed: int = 0, hostile: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(x, w)``: x of shape (3, 2, 16) with ordinary activations, an all-zero slice, and
    (``hostile``, float32 and wider) a huge and a tiny one whose squares overflow /
    underflow the dtype; w one value per channel of the last axis. The peers are compared
    on ordinary data: their squares overflow."""
    x = np.random.default_rng(seed).standard_normal((3, 2, 16))
    x[0, 0] = 0.0
    if hostile and dtype in ("float32", "float64"):
        x[1, 0] *= 1e30
        x[1, 1] *= 1e-30
    return x.astype(_dtype(dtype)), _weight(dtype, seed=seed + 1)


def _oracle_ulps(got, x, w, eps: float, axis=-1) -> float:
    """ULPs of ``x``'s dtype between ``got`` and the correctly rounded RMSNorm."""
    spec = RMSSpec.create(axis=axis, eps=eps).spec(x.dtype.name)
    want = _oracle.forward(x, w, spec)
    assert np.asarray(got).dtype == x.dtype and np.asarray(got).shape == x.shape
    assert conformance.nonfinite_mismatches(np.asarray(got, np.float64), want) == 0
    return forward_error(np.asarray(got, np.float64), want, x.dtype, False)


def _grad_eps(x, w, g, dx, dw, eps: float) -> float:
    """The conformance gradient error (machine epsilons) against the reference's VJP."""
    spec = RMSSpec.create(eps=eps).spec(x.dtype.name)
    dx_ref, dw_ref = reference.vjp(x, w, g, spec)
    mags = gradient_magnitudes(x, w, g, spec)
    return gradient_error(dx, dx_ref, mags[0], dw, dw_ref, mags[1], x.dtype, False)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_numpy_rms_norm_is_faithful(dtype, axis):
    x, _ = _data(dtype)
    w = _weight(dtype, x.shape[axis if isinstance(axis, int) else axis[0]])
    for eps in (1e-6, 1e-2):
        got = l2norm.rms_norm(x, w, axis=axis, eps=eps)
        assert _oracle_ulps(got, x, w, eps, axis) <= 1.0


def test_rms_norm_is_the_mean_placement_of_the_l2_op():
    x, w = _data("float32")
    got = l2norm.rms_norm(x, w, eps=1e-5)
    np.testing.assert_array_equal(got, l2norm.l2_normalize(x, w, eps=1e-5, eps_mode="add_meansq"))


def test_bad_input_is_refused_as_the_l2_api_refuses_it():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"scale has shape \(3,\)"):
        l2norm.rms_norm(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="floating dtype"):
        l2norm.rms_norm(np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        l2norm.rms_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="unknown preset 'mistral'"):
        l2norm.rms_norm(x, preset="mistral")
    with pytest.raises(ValueError, match="out of range"):
        l2norm.rms_norm(x, axis=2)


# --------------------------------------------------------------------------- the presets


def _normalized(v: np.ndarray, eps: float) -> np.ndarray:
    """``v / sqrt(mean(v**2) + eps)`` over the last axis in float64."""
    v = v.astype(np.float64)
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)


def peer_formula(preset: str | None, x: np.ndarray, w: np.ndarray, eps: float | None):
    """Each peer's RMSNorm as the peer states it, in float64 with the peer's casts:
    ``(value, output dtype)``. float64 arithmetic where the peer computes in float32: its
    rounding error is not its convention, its casts to a stored dtype are."""
    xt, wt = x.dtype.name, w.dtype.name
    if preset == "torch":  # torch.nn.RMSNorm: x / sqrt(mean(x**2) + eps) * w, eps None: finfo
        eps = machine_eps(xt) if eps is None else eps
        return _normalized(x, eps) * w.astype(np.float64), xt
    if preset in (None, "keras"):  # RMSNormalization: x * rsqrt(mean(x**2) + eps) * scale
        return _normalized(x, eps) * w.astype(np.float64), xt
    if preset == "flax":  # Flax: x * (rsqrt(var + eps) * scale) in the promoted dtype
        return _normalized(x, eps) * w.astype(np.float64), promote_float(xt, wt)
    x32 = x.astype(np.float32)
    if preset == "gemma":  # (x32 * rsqrt(mean(x32**2) + eps) * (1 + w.float())).to(x.dtype)
        return _normalized(x32, eps) * (1 + w.astype(np.float32)).astype(np.float64), xt
    if preset == "llama":  # w * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)
        u = _normalized(x32, eps).astype(np.float32).astype(_dtype(xt))
        return w.astype(np.float64) * u.astype(np.float64), promote_float(wt, xt)
    assert preset == "t5"  # u = x * rsqrt(mean(x32**2) + eps); u.to(w.dtype) if w half; w * u
    work = promote_float(xt, "float32")
    u = _normalized(x, eps).astype(_dtype(work))
    if wt in HALF:
        u = u.astype(_dtype(wt))
        work = wt
    return w.astype(np.float64) * u.astype(np.float64), promote_float(wt, work)


#: ULPs between l2norm's preset and the peer's formula: 1 (one faithful rounding, or a
#: faithful one then the peer's cast); 2 for llama and t5, whose normalized value is
#: rounded to a stored dtype before the weight multiplies it (a 1-ULP difference there is
#: up to 2 ULPs of the product).
PRESET_ULPS = {"llama": 2.0, "t5": 2.0}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "dtypes",
    [
        ("bfloat16", "bfloat16"),
        ("float16", "float32"),
        ("float32", "float32"),
        ("float32", "bfloat16"),
    ],
)
def test_each_preset_is_its_peers_formula(preset, dtypes):
    xt, wt = dtypes
    x, _ = _data(xt)
    w = _weight(wt, seed=2)
    if preset in (None, "keras", "torch") and (xt, wt) == ("float32", "bfloat16"):
        w = w.astype(np.float32)  # the fused op takes x's dtype (or float32 for half x)
    got = l2norm.rms_norm(x, w, preset=preset)
    want, out = peer_formula(preset, x, w, RMSSpec.create(preset=preset).eps)
    assert got.dtype.name == out
    assert forward_error(got, want, _dtype(out), False) <= PRESET_ULPS.get(preset, 1.0)


def test_the_docs_table_states_each_peers_formula():
    page = (Path(__file__).resolve().parent.parent / "docs" / "rmsnorm.md").read_text()
    for preset in l2norm.RMS_PRESETS.values():
        assert f"| `{preset.name}` | {preset.peer} | `{preset.formula}` |" in page, preset.name


def test_the_torch_preset_resolves_eps_per_dtype():
    spec = RMSSpec.create(preset="torch")
    assert spec.eps is None
    assert [spec.spec(d).eps for d in FLOAT_DTYPES] == [2**-10, 2**-7, 2**-23, 2**-52]
    assert RMSSpec.create(preset="torch", eps=1e-5).spec("float16").eps == 1e-5
    assert RMSSpec.create(preset="gemma").convention.scale_init == 0.0


# --------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_torch_forward_and_gradient_match_the_reference(dtype):
    x, w = _data(dtype)
    if dtype in HALF:
        w = w.astype(np.float32)  # master weights in float32, as in mixed precision
    xt = numpy_to_torch(x).requires_grad_()
    wt = numpy_to_torch(w).requires_grad_()
    y = torch_rms_norm(xt, wt)
    assert _oracle_ulps(torch_to_numpy(y), x, w, 1e-6) <= 1.0
    g = np.random.default_rng(3).standard_normal(x.shape).astype(x.dtype)
    dx, dw = torch.autograd.grad(y, (xt, wt), numpy_to_torch(g))
    err = _grad_eps(x, w, g, torch_to_numpy(dx), torch_to_numpy(dw), 1e-6)
    assert err <= conformance.DEFAULT_GRAD_EPS[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("affine", [True, False])
def test_torch_layer_is_torch_nn_rmsnorm(dtype, affine):
    """Our RMSNorm(preset="torch") and torch.nn.RMSNorm on the same weight (eps None: the
    dtype's machine epsilon), both against the reference: torch's computes in float32."""
    peer = torch.nn.RMSNorm(16, elementwise_affine=affine, dtype=getattr(torch, dtype))
    ours = TorchRMSNorm(16, elementwise_affine=affine, preset="torch", dtype=getattr(torch, dtype))
    assert list(ours.state_dict()) == list(peer.state_dict())
    if affine:
        with torch.no_grad():
            peer.weight.copy_(numpy_to_torch(_weight(dtype, seed=4)))
        ours.load_state_dict(peer.state_dict())
    x, _ = _data(dtype, hostile=False)
    w = torch_to_numpy(ours.weight.detach()) if affine else None
    options = {"eps": machine_eps(dtype), "eps_mode": "add_meansq"}
    # The peer's own error, measured: in float32 its sum of 16 squares, rsqrt and two
    # products (a few ULPs); in half it rounds twice (2 ULPs). Ours rounds once: 1 ULP.
    bound = 2.0 if dtype in HALF else 6.0
    for layer, ulps in ((peer, bound), (ours, 1.0)):
        assert_matches_reference(
            lambda x, w, layer=layer: torch_to_numpy(layer(numpy_to_torch(x)).detach()),
            x,
            w,
            forward_ulps=ulps,
            **options,
        )
    y = torch.nn.functional.rms_norm(numpy_to_torch(x), (16,), None if w is None else ours.weight)
    assert_matches_reference(
        lambda x, w: torch_to_numpy(y.detach()), x, w, forward_ulps=bound, **options
    )


def test_torch_layer_checks_as_torch_tests_its_own():
    """What torch's own RMSNorm tests check: shapes, eps None, no weight without affine,
    factory kwargs, reset_parameters, repr; and our errors."""
    layer = TorchRMSNorm(8, device="cpu", dtype=torch.float64)
    assert layer.weight.shape == (8,) and layer.weight.dtype == torch.float64
    assert layer.eps == 1e-6 and TorchRMSNorm(8, preset="torch").eps is None
    assert TorchRMSNorm(8, elementwise_affine=False).weight is None
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert layer(x).shape == x.shape
    with torch.no_grad():
        layer.weight.fill_(3.0)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(8, dtype=torch.float64))
    gemma = TorchRMSNorm(8, preset="gemma")
    assert torch.equal(gemma.weight, torch.zeros(8))
    assert repr(TorchRMSNorm(8, 1e-5)) == "RMSNorm(8, dim=-1, eps=1e-05, elementwise_affine=True)"
    with pytest.raises(ValueError, match=r"RMSNorm\(8\) got an input of shape \(2, 4\)"):
        layer(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating dtype"):
        torch_rms_norm(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        TorchRMSNorm(0)


@pytest.mark.parametrize("preset", ["llama", "gemma", "t5"])
def test_torch_presets_are_their_formula_in_torch_with_gradients(preset):
    """Each transformers layer's forward, written here in torch in the peer's order, on
    bfloat16 activations and a bfloat16 weight."""
    x, w = _data("bfloat16")
    xt, wt = numpy_to_torch(x), numpy_to_torch(w)
    h = xt.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    if preset == "llama":
        want = wt * normed.to(xt.dtype)
    elif preset == "gemma":
        want = (normed * (1.0 + wt.float())).type_as(xt)
    else:
        want = wt * (xt * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(wt.dtype)
    got = torch_rms_norm(xt, wt, preset=preset)
    assert got.dtype == want.dtype
    error = forward_error(
        torch_to_numpy(got), torch_to_numpy(want).astype(np.float64), _dtype("bfloat16"), False
    )
    assert error <= PRESET_ULPS.get(preset, 1.0)


@pytest.mark.parametrize("preset", ["llama", "gemma", "t5"])
def test_torch_preset_gradients_are_the_references(preset):
    """In float32 the presets' casts are exact, so their gradient is the op's with the
    scale the peer applies (``w``, or ``1 + w`` for gemma): the reference's VJP."""
    x, w = _data("float32")
    g = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    xt, wt = numpy_to_torch(x).requires_grad_(), numpy_to_torch(w).requires_grad_()
    y = torch_rms_norm(xt, wt, preset=preset)
    dx, dw = torch.autograd.grad(y, (xt, wt), numpy_to_torch(g))
    s = (1 + w).astype(np.float32) if preset == "gemma" else w
    assert _grad_eps(x, s, g, torch_to_numpy(dx), torch_to_numpy(dw), 1e-6) <= 2.0


# --------------------------------------------------------------------------- JAX and Flax


def test_several_axes_in_torch_and_jax():
    """A tuple of axes: one mean over all of them, the weight along the first."""
    x, _ = _data("float32")
    w = _weight("float32", 2)
    got = torch_to_numpy(torch_rms_norm(numpy_to_torch(x), numpy_to_torch(w), dim=(1, 2)))
    assert _oracle_ulps(got, x, w, 1e-6, axis=(1, 2)) <= 1.0
    got = np.asarray(l2norm.jax.rms_norm(jnp.asarray(x), jnp.asarray(w), axis=(1, 2)))
    assert _oracle_ulps(got, x, w, 1e-6, axis=(1, 2)) <= 1.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_jax_forward_and_gradient_match_the_reference(dtype):
    x, w = _data(dtype)
    w = w.astype(np.float32)
    y, pullback = jax.vjp(lambda x, w: l2norm.jax.rms_norm(x, w), jnp.asarray(x), jnp.asarray(w))
    assert _oracle_ulps(np.asarray(y), x, w, 1e-6) <= 1.0
    g = np.random.default_rng(3).standard_normal(x.shape).astype(x.dtype)
    dx, dw = pullback(jnp.asarray(g))
    err = _grad_eps(x, w, g, np.asarray(dx), np.asarray(dw), 1e-6)
    assert err <= conformance.DEFAULT_GRAD_EPS[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_flax_layers_are_flax_rmsnorm(dtype):
    """Our NNX and Linen RMSNorm (preset "flax") and Flax's, on the same scale: the same
    variable names and shapes, the same output dtype (Flax promotes the input's and the
    scale's), Flax's within its float32 error and ours within 1 ULP of the oracle."""
    x, _ = _data(dtype, hostile=False)
    w = _weight("float32", seed=5)
    peer = nnx.RMSNorm(16, rngs=nnx.Rngs(0))
    ours = l2norm.nnx.RMSNorm(16, preset="flax", rngs=nnx.Rngs(0))
    peer.scale[...] = ours.scale[...] = jnp.asarray(w)
    xf = x.astype(np.float32)  # Flax computes in float32 and returns float32 here
    options = {"eps": 1e-6, "eps_mode": "add_meansq"}
    assert_matches_reference(lambda x, w: np.asarray(peer(x)), xf, w, forward_ulps=6.0, **options)
    got = np.asarray(ours(jnp.asarray(x)))
    assert got.dtype == np.asarray(peer(jnp.asarray(x))).dtype == np.float32
    assert _oracle_ulps(got, xf, w, 1e-6) <= 1.0

    # Flax's variables work in ours: the same names and shapes.
    shapes = jax.tree.map(jnp.shape, linen.RMSNorm().init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, l2norm.linen.RMSNorm().init(jax.random.key(0), x)) == shapes
    variables = {"params": {"scale": jnp.asarray(w)}}
    peer_linen = linen.RMSNorm()
    assert_matches_reference(
        lambda x, w: np.asarray(peer_linen.apply(variables, x)), xf, w, forward_ulps=6.0, **options
    )
    got = np.asarray(l2norm.linen.RMSNorm(preset="flax").apply(variables, x))
    assert _oracle_ulps(got, xf, w, 1e-6) <= 1.0


def test_flax_layers_options_and_errors():
    layer = l2norm.nnx.RMSNorm(4, use_scale=False, dtype=jnp.float32)
    assert layer.scale is None
    x = jnp.ones((2, 4), jnp.bfloat16)
    assert layer(x).dtype == jnp.float32
    assert float(l2norm.nnx.RMSNorm(4, preset="gemma").scale[0]) == 0.0
    with pytest.raises(ValueError, match="num_features=4"):
        l2norm.nnx.RMSNorm(4)(jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="num_features must be an int"):
        l2norm.nnx.RMSNorm(4.0)


# --------------------------------------------------------------------------- doctests


@pytest.mark.parametrize(
    "module", ["l2norm.torch._rms", "l2norm.jax", "l2norm.nnx", "l2norm.linen", "l2norm"]
)
def test_docstring_examples(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# --------------------------------------------------------------------------- Keras


@pytest.fixture
def keras_rms():
    """Keras and l2norm.keras, imported by the Keras tests only (the main suite's process
    has no KERAS_BACKEND)."""
    import keras

    import l2norm.keras

    return keras, l2norm.keras


def _keras_dtypes() -> tuple[str, ...]:
    import keras

    if keras.backend.backend() == "jax" and not jax.config.jax_enable_x64:
        return ("bfloat16", "float16", "float32")
    return FLOAT_DTYPES


def _inf_slices(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices with 2 and 1 infinities beside a finite one, and no NaN slice (a NaN slice
    makes every entry of the scale's gradient NaN, which hid a wrong Inf-slice term)."""
    x = np.array(
        [[np.inf, 1, 2, -np.inf, 3], [1, 2, 3, 4, 5], [-np.inf, 0, 0, 0, 0]], dtype=_dtype(dtype)
    )
    w = np.array([1.5, -2.0, 0.25, 3.0, 1.0], dtype=np.float32 if dtype in HALF else x.dtype)
    g = np.random.default_rng(5).standard_normal(x.shape).astype(x.dtype)
    return x, w, g


#: Every lowering of torch and JAX that runs on the CPU (Pallas in interpret mode), in
#: the dtypes each takes (JAX's float64 needs jax_enable_x64, off in this suite).
_CPU_LOWERINGS = [
    (framework, lowering, dtype)
    for framework, lowering in [("torch", "cpu-kernel"), ("torch", "ops")]
    + [("jax", "cpu-kernel"), ("jax", "ops"), ("jax", "pallas")]
    for dtype in ("float32", "bfloat16", *(("float64",) if framework == "torch" else ()))
]


@pytest.mark.parametrize(("framework", "lowering", "dtype"), _CPU_LOWERINGS)
def test_inf_slices_give_the_scale_the_limit_gradient(framework, lowering, dtype):
    """At a slice with k infinities the output tends to +-sqrt(N / k) scale, so the scale's
    gradient gets g sqrt(N / k) there, on every lowering (the ops ladder of torch and
    TensorFlow once added sqrt(N) times too much)."""
    x, w, g = _inf_slices(dtype)
    if framework == "torch":
        xt, wt = numpy_to_torch(x).requires_grad_(), numpy_to_torch(w).requires_grad_()
        with l2norm.torch.use_lowering(lowering):
            y = torch_rms_norm(xt, wt)
            dx, dw = torch.autograd.grad(y, (xt, wt), numpy_to_torch(g))
        y, dx, dw = (torch_to_numpy(t.detach()) for t in (y, dx, dw))
    else:
        with l2norm.jax.use_lowering(lowering):
            y, pullback = jax.vjp(l2norm.jax.rms_norm, jnp.asarray(x), jnp.asarray(w))
            dx, dw = (np.asarray(t) for t in pullback(jnp.asarray(g)))
    assert _oracle_ulps(np.asarray(y), x, w, 1e-6) <= 1.0
    assert _grad_eps(x, w, g, dx, dw, 1e-6) <= conformance.DEFAULT_GRAD_EPS[dtype]


@pytest.mark.keras
def test_keras_inf_slices_give_the_scale_the_limit_gradient(keras_rms):
    keras, lk = keras_rms
    for dtype in _keras_dtypes():
        x, w, g = _inf_slices(dtype)
        args = [numpy_to_keras(x), numpy_to_keras(w)]
        dx, dw = keras_vjp(lambda x, w: lk.rms_norm(x, w), args, numpy_to_keras(g))
        err = _grad_eps(x, w, g, keras_to_numpy(dx, x.dtype), keras_to_numpy(dw, w.dtype), 1e-6)
        assert err <= conformance.DEFAULT_GRAD_EPS[dtype], dtype


@pytest.mark.keras
def test_keras_forward_and_gradient_match_the_reference(keras_rms):
    keras, lk = keras_rms
    for dtype in _keras_dtypes():
        x, w = _data(dtype)
        w = w.astype(np.float32) if dtype in HALF else w
        args = [numpy_to_keras(x), numpy_to_keras(w)]
        y = keras_to_numpy(lk.rms_norm(*args), x.dtype)
        assert _oracle_ulps(y, x, w, 1e-6) <= 1.0, dtype
        g = np.random.default_rng(3).standard_normal(x.shape).astype(x.dtype)
        dx, dw = keras_vjp(lambda x, w: lk.rms_norm(x, w), args, numpy_to_keras(g))
        err = _grad_eps(x, w, g, keras_to_numpy(dx, x.dtype), keras_to_numpy(dw, w.dtype), 1e-6)
        assert err <= conformance.DEFAULT_GRAD_EPS[dtype], dtype


@pytest.mark.keras
def test_keras_layer_is_rmsnormalization(keras_rms, tmp_path):
    """What Keras' own RMSNormalization tests check, on ours: the output shape, one
    trainable weight named scale, the value against ops.rms_normalization's formula (the
    peer, on the same weights, within its float32 error), get_config round trip and a
    .keras file."""
    keras, lk = keras_rms
    x, w = _data("float32", hostile=False)
    peer = keras.layers.RMSNormalization(axis=-1, epsilon=1e-6)
    ours = lk.RMSNorm(axis=-1, preset="keras")
    peer.build(x.shape)
    ours.build(x.shape)
    assert [v.path.split("/")[-1] for v in ours.trainable_weights] == ["scale"]
    assert [tuple(v.shape) for v in ours.weights] == [tuple(v.shape) for v in peer.weights]
    ours.set_weights([w])
    peer.set_weights([w])
    options = {"eps": 1e-6, "eps_mode": "add_meansq"}
    assert_matches_reference(
        lambda x, w: keras_to_numpy(peer(x)), x, w, forward_ulps=6.0, **options
    )
    y = keras_to_numpy(ours(numpy_to_keras(x)))
    assert y.shape == x.shape and _oracle_ulps(y, x, w, 1e-6) <= 1.0
    assert ours.compute_output_shape((None, 2, 16)) == (None, 2, 16)

    config = ours.get_config()
    clone = lk.RMSNorm.from_config(config)
    assert clone.get_config() == config and config["preset"] == "keras"
    model = keras.Sequential([keras.Input(x.shape[1:]), ours])
    path = tmp_path / "rms.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras_to_numpy(loaded(numpy_to_keras(x))), y)


@pytest.mark.keras
def test_keras_layer_presets_and_errors(keras_rms):
    keras, lk = keras_rms
    gemma = lk.RMSNorm(preset="gemma")
    gemma.build((2, 4))
    np.testing.assert_array_equal(keras_to_numpy(gemma.scale.value), np.zeros(4, np.float32))
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        keras_to_numpy(gemma(numpy_to_keras(x))),
        l2norm.rms_norm(x, np.zeros(4, np.float32), preset="gemma"),
    )
    assert not lk.RMSNorm(use_scale=False).weights
    with pytest.raises(ValueError, match="built for 4 channels"):
        gemma(numpy_to_keras(np.ones((2, 5), np.float32)))
    with pytest.raises(ValueError, match="unknown preset"):
        lk.RMSNorm(preset="mistral")
    assert doctest.testmod(lk, optionflags=doctest.ELLIPSIS).failed == 0
