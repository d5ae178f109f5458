"""Exported graphs (issue 21, item 3): :func:`l2norm.torch._export.forward`, the formula of
:mod:`l2norm.core.portable` in plain aten ops, recorded by ``torch.export`` and by both ONNX
exporters with dynamic batch / H / W, run at other shapes (in onnxruntime for ONNX) on
hostile data, within :func:`l2norm.core.portable.forward_ulps` of the 60-digit oracle; the
ONNX graph small and made of standard operators only.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from _exported import exported_error, hostile_inputs  # tests/_exported.py

from l2norm import reference
from l2norm.conformance._cases import cases, numpy_dtype
from l2norm.conformance._measures import gradient_error, gradient_magnitudes
from l2norm.core.spec import EPS_MODES, Spec
from l2norm.testing.frameworks import numpy_to_torch, torch_to_numpy
from l2norm.torch import L2Norm
from l2norm.torch._export import forward

#: Every operator an exported graph may hold: the ONNX standard set's most common
#: arithmetic, comparisons, selects and reductions (``Constant`` from the TorchScript-based
#: exporter), which every ONNX runtime implements.
STANDARD_OPS = {
    "Abs", "Add", "Cast", "Clip", "Constant", "Div", "Greater", "Mul",
    "Reciprocal", "ReduceMax", "ReduceSum", "Sign", "Sqrt", "Where",
}  # fmt: skip
#: Operators besides ``Constant`` and the two casts of half precision, with a scale: 15 to
#: 17 by the eps placement and the exporter (the ops lowering exported 40).
MAX_OPERATORS = 17

#: (conformance case on hostile data, export shape): NCHW per pixel and Caffe's
#: across_spatial, exported at other batch / H / W sizes than those run.
LAYOUTS = {
    "per-pixel": ("1:{option_set}:per_channel:{dtype}:hostile", (3, 16, 4, 5)),
    "across-spatial": ("5:{option_set}:shared:{dtype}:hostile", (2, 4, 5, 4)),
}


class Layer(torch.nn.Module):
    """A module that calls :func:`forward` with a fixed weight and options."""

    def __init__(self, scale: np.ndarray | None, options: dict, ndim: int = 4) -> None:
        super().__init__()
        self.weight = None if scale is None else torch.nn.Parameter(numpy_to_torch(scale))
        spec = Spec.create(**options)
        axes = spec.resolve(ndim)
        self.kwargs = {
            "norm": axes.norm,
            "channel": axes.channel,
            "eps_mode": spec.eps_mode,
            "eps": spec.eps,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(x, self.weight, **self.kwargs)


def _onnx_model(layer: Layer, example: torch.Tensor, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
            program = torch.onnx.export(layer, (example,), dynamo=True, dynamic_shapes=(dims,))
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            layer,
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        )
        return onnx.load_from_string(buffer.getvalue())


def _operators(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _computes_in_float64(model: onnx.ModelProto) -> bool:
    """Whether the graph holds a float64 tensor or cast (TensorRT and TFLite have none)."""
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    types = {v.type.tensor_type.elem_type for v in values}
    types |= {t.data_type for t in graph.initializer}
    types |= {a.i for node in graph.node for a in node.attribute if a.name == "to"}
    return onnx.TensorProto.DOUBLE in types


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("option_set", [f"mode={m}" for m in EPS_MODES] + ["tiny-eps"])
def test_onnx_graph_is_small_standard_and_within_the_bound(exporter, dtype, option_set):
    case_id, export_shape = LAYOUTS["per-pixel"]
    x, scale, options = hostile_inputs(case_id.format(option_set=option_set, dtype=dtype))
    layer = Layer(scale, options)
    model = _onnx_model(layer, torch.randn(export_shape).to(getattr(torch, dtype)), exporter)

    operators = _operators(model)
    # The mean placement divides by the slice size, which the TorchScript-based exporter
    # reads from the input's shape (so a dynamic axis stays right): Shape, Gather and a Cast.
    size_ops = {"Shape", "Gather"} if option_set == "mode=add_meansq" else set()
    assert set(operators) <= STANDARD_OPS | size_ops, operators
    casts = 2 if dtype == "float16" else 0  # half precision is computed in float32
    casts += 1 if size_ops & set(operators) else 0
    assert operators["Cast"] == casts, operators
    bound = MAX_OPERATORS + sum(operators[op] for op in size_ops)
    assert sum(operators.values()) - operators["Constant"] - casts <= bound, operators
    assert not _computes_in_float64(model)  # float16 in float32, float32 in float32

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    assert y.shape == x.shape and y.dtype == x.dtype
    exported_error(y, x, scale, options)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_across_spatial(exporter):
    case_id, export_shape = LAYOUTS["across-spatial"]
    x, scale, options = hostile_inputs(case_id.format(option_set="default", dtype="float32"))
    model = _onnx_model(Layer(scale, options), torch.randn(export_shape), exporter)
    assert set(_operators(model)) <= STANDARD_OPS
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {"x" if exporter == "legacy" else session.get_inputs()[0].name: x})
    exported_error(y, x, scale, options)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_layer_exports_the_formula(exporter, dtype):
    # l2norm.torch.L2Norm as users export it: the dispatch records the same small graph.
    case_id, export_shape = LAYOUTS["per-pixel"]
    x, scale, options = hostile_inputs(case_id.format(option_set="preset=caffe", dtype=dtype))
    spec = Spec.create(**options)
    layer = L2Norm(
        16, scale_init=numpy_to_torch(scale), preset="caffe", dtype=getattr(torch, dtype)
    )
    model = _onnx_model(layer.eval(), torch.randn(export_shape).to(getattr(torch, dtype)), exporter)
    operators = _operators(model)
    assert set(operators) <= STANDARD_OPS, operators
    assert sum(operators.values()) - operators["Constant"] - operators["Cast"] <= MAX_OPERATORS
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    exported_error(y, x, scale, {"axis": 1, "eps_mode": spec.eps_mode, "eps": spec.eps})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_export_with_dynamic_batch_and_spatial_sizes(layout, dtype):
    case_id, export_shape = LAYOUTS[layout]
    x, scale, options = hostile_inputs(case_id.format(option_set="mode=add_sumsq", dtype=dtype))
    layer = Layer(scale, options)
    dims = {0: torch.export.Dim("n"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")}
    example = torch.randn(export_shape).to(getattr(torch, dtype))
    program = torch.export.export(layer, (example,), dynamic_shapes=(dims,))
    y = program.module()(numpy_to_torch(x))
    exported_error(torch_to_numpy(y), x, scale, options)


def test_every_conformance_case_within_the_bound():
    # The formula itself, eagerly, on one case in five of the conformance matrix (every
    # layout, eps placement, preset, scale kind and dtype, random and hostile data).
    for case in cases(quick=True):
        x, scale, _ = case.inputs()
        layer = Layer(scale, case.options, x.ndim)
        with torch.no_grad():
            y = torch_to_numpy(layer(numpy_to_torch(x)))
        exported_error(y, x, scale, case.options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", EPS_MODES)
def test_autograd_gradient_matches_the_reference(dtype, mode):
    # Not part of the exported guarantee, but the traced routes train through it: finite
    # at an all-zero slice (s g / d(0) exactly, where autodiff of the textbook formula
    # gives NaN) and near the reference's elsewhere (measured: at most 4.1 eps).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 3, 3)).astype(dtype)
    x[0, :, 1, 1] = 0.0
    x[1, :, 0, 0] *= 1e-8  # below sqrt(eps) for the sumsq placements
    scale = rng.uniform(0.5, 20, 8).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    options = {"axis": 1, "eps_mode": mode, "eps": 1e-10}
    xt = torch.from_numpy(x).requires_grad_(True)
    layer = Layer(scale, options)
    dx, dscale = torch.autograd.grad(layer(xt), [xt, layer.weight], torch.from_numpy(g))
    spec = Spec.create(**options)
    dx_ref, dscale_ref = reference.vjp(x, scale, g, spec)
    magnitudes = gradient_magnitudes(x, scale, g, spec)
    error = gradient_error(
        dx.numpy(),
        dx_ref,
        magnitudes[0],
        dscale.numpy(),
        dscale_ref,
        magnitudes[1],
        numpy_dtype(dtype),
        False,
    )
    assert np.isfinite(dx.numpy()).all() and error <= 8, error


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 3)])
def test_zero_size_inputs_give_empty_results(shape):
    x = torch.zeros(shape, requires_grad=True)
    y = forward(x, None, norm=(1,), channel=1, eps_mode="clamp_norm", eps=1e-12)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
