"""The Keras 3 adapter, run once per Keras backend (scripts/test sets KERAS_BACKEND).

Every case of the conformance suite, hypothesis against the reference, serialization,
export, training, data parallelism, compilation, mixed precision and bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import keras
import ml_dtypes
import numpy as np
import pytest
from _exported import exported_error, hostile_inputs  # tests/_exported.py
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import l2norm
from l2norm import conformance, reference
from l2norm.core.spec import FLOAT_DTYPES, Spec
from l2norm.keras import L2Norm, l2_normalize
from l2norm.testing.frameworks import keras_to_numpy, keras_vjp, numpy_to_keras

pytestmark = pytest.mark.keras

KERAS_BACKEND = keras.backend.backend()
on_tensorflow = pytest.mark.skipif(KERAS_BACKEND != "tensorflow", reason="TensorFlow only")
on_jax = pytest.mark.skipif(KERAS_BACKEND != "jax", reason="JAX only")


# --------------------------------------------------------------------------- helpers


def _forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
    s = None if scale is None else numpy_to_keras(scale)
    return keras_to_numpy(l2_normalize(numpy_to_keras(x), s, **options), x.dtype)


def _vjp(x, scale, g, options):
    args = [numpy_to_keras(x)] + ([] if scale is None else [numpy_to_keras(scale)])
    grads = keras_vjp(lambda *a: l2_normalize(*a, **options), args, numpy_to_keras(g))
    dx = keras_to_numpy(grads[0], x.dtype)
    return dx, None if scale is None else keras_to_numpy(grads[1], scale.dtype)


def _dtypes() -> tuple[str, ...]:
    if KERAS_BACKEND == "jax":
        import jax

        # Without jax_enable_x64 JAX has no float64 arrays at all.
        if not jax.config.jax_enable_x64:
            return tuple(d for d in FLOAT_DTYPES if d != "float64")
    return FLOAT_DTYPES


#: l2norm.keras.l2_normalize through public API only, measured by the conformance suite.
BACKEND = conformance.Backend(
    name=f"keras-{KERAS_BACKEND}",
    forward=_forward,
    vjp=_vjp,
    # TensorFlow's and XLA's CPU kernels flush subnormal results to zero.
    flushes_subnormals=KERAS_BACKEND in ("tensorflow", "jax"),
    dtypes=_dtypes(),
)


def test_runs_on_the_requested_backend():
    # scripts/test runs this file once per backend; a silent fallback would test one twice.
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]


def test_importing_the_adapter_imports_no_conformance_code():
    # The conformance package registers the Keras backends itself, calling public API in
    # a child process; the adapter must not depend on it.
    code = (
        "import sys, l2norm.keras; "
        "bad = sorted(m for m in sys.modules if m.startswith('l2norm.conformance')); "
        "assert not bad, bad"
    )
    env = {**os.environ, "KERAS_BACKEND": KERAS_BACKEND}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


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
        options["eps_mode"] = draw(st.sampled_from(l2norm.EPS_MODES))
        options["eps"] = draw(st.sampled_from([1e-12, 1e-6, 0.5]))
    elif choice == "preset":
        options["preset"] = draw(st.sampled_from(sorted(l2norm.PRESETS)))
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
def test_large_inputs_match_the_reference(layout, scale_kind, dtype):
    """Feature-map sized inputs, hostile slices included: long reductions, strided
    channel axes and the per-channel scale gradient over many pixels."""
    shape, options = {
        "channels_last": ((2, 12, 12, 256), {"axis": -1}),
        "channels_first": ((2, 256, 12, 12), {"axis": 1}),
        "spatial": ((2, 256, 12, 12), {"axis": (1, 2, 3)}),
    }[layout]
    rng = np.random.default_rng(3)
    np_dtype = conformance.numpy_dtype(dtype)
    x = rng.standard_normal(shape) * 3.0
    axes = Spec.create(**options).resolve(len(shape))
    if layout != "spatial":  # (one slice per sample there: keep both ordinary)
        # A zero pixel, one whose squares overflow float32 and one whose squares underflow.
        for p, value in enumerate((0.0, 1e25, 1e-25), start=1):
            pixel = (0, 0, p, slice(None)) if layout == "channels_last" else (0, slice(None), 0, p)
            x[pixel] = value * np.sign(x[pixel])
    with np.errstate(over="ignore"):
        x = x.astype(np_dtype)
    g = rng.standard_normal(shape).astype(np_dtype)
    scale = conformance.scale_values(scale_kind, shape[axes.channel], rng)
    scale = None if scale is None else scale.astype(np_dtype)
    result = conformance.run_case(BACKEND, _DrawnCase(x, scale, g, options))
    assert result.passed, result


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


# --------------------------------------------------------------------------- export
# A graph traced to leave TensorFlow (model.export, the TFLite converter, which traces a
# Keras 3 model into a SavedModel) holds the exported formula of l2norm.core.portable: plain
# ops, TFLite builtins, within l2norm.core.portable.forward_ulps of the oracle.

#: The TFLite builtin operators the converted layer may use.
TFLITE_OPS = {
    "ABS", "ADD", "CAST", "DIV", "GREATER", "MAXIMUM", "MUL", "REDUCE_MAX", "RSQRT",
    "SELECT_V2", "SIGN", "SQRT", "SUM",
}  # fmt: skip
#: Operators besides the two casts of half precision (the XLA lowering does not convert).
TFLITE_MAX_OPERATORS = 16


def _exported_model(case_id: str) -> tuple[keras.Model, np.ndarray, np.ndarray, dict]:
    """A model of one L2Norm on a hostile NHWC conformance case, with dynamic batch / H / W;
    ``(model, x, scale, options)``."""
    x, scale, options = hostile_inputs(case_id)
    inputs = keras.Input((None, None, x.shape[-1]), dtype=str(x.dtype))
    layer = L2Norm(scale_init=scale.astype("float64").tolist(), dtype=str(x.dtype), **options)
    return keras.Model(inputs, layer(inputs)), x, scale, options


def _run_tflite(flatbuffer: bytes, x: np.ndarray) -> tuple[np.ndarray, Counter]:
    """The converted model run on ``x`` (resized to its shape) in TFLite's interpreter,
    and its operators."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        # TFLite's own kernels: its default XNNPACK delegate flushes subnormals to zero
        # (docs/keras.md, Export).
        interpreter = tf.lite.Interpreter(
            model_content=flatbuffer,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    operators = Counter(op["op_name"] for op in interpreter._get_ops_details())
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]), operators


@on_tensorflow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("option_set", ["mode=add_norm", "mode=clamp_sumsq", "tiny-eps"])
def test_tflite_builtins_only_within_the_bound(dtype, option_set):
    import tensorflow as tf

    model, x, scale, options = _exported_model(f"2:{option_set}:per_channel:{dtype}:hostile")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    y, operators = _run_tflite(converter.convert(), x)
    assert set(operators) <= TFLITE_OPS, operators
    casts = 2 if dtype == "float16" else 0  # half precision is computed in float32
    assert operators["CAST"] == casts, operators
    assert sum(operators.values()) - casts <= TFLITE_MAX_OPERATORS, operators
    assert y.dtype == x.dtype
    exported_error(y, x, scale, options)


@on_tensorflow
def test_saved_model_holds_the_exported_formula(tmp_path):
    # model.export: no XLA-only operation in the SavedModel (TensorFlow Serving without
    # XLA and the TFLite converter run it); reloaded, within the bound on hostile data
    # (TensorFlow's CPU kernels flush subnormals), and converted from the SavedModel with
    # builtins only.
    import tensorflow as tf

    model, x, scale, options = _exported_model("2:default:per_channel:float32:hostile")
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    exported_error(reloaded.serve(tf.constant(x)).numpy(), x, scale, options, flushes=True)
    graph = reloaded.serve.get_concrete_function(tf.TensorSpec([None, None, None, 16]))
    graph_def = graph.graph.as_graph_def()
    op_types = {node.op for node in graph_def.node}
    op_types |= {node.op for f in graph_def.library.function for node in f.node_def}
    assert not {op for op in op_types if op.startswith("Xla") or op.startswith("Bitwise")}
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    y, operators = _run_tflite(converter.convert(), x)
    assert set(operators) <= TFLITE_OPS
    exported_error(y, x, scale, options)


@on_tensorflow
def test_only_graphs_that_leave_xla_get_the_exported_formula():
    # Eager calls, XLA functions and traces under a tape (training steps) keep the XLA
    # lowering (1 ULP, the exact gradient); a tf.function traced outside XLA with no tape
    # (export, conversion, plain inference) records the exported formula.
    import tensorflow as tf

    from l2norm.tensorflow import _ops as _keras_tf

    def probe():
        return tf.constant(_keras_tf.exporting())

    assert not probe().numpy()
    assert not tf.function(probe, jit_compile=True)().numpy()
    assert tf.function(probe)().numpy()
    with tf.GradientTape():
        assert not tf.function(probe)().numpy()


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


def test_a_mask_passes_through():
    # A masked time step (all zeros) stays masked after the layer: the LSTM skips it, so
    # the sequence gives what it gives without that step.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, 4))
    outputs = keras.layers.LSTM(2)(L2Norm()(keras.layers.Masking(0.0)(inputs)))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).standard_normal((1, 3, 4)).astype("float32")
    x[0, 1] = 0.0
    full = ops.convert_to_numpy(model(x))
    shortened = ops.convert_to_numpy(model(np.delete(x, 1, axis=1)))
    np.testing.assert_allclose(full, shortened, rtol=1e-5, atol=1e-6)


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
    if hostile:  # slices that need the ladder's other rungs
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


@on_tensorflow
def test_tf_graph_has_no_branch_and_matches_eager():
    """Inside a ``tf.function`` graph (as in ``model.fit``) the layer is straight-line
    code, two XLA programs and no ``If`` / ``While``, and it computes bitwise what it
    computes eagerly; a dynamic spatial size (unknown slice length) works too."""
    import tensorflow as tf

    x, hostile, g = _invariance_inputs()
    layer = L2Norm(scale_init=np.linspace(1.0, 20.0, 32).tolist(), eps_mode="add_norm")
    spatial = L2Norm(across_spatial=True)

    def step(inputs, cotangent):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = layer(inputs)
        return (out, *tape.gradient(out, [inputs, layer.gamma.value], output_gradients=cotangent))

    graph_step = tf.function(step)
    spec = tf.TensorSpec([None, 5, 5, 32], tf.float32)
    graph = graph_step.get_concrete_function(spec, spec).graph.as_graph_def()
    op_types = {node.op for node in graph.node}
    op_types |= {node.op for f in graph.library.function for node in f.node_def}
    assert not op_types & {"If", "StatelessIf", "While", "StatelessWhile", "Case"}
    for inputs in (x, hostile):
        eager = step(tf.constant(inputs), tf.constant(g))
        compiled = graph_step(tf.constant(inputs), tf.constant(g))
        for a, b in zip(compiled, eager, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())

    unknown = tf.function(spatial).get_concrete_function(tf.TensorSpec([None, None, None, 32]))
    np.testing.assert_allclose(
        unknown(tf.constant(hostile)).numpy(), spatial(hostile).numpy(), rtol=1e-6, atol=0
    )


@on_tensorflow
def test_no_retracing_warning_across_configurations_and_sizes():
    """Several layer configurations on several image sizes, eagerly: each configuration
    has compiled programs of its own and each program one trace for all shapes, so
    TensorFlow never warns that a function retraces."""
    import logging

    import tensorflow as tf

    layers = [L2Norm(eps_mode=mode) for mode in l2norm.EPS_MODES]
    layers.append(L2Norm(across_spatial=True, channel_shared=True))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        for size in (3, 4, 5):
            x = tf.constant(np.ones((2, size, size, 8), "float32"))
            for layer in layers:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = layer(x)
                tape.gradient(out, [x, layer.gamma.value])
    finally:
        tf.get_logger().removeHandler(handler)
    assert not [r for r in records if "retracing" in r.getMessage()]


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

    grads = keras_vjp(
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


# --------------------------------------------------------------------------- batch invariance

#: (shape of the whole batch) sample 0 is taken from; batch sizes it is computed at.
INVARIANCE_SHAPE = (16, 5, 5, 32)
BATCH_SIZES = (1, 3, 8, 16)


def _invariance_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, hostile, g)``: an NHWC float32 batch, the same batch whose samples 1.. each
    hold an all-zero pixel, a 1e25 pixel (squares overflow float32) and a 1e-25 pixel
    (squares underflow), and a fixed cotangent per sample."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(INVARIANCE_SHAPE) * 3.0).astype("float32")
    g = rng.standard_normal(INVARIANCE_SHAPE).astype("float32")
    hostile = x.copy()
    hostile[1:, 1, 1] = 0.0
    hostile[1:, 2, 3] *= np.float32(1e25)
    hostile[1:, 4, 0] *= np.float32(1e-25)
    return x, hostile, g


def _layer_output_and_input_grad(layer, x: np.ndarray, g: np.ndarray):
    """Sample 0's output and input gradient, the layer called eagerly on ``x``."""
    xt = ops.convert_to_tensor(x)
    y = layer(xt)
    (dx,) = keras_vjp(layer, [xt], ops.convert_to_tensor(g))
    return np.asarray(ops.convert_to_numpy(y))[0], np.asarray(ops.convert_to_numpy(dx))[0]


@pytest.mark.parametrize("eps_mode", l2norm.EPS_MODES)
def test_layer_sample_does_not_depend_on_its_batch(eps_mode):
    """Sample 0's output and input gradient are bitwise the same computed alone, in
    batches of 1, 3, 8 and 16, and next to samples whose pixels are zero, overflow or
    underflow: every slice goes through the same selects, with no batch-wide switch.

    Bitwise on every backend, also across batch sizes: on TensorFlow each pass is one
    XLA program whose per-slice sums have a fixed order (stages of 8, a fixed plan per
    slice shape); on JAX the lowering keeps XLA:CPU from switching its reduction order
    for larger arrays (measured before it did: from about 4096 elements on, 1 ULP in a
    sum of squares and up to 4 ULP in ``y``); torch sums each row alike at every size.
    """
    x, hostile, g = _invariance_inputs()
    layer = L2Norm(scale_init=np.linspace(1.0, 20.0, 32).tolist(), eps_mode=eps_mode)
    layer.build(INVARIANCE_SHAPE)
    alone = _layer_output_and_input_grad(layer, x[:1].copy(), g[:1].copy())
    for n in BATCH_SIZES:
        for label, batch in (("random", x), ("hostile", hostile)):
            y, dx = _layer_output_and_input_grad(layer, batch[:n], g[:n])
            np.testing.assert_array_equal(y, alone[0], err_msg=f"y, batch {n}, {label}")
            np.testing.assert_array_equal(dx, alone[1], err_msg=f"dx, batch {n}, {label}")


def test_functional_passes_the_batch_invariance_check():
    """The conformance suite's own check on :func:`l2_normalize` (NCHW and NHWC), with no
    declared tolerance: bitwise."""
    result = conformance.check_batch_invariance(BACKEND)
    assert result.passed and result.bitwise, result


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
