"""The transformation matrix of l2norm.jax: every JAX transformation on both lowerings
("cpu-kernel": the native kernel's custom calls; "ops": the ladder in jax.numpy),
compared by VALUE with the NumPy reference or with a loop over examples.

Measures: forward results in ULPs of the data's dtype (``conformance.forward_error``),
first derivatives with the suite's gradient measure (``conformance.gradient_error``: eps
relative to the size of the terms summed), second derivatives against central
differences of the reference's VJP in float64.

Run with four host devices for the sharding cases:
``XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest tests/test_jax_transforms.py``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from l2norm import conformance, reference
from l2norm.core.spec import RMSSpec, Spec
from l2norm.jax import LOWERINGS, l2_normalize, rms_norm, use_lowering
from l2norm.nnx import L2Norm as NnxL2Norm

#: The gradient measure's bound (eps of the dtype, relative to the terms summed).
GRAD_EPS = 2.0
F32 = np.dtype(np.float32)
#: RMSNorm: the L2 op with the mean placement, ``d = sqrt(mean(x**2) + eps)``, as
#: ``l2norm.jax.rms_norm`` computes it with eps 1e-6.
RMS_EPS = 1e-6
RMS = {"eps_mode": "add_meansq", "eps": RMS_EPS}
RMS_SPEC = RMSSpec.create(eps=RMS_EPS).spec("float32")

pytestmark = pytest.mark.parametrize("lowering", LOWERINGS)


@pytest.fixture(autouse=True)
def _forced(lowering):
    with use_lowering(lowering):
        yield


def _data(shape=(4, 6, 5), axis=1, seed=0, zero_slice=True):
    """``x`` (an all-zero slice where asked), a per-channel scale and a cotangent."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if zero_slice:
        x[(0,) * (axis % len(shape))] = 0.0  # one whole slice along `axis` of zeros
    s = rng.uniform(0.5, 20, shape[axis]).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    return x, s, g


def _assert_forward(got, x, s, axis, dtype=F32, spec=None):
    """Within 1 ULP of the reference (``spec``: the L2 op's default over ``axis``)."""
    spec = spec or Spec.create(axis=axis)
    want = reference.forward(np.asarray(x), np.asarray(s), spec)
    ulps = conformance.forward_error(np.asarray(got), want, dtype, True)
    assert ulps <= 1, f"{ulps} ULP"


def _assert_vjp(dx, ds, x, s, g, axis, dtype=F32, spec=None):
    """``(dx, ds)`` against the reference VJP, in the suite's gradient measure (``dx``
    None: the scale gradient alone)."""
    x, s, g = (np.asarray(a) for a in (x, s, g))
    spec = spec or Spec.create(axis=axis)
    dx_ref, ds_ref = reference.vjp(x, s, g, spec)
    dx = dx_ref if dx is None else dx
    dx_mag, ds_mag = conformance.gradient_magnitudes(x, s, g, spec)
    error = conformance.gradient_error(
        np.asarray(dx), dx_ref, dx_mag, np.asarray(ds), ds_ref, ds_mag, dtype, flushes=True
    )
    assert error <= GRAD_EPS, f"{error} eps"


# --------------------------------------------------------------------------- vmap


def test_vmap_over_input_scale_both_and_nested(lowering):
    x, s, _ = _data()
    scales = np.stack([s, 2 * s, s[::-1].copy()])
    xs = np.stack([x, -2 * x, x[::-1].copy()])
    shared = [np.full_like(s, v) for v in scales[:, 0]]
    vmap = jax.vmap

    def one(x, s):  # one example (C, W)
        return l2_normalize(x, s, axis=0)

    def batch(x, s):  # (N, C, W)
        return l2_normalize(x, s, axis=1)

    @jax.jit  # one program: compiling dominates
    def run(x, s, scales, xs):
        return {
            "input": vmap(one, (0, None))(x, s),
            "a non-leading axis": vmap(lambda xj, s: batch(xj, s), (2, None), 2)(x, s),
            "input, one shared scale": vmap(one, (0, None))(x, s[:1]),
            "shared scales": vmap(batch, (None, 0))(x, scales[:, :1]),
            "scales (an ensemble)": vmap(batch, (None, 0))(x, scales),
            "both": vmap(batch, (0, 0))(xs, scales),
            "nested, scale outside": vmap(vmap(one, (0, None)), (None, 0))(x, scales),
            "nested, both outside": vmap(vmap(one, (0, None)), (0, 0))(xs, scales),
            "nested, scale inside": vmap(vmap(one, (None, 0)), (0, None))(x, scales),
            # XLA once rewrote the ladder's Inf count of a broadcast into a flushed reciprocal
            "a broadcast input": batch(jnp.broadcast_to(x, (3, *x.shape)).reshape(-1, 6, 5), s),
        }

    got = run(x, s, scales, xs)
    want = {
        "input": [(x, s)],
        "a non-leading axis": [(x, s)],
        "input, one shared scale": [(x, shared[0])],
        "shared scales": [(x, shared[k]) for k in range(3)],
        "scales (an ensemble)": [(x, scales[k]) for k in range(3)],
        "both": [(xs[k], scales[k]) for k in range(3)],
        "nested, scale outside": [(x, scales[k]) for k in range(3)],
        "nested, both outside": [(xs[k], scales[k]) for k in range(3)],
        "nested, scale inside": [(x, scales[k]) for k in range(3)],
        "a broadcast input": [(np.concatenate([x] * 3), s)],
    }
    for name, cases in want.items():
        y = got[name]
        if name == "nested, scale inside":
            y = jnp.moveaxis(y, 1, 0)
        for k, (xk, sk) in enumerate(cases):
            _assert_forward(y if len(cases) == 1 else y[k], xk, sk, 1)


def _loss(axis, **options):
    """``loss(x, s, c)``, whose cotangent is ``c``: the reference VJP's own input."""
    return lambda x, s, c: jnp.sum(l2_normalize(x, s, axis=axis, **options) * c)


def test_per_example_gradients_of_input_and_scale(lowering):
    x, s, g = _data()
    scales = np.stack([s, 3 * s])
    cots = np.stack([g, -g[::-1].copy()])
    per_example = jax.vmap(jax.grad(_loss(0), (0, 1)), (0, None, 0))

    @jax.jit  # one program: compiling dominates
    def run(x, s, g, scales, cots):
        return {
            "per example": per_example(x, s, g),
            "per example, one shared scale": per_example(x, s[:1], g),
            "an ensemble on one input": jax.vmap(jax.grad(_loss(1), (0, 1)), (None, 0, None))(
                x, scales, g
            ),
            "the cotangent alone": jax.vmap(
                lambda c: jax.vjp(lambda x, s: l2_normalize(x, s, axis=1), x, s)[1](c)
            )(cots),
        }

    got = run(x, s, g, scales, cots)
    want = {
        "per example": [(x[i], s, g[i], 0) for i in range(x.shape[0])],
        "per example, one shared scale": [(x[i], s[:1], g[i], 0) for i in range(x.shape[0])],
        "an ensemble on one input": [(x, scales[k], g, 1) for k in range(2)],
        "the cotangent alone": [(x, s, cots[k], 1) for k in range(2)],
    }
    for name, cases in want.items():
        dx, ds = got[name]
        for k, (xk, sk, gk, axis) in enumerate(cases):
            _assert_vjp(dx[k], ds[k], xk, sk, gk, axis)


def test_half_precision_vmap_grad(lowering):
    x, s, g = _data(zero_slice=False)
    for dtype in (jnp.float16, jnp.bfloat16):
        xh, gh = x.astype(dtype), g.astype(dtype)
        dx, ds = jax.jit(jax.vmap(jax.grad(_loss(0), (0, 1)), (0, None, 0)))(xh, s, gh)
        assert dx.dtype == dtype
        for i in range(x.shape[0]):
            _assert_vjp(dx[i], ds[i], xh[i], s, gh[i], 0, np.dtype(dtype))


# --------------------------------------------------------------------------- forward mode


def _reference_jacobians(x, s, axis, spec=None):
    """``dy/dx`` and ``dy/ds`` in float64, one row per output from the reference VJP
    (row ``i`` of a Jacobian is the VJP of the ``i``-th unit cotangent)."""
    spec = spec or Spec.create(axis=axis)
    x64, s64 = np.asarray(x, np.float64), np.asarray(s, np.float64)
    rows_x, rows_s = [], []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = 1.0
        dx, ds = reference.vjp(x64, s64, e.reshape(x.shape), spec)
        rows_x.append(dx.reshape(-1))
        rows_s.append(ds.reshape(-1))
    return np.array(rows_x), np.array(rows_s)


def _assert_tangent(ty, tx, ts, jacobians, dtype=jnp.float32):
    """A forward-mode tangent against the reference Jacobians times ``(tx, ts)``, in eps
    relative to the terms summed, as for a gradient."""
    jac_x, jac_s = jacobians
    t64, ts64 = np.asarray(tx, np.float64).reshape(-1), np.asarray(ts, np.float64)
    want = jac_x @ t64 + jac_s @ ts64
    terms = np.abs(jac_x) @ np.abs(t64) + np.abs(jac_s) @ np.abs(ts64)
    error = np.max(np.abs(np.asarray(ty, np.float64).reshape(-1) - want) / terms)
    assert error <= GRAD_EPS * float(jnp.finfo(dtype).eps), (dtype, error)


def test_jvp_and_jacfwd_match_the_reference_vjp(lowering):
    # Small: the reference Jacobians take one VJP per output.
    x, s, _ = _data((3, 4, 2), axis=1)
    rng = np.random.default_rng(1)
    f = lambda x, s: l2_normalize(x, s, axis=1)  # noqa: E731
    # half precision without the zero slice: its exact tangent s tx / eps overflows them
    smooth = _data((3, 4, 2), axis=1, zero_slice=False)[0]
    for dtype, data in ((jnp.float32, x), (jnp.float16, smooth), (jnp.bfloat16, smooth)):
        xd = data.astype(dtype)
        jacobians = _reference_jacobians(np.asarray(xd, np.float64), s, 1)
        tx = rng.standard_normal(x.shape).astype(dtype)
        ts = rng.standard_normal(s.shape).astype(np.float32)
        y, ty = jax.jit(lambda x, s, tx, ts: jax.jvp(f, (x, s), (tx, ts)))(xd, s, tx, ts)
        assert ty.dtype == dtype
        _assert_forward(y, np.asarray(xd), s, 1, np.dtype(dtype))
        _assert_tangent(ty, tx, ts, jacobians, dtype)
    # jacfwd: row i is the VJP of the unit cotangent i
    got_x, got_s = jax.jacfwd(f, (0, 1))(x, s)
    got_x = np.asarray(got_x).reshape(x.size, x.size)
    got_s = np.asarray(got_s).reshape(x.size, s.size)
    jac_x, jac_s = _reference_jacobians(x, s, 1)
    for i in range(x.size):
        e = np.zeros(x.size, np.float32)
        e[i] = 1.0
        _assert_vjp(got_x[i].reshape(x.shape), got_s[i], x, s, e.reshape(x.shape), 1)


# --------------------------------------------------------------------------- higher order


def _finite_difference(fn, v, h):
    """``d fn / dv`` (columns) by central differences in float64."""
    columns = []
    for j in range(v.size):
        e = np.zeros(v.size)
        e[j] = h
        columns.append((fn(v + e) - fn(v - e)) / (2 * h))
    return np.stack(columns, axis=-1)


def _relative(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


#: Second derivatives (a derivative of the ladder, in float32) against float64
#: differences: within 2**-14 of the largest entry (float32 has 2**-23; the second
#: derivative of x / n loses a few bits to cancellation).
SECOND_ORDER = 2.0**-14


def test_hessian_and_grad_of_grad(lowering):
    # no zero slice: the central differences must not cross eps's kink
    x, s, g = _data((2, 5), axis=1, zero_slice=False)
    spec = Spec.create(axis=1)
    n_x = x.size

    def ref_grad(v):  # float64 gradient of sum(y * g) in x and s, flattened
        dx, ds = reference.vjp(v[:n_x].reshape(x.shape), v[n_x:], g.astype(np.float64), spec)
        return np.concatenate([dx.reshape(-1), ds.reshape(-1)])

    v0 = np.concatenate([x.reshape(-1), s]).astype(np.float64)
    want = _finite_difference(ref_grad, v0, 1e-5)

    w = np.random.default_rng(2).standard_normal(v0.size).astype(np.float32)

    def inner(x, s):  # <grad(x, s), w>
        dx, ds = jax.grad(_loss(1), (0, 1))(x, s, g)
        return jnp.sum(dx.reshape(-1) * w[:n_x]) + jnp.sum(ds * w[n_x:])

    @jax.jit  # one program: compiling dominates
    def run(x, s):
        return (
            jax.hessian(_loss(1), (0, 1))(x, s, g),
            jax.grad(inner, (0, 1))(x, s),  # grad of grad: H w
            jax.jacfwd(lambda x: jax.grad(inner)(x, s))(x),  # third order: d(H w)/dx
        )

    hess, (gx, gs), third = run(x, s)
    got = np.block(
        [
            [np.asarray(hess[0][0]).reshape(n_x, n_x), np.asarray(hess[0][1]).reshape(n_x, -1)],
            [np.asarray(hess[1][0]).reshape(-1, n_x), np.asarray(hess[1][1]).reshape(-1, s.size)],
        ]
    )
    assert _relative(got, want) <= SECOND_ORDER
    assert _relative(np.concatenate([np.ravel(gx), gs]), want @ w) <= SECOND_ORDER

    def ref_hw(v):  # H w at (v, s), the x part: differences of the differences above
        full = np.concatenate([v, s.astype(np.float64)])
        return (_finite_difference(ref_grad, full, 1e-5) @ w)[:n_x]

    want3 = _finite_difference(ref_hw, x.reshape(-1).astype(np.float64), 1e-4)
    assert _relative(np.asarray(third).reshape(n_x, n_x), want3) <= 2.0**-8


# --------------------------------------------------------------------------- sharding

_COLLECTIVE = re.compile(r"(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)")


def _collectives(program: str) -> list[str]:
    """The collective instructions of a compiled (HLO) program, one line each."""
    return [
        line.strip() for line in program.splitlines() if _COLLECTIVE.search(line) and "=" in line
    ]


@pytest.mark.parametrize(
    "shape, axis, options",
    [((8, 4, 4, 32), -1, {}), ((8, 32, 4, 4), 1, {}), ((8, 16, 32), -1, RMS)],
    ids=["NHWC", "NCHW", "RMSNorm"],
)
def test_batch_sharded_input_stays_sharded(lowering, shape, axis, options):
    devices = jax.devices()
    assert len(devices) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    mesh = Mesh(np.array(devices[:4]), ("data",))
    x, s, g = _data(shape, axis)
    spec = Spec.create(axis=axis, **options)
    forward = jax.jit(lambda x, s: l2_normalize(x, s, axis=axis, **options))
    backward = jax.jit(jax.grad(_loss(axis, **options), (0, 1)))
    batch = NamedSharding(mesh, P("data"))
    xs, gs = jax.device_put(x, batch), jax.device_put(g, batch)
    ss = jax.device_put(s, NamedSharding(mesh, P()))

    y = forward(xs, ss)
    assert y.sharding.is_equivalent_to(batch, x.ndim)
    _assert_forward(y, x, s, axis, spec=spec)
    dx, ds = backward(xs, ss, gs)
    assert dx.sharding.is_equivalent_to(batch, x.ndim)
    _assert_vjp(dx, ds, x, s, g, axis, spec=spec)

    assert _collectives(forward.lower(xs, ss).compile().as_text()) == []
    # the one collective: the data-parallel sum of the scale gradient (C numbers)
    for line in _collectives(backward.lower(xs, ss, gs).compile().as_text()):
        assert "all-reduce" in line and f"f32[{shape[axis]}]" in line, line


def test_sharded_normalized_axis_is_gathered_not_wrong(lowering):
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x, s, g = _data((4, 4, 2, 32), -1)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, None, None, "data")))
    y = jax.jit(lambda x, s: l2_normalize(x, s))(xs, s)
    _assert_forward(y, x, s, -1)
    dx, ds = jax.jit(jax.grad(_loss(-1), (0, 1)))(xs, s, g)
    _assert_vjp(dx, ds, x, s, g, -1)


# --------------------------------------------------------------------------- RMSNorm


def test_rms_norm_under_vmap_per_example_grads_jvp_and_grad_of_grad(lowering):
    """RMSNorm (``rms_norm`` over the last axis, a scale per channel) under a representative
    subset of the matrix, in one program; sharding is in the test above."""
    x, s, g = _data((3, 4, 8), axis=-1)  # with an all-zero row
    smooth = _data((3, 4, 8), axis=-1, zero_slice=False)[0]  # for central differences
    scales = np.stack([s, 2 * s, s[::-1].copy()])
    rng = np.random.default_rng(3)
    tx, ts = rng.standard_normal(x.shape, np.float32), rng.standard_normal(8, np.float32)
    w = rng.standard_normal(x.size + s.size).astype(np.float32)

    def rms(x, s):
        return rms_norm(x, s, eps=RMS_EPS)

    def loss(x, s, c):
        return jnp.sum(rms(x, s) * c)

    def inner(x, s):  # <grad(x, s), w>
        dx, ds = jax.grad(loss, (0, 1))(x, s, g)
        return jnp.sum(dx.reshape(-1) * w[: x.size]) + jnp.sum(ds * w[x.size :])

    @jax.jit  # one program: compiling dominates
    def run(x, s, g, scales, smooth):
        return {
            "per example": jax.vmap(rms, (0, None))(x, s),
            "ensemble": jax.vmap(rms, (None, 0))(x, scales),
            "grads": jax.vmap(jax.grad(loss, (0, 1)), (0, None, 0))(x, s, g),
            "jvp": jax.jvp(rms, (x, s), (tx, ts)),
            "grad of grad": jax.grad(inner, (0, 1))(smooth, s),
        }

    got = run(x, s, g, scales, smooth)
    for i in range(3):
        _assert_forward(got["per example"][i], x[i], s, -1, spec=RMS_SPEC)
        _assert_forward(got["ensemble"][i], x, scales[i], -1, spec=RMS_SPEC)
        dx, ds = (d[i] for d in got["grads"])
        _assert_vjp(dx, ds, x[i], s, g[i], -1, spec=RMS_SPEC)
    y, ty = got["jvp"]
    _assert_forward(y, x, s, -1, spec=RMS_SPEC)
    _assert_tangent(ty, tx, ts, _reference_jacobians(x, s, -1, RMS_SPEC))

    # H w against float64 central differences of the reference gradient
    def ref_grad(v):
        xv = v[: x.size].reshape(x.shape)
        dx, ds = reference.vjp(xv, v[x.size :], g.astype(np.float64), RMS_SPEC)
        return np.concatenate([dx.reshape(-1), ds.reshape(-1)])

    v0 = np.concatenate([smooth.reshape(-1), s]).astype(np.float64)
    want = _finite_difference(ref_grad, v0, 1e-5) @ w
    gx, gs = got["grad of grad"]
    assert _relative(np.concatenate([np.ravel(gx), gs]), want) <= SECOND_ORDER


# --------------------------------------------------------------------------- Flax, scan


def test_nnx_vmap_ensemble_with_a_shared_input(lowering):
    x, s, g = _data((2, 3, 3, 8), -1)
    scales = np.stack([s, 2 * s, s[::-1].copy()])
    layer = NnxL2Norm(8)
    graphdef, params = nnx.split(layer, nnx.Param)
    stacked = jax.tree.map(lambda p: jnp.asarray(scales), params)

    def member(params, x):
        return nnx.merge(graphdef, params)(x)

    ys = nnx.vmap(member, in_axes=(0, None))(stacked, x)
    grads = jax.grad(lambda p: jnp.sum(nnx.vmap(member, in_axes=(0, None))(p, x) * g))(stacked)
    dscales = jax.tree.leaves(grads)[0]
    for k in range(3):
        _assert_forward(ys[k], x, scales[k], -1)
        _assert_vjp(None, dscales[k], x, scales[k], g, -1)


def test_remat_and_scan_match_a_python_loop(lowering):
    x, s, _ = _data((2, 6, 5), axis=1)
    scales = np.stack([s, s[::-1].copy(), 0.5 * s])

    def step(h, s):
        return jnp.tanh(l2_normalize(h, s, axis=1)) + 0.5 * h, None

    def scanned(x, scales):
        return jnp.sum(jnp.sin(jax.lax.scan(jax.checkpoint(step), x, scales)[0]))

    def looped(x, scales):
        for k in range(scales.shape[0]):
            x = step(x, scales[k])[0]
        return jnp.sum(jnp.sin(x))

    got = jax.jit(jax.value_and_grad(scanned, (0, 1)))(x, scales)
    want = jax.jit(jax.value_and_grad(looped, (0, 1)))(x, scales)
    # the same computation rematerialized: equal up to XLA's fusion of the elementwise ops
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        ulps = conformance.forward_error(np.asarray(a), np.asarray(b), F32, True)
        assert ulps <= 4, ulps


# --------------------------------------------------------------------------- zero size


@pytest.mark.parametrize("shape", [(0, 6, 5), (4, 0, 5), (4, 6, 0)])
def test_zero_size_inputs_give_empty_results(lowering, shape):
    x = jnp.zeros(shape, jnp.float32)
    s = jnp.ones(shape[1], jnp.float32)
    f = lambda x, s: l2_normalize(x, s, axis=1)  # noqa: E731
    for run in (f, jax.jit(f)):
        y = run(x, s)
        assert y.shape == shape and y.dtype == x.dtype
    dx, ds = jax.grad(lambda x, s: jnp.sum(f(x, s)), (0, 1))(x, s)
    assert dx.shape == shape
    np.testing.assert_array_equal(ds, np.zeros(shape[1]))
    _, ty = jax.jvp(f, (x, s), (x, s))
    assert ty.shape == shape
    assert jax.vmap(f, (0, None))(x[None], s).shape == (1, *shape)
    assert jax.vmap(f, (None, 0))(x, jnp.ones((0, shape[1]))).shape == (0, *shape)
    # an empty batch of non-empty examples
    one = lambda x, s: l2_normalize(x, s, axis=0)  # noqa: E731
    assert jax.vmap(one, (0, None))(jnp.zeros((0, 6, 5)), jnp.ones(6)).shape == (0, 6, 5)
