"""l2norm.jax, l2norm.nnx and l2norm.linen: conformance, transformations, one branch-free
program, batch invariance, scale-out.

Run with four host devices for the sharding test:
``XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest tests/test_jax.py``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx, serialization
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.test_util import check_grads

from l2norm import EPS_MODES, conformance, reference
from l2norm.core.spec import Spec
from l2norm.jax import l2_normalize, use_lowering
from l2norm.linen import L2Norm as LinenL2Norm
from l2norm.nnx import Constant
from l2norm.nnx import L2Norm as NnxL2Norm

ALL_CASES = list(conformance.cases())
# The layer rows run op by op; a slice of the suite covers their plumbing (scale layout,
# dtype, axes), the jax row runs every case compiled.
LAYER_CASES = [c for c in ALL_CASES if c.layout in (1, 4)][::8]


# --------------------------------------------------------------------------- backends
# Built here from the public API only (l2norm.conformance runs its own copies).


#: The conformance backends (l2norm.conformance, public API only): ``jax`` by the default
#: lowering (the native kernel on the CPU), ``jax-ops`` by the ladder in jax.numpy (what
#: GPUs run, and the fallback), and the Flax layers as users call them.
BACKENDS = {name: conformance.get_backend(name) for name in ("jax", "jax-ops", "nnx", "linen")}


def _check(name: str, case: conformance.Case) -> None:
    result = conformance.run_case(BACKENDS[name], case)
    assert result.passed, (
        f"{name} {case.id}: forward {result.forward_ulps} ULP, gradient {result.grad_eps} eps, "
        f"{result.nonfinite} non-finite mismatches, error {result.error}"
    )


@pytest.mark.parametrize("name", ["jax", "jax-ops"])
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_conformance_jax(name, case):
    _check(name, case)


@pytest.mark.parametrize("name", ["nnx", "linen"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_conformance_layers(name, case):
    _check(name, case)


# --------------------------------------------------------------------------- reference

_fwd = jax.jit(lambda x, s: l2_normalize(x, s, axis=1))
_grad = jax.jit(jax.grad(lambda x, s, g: jnp.sum(l2_normalize(x, s, axis=1) * g), (0, 1)))


@given(
    # Entries within 2**20 of each other in a slice: a subnormal entry next to a normal
    # one is read as 0 by XLA:CPU (documented in docs/flax.md), whole tiny slices are exact.
    st.lists(
        st.floats(2**-20, 1.0, width=32) | st.floats(-1.0, -(2**-20), width=32) | st.just(0.0),
        min_size=24,
        max_size=24,
    ),
    st.lists(st.integers(-150, 127), min_size=6, max_size=6),
)
def test_matches_reference_on_hypothesis_inputs(values, exponents):
    # Each slice gets its own binary exponent: from subnormal to near overflow.
    x = np.array(values, np.float64).reshape(2, 4, 3)
    x = x * np.exp2(np.array(exponents, np.float64)).reshape(2, 1, 3)
    with np.errstate(over="ignore"):
        x = np.clip(x, -3e38, 3e38).astype(np.float32)
    s = np.linspace(0.5, 20, 4).astype(np.float32)
    g = np.ones_like(x)
    spec = Spec.create(axis=1)
    want = reference.forward(x, s, spec)
    got = np.asarray(_fwd(x, s))
    ulps = conformance.forward_error(got, want, np.dtype(np.float32), True)
    assert ulps <= 1, (x, got, want)  # faithful: pair sums, each output rounded once
    dx, ds = _grad(x, s, g)
    dx_ref, ds_ref = reference.vjp(x, s, g, spec)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(ds))
    # The suite's gradient measure; XLA:CPU flushes subnormal results, so flushes=True.
    dx_mag, ds_mag = conformance.gradient_magnitudes(x, s, g, spec)
    error = conformance.gradient_error(
        dx, dx_ref, dx_mag, ds, ds_ref, ds_mag, np.dtype(np.float32), flushes=True
    )
    assert error <= 16, (x, dx, dx_ref, ds, ds_ref)


# --------------------------------------------------------------------------- transformations


def _data(shape=(4, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :, 0] = 0.0  # an all-zero slice: the exact path
    return jnp.asarray(x), jnp.asarray(rng.uniform(1, 20, shape[1]).astype(np.float32))


def test_jit_vmap_grad_checkpoint_agree():
    x, s = _data()

    def f(x, s):
        return l2_normalize(x, s, axis=1, eps_mode="add_norm", eps=1e-3)

    def loss(f):
        return lambda x, s: jnp.sum(jnp.sin(f(x, s)))

    y = f(x, s)
    np.testing.assert_allclose(jax.jit(f)(x, s), y, rtol=1e-6)
    per_sample = jax.vmap(lambda xi: l2_normalize(xi, s, axis=0, eps_mode="add_norm", eps=1e-3))
    np.testing.assert_allclose(per_sample(x), y, rtol=1e-6)
    g = jax.grad(loss(f), (0, 1))(x, s)
    g_ckpt = jax.jit(jax.grad(loss(jax.checkpoint(f)), (0, 1)))(x, s)
    g_vmap = jax.vmap(jax.grad(lambda xi: jnp.sum(jnp.sin(f(xi[None], s)))))(x)
    for what, a, b in [
        ("checkpoint dx", g[0], g_ckpt[0]),
        ("checkpoint dscale", g[1], g_ckpt[1]),
        ("vmap dx", g[0], g_vmap),
    ]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)
    assert np.all(np.isfinite(g[0]))
    # At the zero slice: scale * cotangent / eps, where autodiff of the formula gives NaN.
    cot = jnp.cos(y)
    np.testing.assert_allclose(g[0][0, :, 0], s * cot[0, :, 0] / 1e-3, rtol=1e-5)


@pytest.mark.parametrize("eps_mode", EPS_MODES)
def test_check_grads_float64_second_order(eps_mode):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((3, 5)))
        s = jnp.asarray(rng.uniform(1, 3, 5))
        assert x.dtype == jnp.float64

        def f(x, s):
            return l2_normalize(x, s, eps_mode=eps_mode, eps=1e-3)

        check_grads(f, (x, s), order=2, modes=["rev"])
    assert jnp.asarray(1.0).dtype == jnp.float32  # the context left x64 off


def test_half_precision_dtypes_round_trip():
    x, s = _data()
    for dtype in (jnp.float16, jnp.bfloat16):
        y = l2_normalize(x.astype(dtype), s, axis=1)
        assert y.dtype == dtype
        want = reference.forward(np.asarray(x.astype(dtype)), np.asarray(s), Spec.create(axis=1))
        assert conformance.forward_error(np.asarray(y), want, np.dtype(y.dtype), True) <= 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_input_gradient_saturates_at_the_dtype_maximum(dtype):
    # reference.saturate: scale * g / eps at an all-zero pixel exceeds float16 (the others
    # with a huge cotangent); the largest finite value keeps a loss scaler's scale.
    x = jnp.zeros((2, 4), dtype).at[1].set(1.0)
    g = jnp.full((2, 4), 1.0 if dtype == "float16" else 1e30, dtype)
    dx = jax.vjp(lambda x: l2_normalize(x, jnp.full(4, 20.0, dtype)), x)[1](g)[0]
    top = float(jnp.finfo(dtype).max)
    np.testing.assert_array_equal(np.asarray(dx[0], np.float64), np.full(4, top))
    assert np.all(np.isfinite(np.asarray(dx, np.float64)))


# --------------------------------------------------------------------------- one program


def _branches(program: str) -> set[str]:
    """The branching ops of a lowered (StableHLO) program, whatever primitive emitted them."""
    return set(re.findall(r"stablehlo\.(while|case|if)\b", program))


@pytest.mark.parametrize(
    "dtype, options",
    [
        *[("float32", {"eps_mode": mode}) for mode in EPS_MODES],
        ("float32", {"eps": 1e-40}),  # the top rung's sum read from the bits
        ("bfloat16", {"axis": 1}),
        ("float16", {"across_spatial": True}),
        ("float64", {"eps_mode": "add_sumsq"}),
    ],
)
@pytest.mark.parametrize("lowering", [None, "ops"])
def test_program_has_no_branch(dtype, options, lowering):
    # One program for every batch: no cond / while anywhere (a data-dependent branch makes
    # one sample's result depend on its neighbours, and on GPU reads its predicate back).
    with jax.enable_x64(dtype == "float64"), use_lowering(lowering):
        x = jnp.ones((2, 4, 3, 3), dtype)
        s = jnp.ones(x.shape[options.get("axis", -1)], dtype)

        def f(x, s):
            return l2_normalize(x, s, **options)

        def pullback(x, s, g):
            return jax.vjp(f, x, s)[1](g)

        forward = jax.jit(f).lower(x, s).as_text()
        backward = jax.jit(pullback).lower(x, s, x).as_text()
    # the programs hold the computation: the ladder's sums, or the native kernel's calls
    for program in (forward, backward):
        assert "stablehlo.reduce" in program or "l2norm_" in program
    assert not _branches(forward) | _branches(backward)


def test_branch_search_sees_branches():
    # The search above finds a cond inside a jitted function (so its silence means something).
    def branchy(x):
        return jax.jit(lambda x: lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x))(x)

    assert _branches(jax.jit(branchy).lower(jnp.ones(3)).as_text())


def test_float32_does_not_depend_on_x64_flag():
    x, s = _data()
    g = jnp.cos(x)

    def run():
        y, pullback = jax.vjp(lambda x, s: l2_normalize(x, s, axis=1), x, s)
        return [np.asarray(a) for a in (y, *pullback(g))]

    without = run()
    with jax.enable_x64(True):
        with_x64 = run()
    for a, b in zip(without, with_x64, strict=True):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- batch invariance

#: (shape, axis): small SSD-like feature maps, NCHW over axis 1 and NHWC over -1.
INVARIANCE_LAYOUTS = [((16, 32, 5, 5), 1), ((16, 5, 5, 32), -1)]


def _set_pixel(x: np.ndarray, axis: int, sample: int, pixel: tuple, value: float) -> None:
    if axis == 1:
        x[sample, :, pixel[0], pixel[1]] = value
    else:
        x[sample, pixel[0], pixel[1], :] = value


@functools.cache
def _invariance_program(axis: int, options: tuple):
    def run(x, s, g):
        y, pullback = jax.vjp(lambda x: l2_normalize(x, s, axis=axis, **dict(options)), x)
        return y, pullback(g)[0]

    return jax.jit(run)


@pytest.mark.parametrize("shape, axis", INVARIANCE_LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize(
    "options",
    [(), (("eps_mode", "add_sumsq"),), (("eps", 1e-40),)],
    ids=["default", "add_sumsq", "bits-in-sums"],
)
def test_sample_is_bitwise_independent_of_its_batch(shape, axis, options):
    """Sample 0's output and input gradient (its cotangent fixed) are bitwise the same
    alone, in batches of 1, 3, 8 and 16, and next to samples holding an all-zero pixel, a
    pixel whose squares overflow float32 (1e25) and one whose squares underflow (1e-25).

    XLA:CPU reduces arrays of fewer than 4096 elements with its own loops and larger ones
    with YNNPACK, in another order (2-3 ULP apart in the output here); l2norm.jax pads the
    small ones, so every batch size sums alike.
    """
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    s = jnp.asarray(rng.uniform(0.5, 20, shape[axis]).astype(np.float32))
    hostile = x.copy()
    for sample, value in ((1, 0.0), (2, 1e25), (3, 1e-25)):
        for n in range(sample, shape[0], 3):  # the hostile pixels recur through the batch
            _set_pixel(hostile, axis, n, (sample, 2), value)
    run = _invariance_program(axis, options)
    alone_y, alone_dx = (np.asarray(a[0]) for a in run(x[:1], s, g[:1]))
    assert np.all(np.isfinite(alone_y)) and np.all(np.isfinite(alone_dx))
    for batch in (1, 3, 8, 16):
        for data in (x, hostile):
            y, dx = run(data[:batch], s, g[:batch])
            np.testing.assert_array_equal(np.asarray(y[0]), alone_y, err_msg=f"y, {batch}")
            np.testing.assert_array_equal(np.asarray(dx[0]), alone_dx, err_msg=f"dx, {batch}")
    # The hostile neighbours themselves come out as the reference says.
    y, _ = run(hostile[:4], s, g[:4])
    want = reference.forward(hostile[:4], np.asarray(s), Spec.create(axis=axis, **dict(options)))
    assert conformance.forward_error(np.asarray(y), want, np.dtype(np.float32), True) <= 1


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"channel_shared": True, "scale_init": 10.0},
        {"axis": 1, "preset": "caffe"},
        {"across_spatial": True, "axis": 3, "eps_mode": "add_norm"},
        {"scale_init": nn.initializers.uniform(3.0)},
        {"learnable": False, "dtype": jnp.bfloat16},
    ],
)
def test_nnx_and_linen_give_identical_outputs(kwargs):
    # In the style of Flax's tests/nnx/nn/normalization_test.py: same params, same output.
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 6))
    linen_layer = LinenL2Norm(**kwargs)
    variables = linen_layer.init(jax.random.key(1), x)
    nnx_layer = NnxL2Norm(6, rngs=nnx.Rngs(1), **kwargs)
    collection = "params" if kwargs.get("learnable", True) else "constants"
    nnx_layer.scale.value = variables[collection]["scale"]
    np.testing.assert_array_equal(nnx_layer(x), linen_layer.apply(variables, x))
    assert nnx_layer(x).dtype == kwargs.get("dtype", x.dtype)


def test_nnx_parameter_kinds():
    layer = NnxL2Norm(8)
    assert isinstance(layer.scale, nnx.Param)
    np.testing.assert_array_equal(layer.scale.value, np.full(8, 20.0, np.float32))
    frozen = NnxL2Norm(8, learnable=False, param_dtype=jnp.bfloat16)
    assert isinstance(frozen.scale, Constant) and not isinstance(frozen.scale, nnx.Param)
    assert frozen.scale.value.dtype == jnp.bfloat16
    assert len(jax.tree.leaves(nnx.state(frozen, nnx.Param))) == 0


def test_bad_input_errors_name_the_value():
    layer = NnxL2Norm(8)
    with pytest.raises(ValueError, match="4 features.*num_features=8"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="int32"):
        layer(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        NnxL2Norm(8, axis=3)(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"scale has shape \(3,\)"):
        l2_normalize(jnp.ones((2, 8)), jnp.ones(3))
    with pytest.raises(TypeError, match="int32"):
        jax.jit(l2_normalize)(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        LinenL2Norm(axis=2).init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="scale_init has shape"):
        NnxL2Norm(8, scale_init=[1.0, 2.0])


# --------------------------------------------------------------------------- scale out


def test_sharded_data_parallel_train_step_matches_one_device():
    devices = jax.devices()
    assert len(devices) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    mesh = Mesh(np.array(devices[:4]), ("data",))
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 16))
    x = x.at[0, 0, 0].set(0.0)
    layer = NnxL2Norm(16)
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def step(params, x):
        def loss(params):
            y = nnx.merge(graphdef, params)(x)
            return jnp.mean((y - 1.0) ** 2), y

        (value, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, y, grads

    one = step(params, x)
    sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    many = step(replicated, sharded_x)
    assert len(many[1].sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_serialization_round_trips(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    layer = NnxL2Norm(8, scale_init=np.linspace(1, 8, 8))
    pure = nnx.state(layer).to_pure_dict()
    fresh = NnxL2Norm(8)
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(
        state, serialization.from_bytes(state.to_pure_dict(), serialization.to_bytes(pure))
    )
    nnx.update(fresh, state)
    np.testing.assert_array_equal(fresh(x), layer(x))

    linen_layer = LinenL2Norm(scale_init=np.linspace(1, 8, 8))
    variables = linen_layer.init(jax.random.key(0), x)
    blank = LinenL2Norm().init(jax.random.key(0), x)
    restored = serialization.from_bytes(blank, serialization.to_bytes(variables))
    np.testing.assert_array_equal(linen_layer.apply(restored, x), linen_layer.apply(variables, x))

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "nnx", nnx.state(layer))
        checkpointer.save(tmp_path / "linen", variables)
        checkpointer.wait_until_finished()
        abstract = nnx.state(nnx.eval_shape(lambda: NnxL2Norm(8)))
        loaded = checkpointer.restore(tmp_path / "nnx", abstract)
        loaded_linen = checkpointer.restore(tmp_path / "linen", blank)
    fresh = NnxL2Norm(8)
    nnx.update(fresh, loaded)
    np.testing.assert_array_equal(fresh(x), layer(x))
    np.testing.assert_array_equal(
        linen_layer.apply(loaded_linen, x), linen_layer.apply(variables, x)
    )


def test_flax_layers_name_what_is_wrong():
    with pytest.raises(ValueError, match="num_features must be positive, got 0"):
        NnxL2Norm(0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="num_features must be an int"):
        NnxL2Norm(8.0, rngs=nnx.Rngs(0))
    layer = LinenL2Norm()
    variables = layer.init(jax.random.key(0), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"the input has 4 channels .*made for 8 channels"):
        layer.apply(variables, jnp.ones((2, 4)))
    np.testing.assert_array_equal(
        layer.apply(variables, jnp.ones((2, 8))), np.full((2, 8), 20 / np.sqrt(8), np.float32)
    )
