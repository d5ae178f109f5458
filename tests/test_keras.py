"""The Keras 3 adapter, run once per Keras backend (scripts/test sets KERAS_BACKEND).

Every case of the conformance suite, hypothesis against the reference, serialization,
export, training, data parallelism, compilation, mixed precision and bad input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from l2norm import conformance, reference
from l2norm._spec import Spec
from l2norm.keras import BACKEND, L2Norm, _backend_vjp, l2_normalize

pytestmark = pytest.mark.keras

KERAS_BACKEND = keras.backend.backend()
on_tensorflow = pytest.mark.skipif(KERAS_BACKEND != "tensorflow", reason="TensorFlow only")
on_jax = pytest.mark.skipif(KERAS_BACKEND != "jax", reason="JAX only")


def test_runs_on_the_requested_backend():
    # scripts/test runs this file once per backend; a silent fallback would test one twice.
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
    assert BACKEND.name == f"keras-{os.environ['KERAS_BACKEND']}"
    assert conformance.get_backend(BACKEND.name) is BACKEND


# --------------------------------------------------------------------------- conformance

CASES = [c for c in conformance.cases() if c.dtype in BACKEND.dtypes]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_conformance(case):
    result = conformance.run_case(BACKEND, case)
    assert result.passed, (
        f"{case.id} on {BACKEND.name}: forward {result.forward_ulps} ULP "
        f"(bound {BACKEND.forward_ulps[case.dtype]}), gradient {result.grad_eps} eps "
        f"(bound {BACKEND.grad_eps[case.dtype]}), {result.nonfinite} non-finite "
        f"mismatches, error {result.error}"
    )


def test_float64_is_covered_unless_jax_lacks_x64():
    if KERAS_BACKEND == "jax":
        import jax

        assert ("float64" in BACKEND.dtypes) == bool(jax.config.jax_enable_x64)
    else:
        assert "float64" in BACKEND.dtypes


@pytest.mark.parametrize(
    "case_id",
    [
        "1:default:per_channel:float32:hostile",
        "2:preset=caffe:per_channel:float32:hostile",
        "5:mode=add_norm:per_channel:float32:hostile",
        "4:mode=clamp_sumsq:per_channel:float16:hostile",
        "0:mode=add_sumsq:shared:float32:random",
    ],
)
def test_layer_matches_the_conformance_path(case_id):
    """The layer, with gamma set to the case's scale, computes what the functional does."""
    case = conformance.Case.from_id(case_id)
    x, scale, _ = case.inputs()
    options = case.options
    layer = L2Norm(
        options["axis"],
        across_spatial=options["across_spatial"],
        eps=options.get("eps"),
        eps_mode=options.get("eps_mode"),
        preset=options.get("preset"),
        channel_shared=case.scale_kind == "shared",
        dtype=case.dtype,
    )
    layer.build(x.shape)
    layer.gamma.assign(scale.astype(np.float32).astype(case.dtype))
    with np.errstate(all="ignore"):
        got = np.asarray(ops.convert_to_numpy(layer(x))).astype(np.float64)
        want = reference.forward(x, scale, Spec.create(**options)).astype(np.float64)
    err = conformance.forward_error(
        got, want, conformance.numpy_dtype(case.dtype), BACKEND.flushes_subnormals
    )
    assert err <= BACKEND.forward_ulps[case.dtype]
    assert np.array_equal(np.isnan(got), np.isnan(want))


# --------------------------------------------------------------------------- hypothesis


@st.composite
def _inputs(draw):
    dtype = draw(st.sampled_from([d for d in ("float32", "float64") if d in BACKEND.dtypes]))
    # A few shapes only: under JAX every new shape compiles every primitive again.
    shape = draw(st.sampled_from([(1, 5), (4, 6), (2, 3, 5), (2, 4, 1, 3)]))
    ndim = len(shape)
    axis_kind = draw(st.sampled_from(["int", "tuple", "across"]))
    if axis_kind == "int":
        options = {"axis": draw(st.integers(-ndim, ndim - 1))}
    elif axis_kind == "tuple":
        axes = draw(st.permutations(range(ndim)))[: draw(st.integers(1, ndim))]
        options = {"axis": tuple(int(a) for a in axes)}
    else:
        options = {"axis": draw(st.integers(1, ndim - 1)), "across_spatial": True}
    choice = draw(st.sampled_from(["default", "mode", "preset"]))
    if choice == "mode":
        options["eps_mode"] = draw(st.sampled_from(["add_sumsq", "add_norm", "clamp_sumsq"]))
        options["eps"] = draw(st.sampled_from([1e-12, 1e-6, 0.5]))
    elif choice == "preset":
        options["preset"] = draw(st.sampled_from(sorted(conformance.PRESETS)))
    axes = Spec.create(**options).resolve(ndim)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Whole slices anywhere in the normal range: squares that overflow or underflow.
    # (Subnormal inputs are covered by the conformance cases; TensorFlow's and XLA's CPU
    # kernels read an isolated subnormal in an otherwise normal slice as zero.)
    info = np.finfo(dtype)
    exponent = draw(st.integers(int(np.log2(info.smallest_normal)) + 60, info.maxexp - 4))
    x = rng.standard_normal(shape) * 2.0**exponent
    x = np.where(rng.random(shape) < 0.1, 0.0, x).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    scale_kind = draw(st.sampled_from(["per_channel", "shared", "none"]))
    scale = conformance.scale_values(scale_kind, shape[axes.channel], rng)
    scale = None if scale is None else scale.astype(dtype)
    return x, scale, g, options, axes


@dataclass(frozen=True)
class _DrawnCase:
    """A hypothesis-drawn input in the shape :func:`conformance.run_case` measures."""

    x: np.ndarray
    scale: np.ndarray | None
    g: np.ndarray
    options: dict

    @property
    def dtype(self) -> str:
        return self.x.dtype.name

    @property
    def id(self) -> str:
        return f"drawn:{self.options}:{self.x.shape}:{self.dtype}"

    def inputs(self):
        return self.x, self.scale, self.g


@given(_inputs())
def test_matches_the_reference(inputs):
    x, scale, g, options, _ = inputs
    result = conformance.run_case(BACKEND, _DrawnCase(x, scale, g, options))
    assert result.passed, result
    dx, _ = BACKEND.vjp(x, scale, g, options)
    assert np.all(np.isfinite(dx)), "finite input must give a finite gradient"


@pytest.mark.parametrize(
    "layout, scale_kind, dtype",
    [
        ("channels_last", "per_channel", "float32"),
        ("channels_first", "per_channel", "float32"),
        ("channels_last", "shared", "float32"),
        ("channels_last", "none", "float32"),
        ("channels_first", "per_channel", "bfloat16"),
        ("spatial", "per_channel", "float32"),
    ],
)
def test_large_inputs_match_the_reference(layout, scale_kind, dtype, monkeypatch):
    """Inputs above ``TF_XLA_MIN_SIZE``: on eager TensorFlow they run the XLA-compiled
    passes and the matrix-product contractions, which the small conformance inputs skip."""
    from l2norm import keras as l2k

    compiled = []
    if KERAS_BACKEND == "tensorflow":
        real = l2k._tf_xla
        monkeypatch.setattr(l2k, "_tf_xla", lambda fn: compiled.append(fn) or real(fn))
    shape, options = {
        "channels_last": ((2, 12, 12, 256), {"axis": -1}),
        "channels_first": ((2, 256, 12, 12), {"axis": 1}),
        "spatial": ((2, 256, 12, 12), {"axis": (1, 2, 3)}),
    }[layout]
    assert np.prod(shape) >= l2k.TF_XLA_MIN_SIZE
    rng = np.random.default_rng(3)
    np_dtype = conformance.numpy_dtype(dtype)
    x = (rng.standard_normal(shape) * 3.0).astype(np_dtype)
    x[0, 0, 0] = 1e-3  # small entries; a zero slice would take the exact rescaling path
    g = rng.standard_normal(shape).astype(np_dtype)
    channels = shape[Spec.create(**options).resolve(len(shape)).channel]
    scale = conformance.scale_values(scale_kind, channels, rng)
    scale = None if scale is None else scale.astype(np_dtype)
    result = conformance.run_case(BACKEND, _DrawnCase(x, scale, g, options))
    assert result.passed, result
    if KERAS_BACKEND == "tensorflow":
        assert {fn.__name__ for fn in compiled} == {"_tf_scale", "_tf_g_u", "_tf_input_grad"}


# --------------------------------------------------------------------------- real use


def _ssd_like_model(channels: int = 8, **layer_kwargs) -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(inputs)
    h = L2Norm(name="l2norm", **layer_kwargs)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def _batch(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, 6, 6, 3)).astype("float32"),
        rng.standard_normal((n, 2)).astype("float32"),
    )


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = _ssd_like_model(scale_init=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], preset="caffe")
    x, _ = _batch()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("l2norm")
    assert isinstance(layer, L2Norm)
    assert layer.get_config() == model.get_layer("l2norm").get_config()
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.gamma), ops.convert_to_numpy(model.get_layer("l2norm").gamma)
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)), rtol=0, atol=0
    )


@on_tensorflow
def test_saved_model_export(tmp_path):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = _ssd_like_model()
    x, _ = _batch()
    model.export(str(tmp_path / "saved"), format="tf_saved_model")
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(
        reloaded.serve(tf.constant(x)).numpy(), ops.convert_to_numpy(model(x)), rtol=1e-6
    )


def test_fit_lowers_the_loss_and_trains_gamma():
    keras.utils.set_random_seed(0)
    model = _ssd_like_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = _batch(32)
    gamma_before = ops.convert_to_numpy(model.get_layer("l2norm").gamma).copy()
    loss_before = float(model.evaluate(x, y, verbose=0))
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    loss_after = float(model.evaluate(x, y, verbose=0))
    gamma_after = ops.convert_to_numpy(model.get_layer("l2norm").gamma)
    assert loss_after < loss_before
    assert not np.allclose(gamma_before, gamma_after)
    assert np.all(np.isfinite(gamma_after))


def test_learnable_false_freezes_gamma():
    layer = L2Norm(learnable=False)
    layer.build((2, 4))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1


@on_jax
def test_data_parallel_matches_one_device():
    import jax

    devices = jax.devices("cpu")
    assert len(devices) == 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    x, y = _batch(16)

    def loss_and_grads(model, xb, yb):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss(tv):
            out, _ = model.stateless_call(tv, non_trainable, xb)
            return ops.mean((out - yb) ** 2), out

        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
        return np.asarray(out), float(value), [np.asarray(g) for g in grads]

    keras.utils.set_random_seed(0)
    single = _ssd_like_model()
    weights = single.get_weights()
    out1, loss1, grads1 = loss_and_grads(single, x, y)

    distribution = keras.distribution.DataParallel(devices=devices)
    try:
        keras.distribution.set_distribution(distribution)
        parallel = _ssd_like_model()
        parallel.set_weights(weights)
        layout = distribution.get_data_layout(x.shape)
        xs = keras.distribution.distribute_tensor(x, layout)
        ys = keras.distribution.distribute_tensor(y, distribution.get_data_layout(y.shape))
        assert len(xs.sharding.device_set) == 4
        out4, loss4, grads4 = loss_and_grads(parallel, xs, ys)
    finally:
        keras.distribution.set_distribution(None)
    np.testing.assert_allclose(out4, out1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for g4, g1 in zip(grads4, grads1, strict=True):
        np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6)


@on_tensorflow
@pytest.mark.parametrize("hostile", [False, True])
def test_tf_function_jit_compile(hostile):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 5, 16)).astype("float32")
    w = tf.constant(rng.standard_normal(x.shape).astype("float32"))
    if hostile:  # takes the rescaling branch
        x[0, 0, 0] = 0.0
        x[1, 0, 0] = 1e30
    layer = L2Norm(eps_mode="add_norm")
    layer.build(x.shape)

    def value_and_grads(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = layer(inputs)
            loss = tf.reduce_sum(out * w)
        return out, tape.gradient(loss, [inputs, layer.gamma.value])

    xt = tf.constant(x)
    eager = value_and_grads(xt)
    compiled = tf.function(value_and_grads, jit_compile=True)(xt)
    np.testing.assert_allclose(compiled[0].numpy(), eager[0].numpy(), rtol=1e-6)
    for c, e in zip(compiled[1], eager[1], strict=True):
        assert np.all(np.isfinite(c.numpy()))
        # Relative to the largest entry: the backward has cancellations.
        atol = 1e-5 * np.abs(e.numpy()).max()
        np.testing.assert_allclose(c.numpy(), e.numpy(), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    compute = policy.removeprefix("mixed_")
    rng = np.random.default_rng(0)
    # A norm of ~ 3000 overflows float16 squares: the norm must be taken in float32.
    x32 = (rng.standard_normal((3, 4, 4, 32)) * 500).astype("float32")
    x = x32.astype(ml_dtypes.bfloat16 if compute == "bfloat16" else compute)
    layer = L2Norm(dtype=policy, scale_init=np.linspace(1, 20, 32).tolist())
    out = layer(ops.cast(ops.convert_to_tensor(x.astype("float32")), compute))
    assert keras.backend.standardize_dtype(layer.gamma.dtype) == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == compute
    gamma = np.asarray(ops.convert_to_numpy(layer.gamma))
    want = reference.forward(x, gamma, Spec.create())
    got = np.asarray(ops.convert_to_numpy(ops.cast(out, "float32")))
    err = conformance.forward_error(got, want.astype(np.float64), x.dtype, False)
    assert err <= 1.0

    grads = _backend_vjp(
        lambda xx, gg: l2_normalize(xx, gg),
        [ops.cast(ops.convert_to_tensor(x32), compute), ops.convert_to_tensor(gamma)],
        ops.ones((3, 4, 4, 32), dtype=compute),
    )
    assert keras.backend.standardize_dtype(grads[0].dtype) == compute
    assert keras.backend.standardize_dtype(grads[1].dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(grads[0], "float32"))))


def test_finite_gradient_where_autodiff_of_the_formula_fails():
    # An all-zero slice (add_norm: NaN by autodiff) and a slice whose squares overflow
    # float32 (zeros by autodiff): the exact gradient is finite and nonzero in both.
    x = np.array([[0.0, 0.0, 0.0], [3e30, -4e30, 1e30]], dtype="float32")
    g = np.array([[1.0, -2.0, 0.5], [1.0, 2.0, 3.0]], dtype="float32")
    options = {"eps_mode": "add_norm", "eps": 1e-10}
    dx, _ = BACKEND.vjp(x, None, g, options)
    dx_ref, _ = reference.vjp(x, None, g, Spec.create(**options))
    assert np.all(np.isfinite(dx)) and np.all(dx[1] != 0)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_rank_too_low_for_axis():
    with pytest.raises(ValueError, match=r"axis 3 is out of range for an input of rank 2"):
        L2Norm(axis=3)(np.ones((2, 4), "float32"))


def test_channel_count_differs_from_the_built_weight():
    layer = L2Norm()
    layer(np.ones((2, 8), "float32"))
    with pytest.raises(ValueError, match=r"built for 8 channels.*with 6"):
        layer(np.ones((2, 6), "float32"))


def test_non_float_input():
    with pytest.raises(TypeError, match="floating dtype.*got int32"):
        l2_normalize(np.ones((2, 4), "int32"))
    layer = L2Norm()
    layer.build((2, 4))
    with pytest.raises(TypeError, match="got int32"):
        layer.call(ops.convert_to_tensor(np.ones((2, 4), "int32")))


def test_unknown_channel_count():
    with pytest.raises(ValueError, match="known size on the channel axis"):
        L2Norm().build((2, None))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": -1.0}, ValueError, "eps must be a positive finite float, got -1.0"),
        ({"eps_mode": "bogus"}, ValueError, "unknown eps_mode 'bogus'"),
        ({"preset": "nope"}, ValueError, "unknown preset 'nope'"),
        ({"axis": "a"}, TypeError, "axis must be an int or a sequence of ints, got 'a'"),
        ({"axis": [1, 2], "across_spatial": True}, ValueError, "across_spatial=True"),
        ({"scale_init": "not_an_init"}, ValueError, "scale_init='not_an_init'"),
        ({"scale_init": float("nan")}, ValueError, "scale_init must be finite"),
        ({"scale_init": [1.0, 2.0], "channel_shared": True}, ValueError, r"shape \(2,\)"),
        ({"learnable": "yes"}, TypeError, "learnable must be a bool, got 'yes'"),
        ({"preset": "caffe", "eps": 1.0}, ValueError, "conflicts with eps=1.0"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        L2Norm(**kwargs)


def test_scale_init_list_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"scale_init has shape \(3,\), expected .*\(4,\)"):
        L2Norm(scale_init=[1.0, 2.0, 3.0]).build((2, 4))


def test_from_config_of_a_bad_config():
    config = L2Norm().get_config()
    with pytest.raises(ValueError, match="cannot rebuild L2Norm from config.*eps_mode"):
        L2Norm.from_config({**config, "eps_mode": "bogus"})
    with pytest.raises(ValueError, match="cannot rebuild L2Norm.*unexpected_key"):
        L2Norm.from_config({**config, "unexpected_key": 1})


@pytest.mark.parametrize(
    "scale_init", [20.0, [1.0, 2.0, 3.0, 4.0], "ones", keras.initializers.Constant(3.0)]
)
def test_config_round_trip(scale_init):
    layer = L2Norm(axis=[1, 2], scale_init=scale_init, eps_mode="add_sumsq", eps=1e-6)
    clone = L2Norm.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(x)), ops.convert_to_numpy(layer(x)))


def test_compute_output_shape_and_symbolic_call():
    layer = L2Norm(axis=1)
    assert layer.compute_output_shape((None, 16, 5, 5)) == (None, 16, 5, 5)
    out = layer(keras.Input((16, 5, 5)))
    assert tuple(out.shape) == (None, 16, 5, 5)
    with pytest.raises(ValueError, match="out of range"):
        L2Norm(axis=4).compute_output_shape((None, 3))
