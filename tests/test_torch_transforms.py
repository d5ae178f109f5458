"""The transformations people compose a torch layer with, per lowering, compared by VALUE.

A matrix: each test runs under the default dispatch (the native CPU kernel, one registered
op), the pure-torch ops lowering (``use_lowering("ops")``) and, where it is cheap, the
Triton kernels in Triton's interpreter (``tests/conftest.py`` switches it on before triton
is imported). Each compares with the eager result (bitwise, where the same kernel runs),
with :mod:`l2norm.reference` (in the conformance suite's ULP and gradient measures) or
with a loop over examples:

========================== =========================================================
transformation             compared with
========================== =========================================================
FakeTensorMode, meta       eager output's shape, strides and dtype (no data read)
make_fx                    replay == eager, bitwise; symbolic replay at another shape
FlopCounterMode            the kernel's arithmetic per entry
vmap (input, scale)        a loop over the examples / the scales, bitwise
vmap(grad) per example     the reference VJP of each example
grad, jacrev, jacfwd       the reference VJP, row by row of the Jacobian
forward AD                 the reference Jacobian times the tangent
functional_call ensemble   a loop over the models (forward bitwise, gradients)
torch.compile fullgraph    eager (bitwise for the kernel); no graph break, no
                           recompilation per image size (3 sizes), dynamic=True too
torch.export dynamic dims  the reference at other batch / H / W, in the exported
                           formula's bound (``l2norm.core.portable.forward_ulps``)
fx.symbolic_trace          eager, bitwise; the layer one node
checkpoint                 eager gradients, bitwise
zero-size inputs           empty results and gradients of the right shapes
========================== =========================================================
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.autograd.forward_ad as fwAD
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils.flop_counter import FlopCounterMode

from l2norm import conformance, reference
from l2norm.core import portable as _portable
from l2norm.core.spec import RMSSpec, Spec
from l2norm.torch import L2Norm, RMSNorm, l2_normalize, lowering_for, rms_norm, use_lowering

#: The lowerings of the matrix: the default dispatch (the CPU kernel here), the ops.
LOWERINGS = [None, "ops"]
#: With the Triton kernels (in the interpreter without a GPU) where a test is cheap.
WITH_TRITON = [*LOWERINGS, "triton"]
SPEC = Spec.create(axis=1)  # the layer's default: per pixel over the channels (NCHW)
FORWARD_ULPS = conformance.DEFAULT_FORWARD_ULPS["float32"]
GRAD_EPS = conformance.DEFAULT_GRAD_EPS["float32"]


def data(*shape: int, channel: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded ``(x, weight per entry of axis channel, cotangent)`` in float32."""
    gen = torch.Generator().manual_seed(math.prod(shape))
    x = torch.randn(shape, generator=gen)
    w = torch.rand(shape[channel], generator=gen) + 0.5
    return x, w, torch.randn(shape, generator=gen)


def expected_route(lowering: str | None) -> str:
    return {None: "cpu-kernel"}.get(lowering, lowering)


def assert_forward(
    got: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, ulps=None, spec: Spec = SPEC
):
    """Within ``ulps`` (the conformance bound by default) of the reference."""
    want = reference.forward(x.numpy(), None if w is None else w.numpy(), spec)
    got = got.detach().numpy()
    assert got.shape == want.shape
    err = conformance.forward_error(got, want, want.dtype, False)
    assert err <= (FORWARD_ULPS if ulps is None else ulps), f"{err} ULP"


def assert_vjp(dx, dw, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, spec: Spec = SPEC):
    """``(dx, dw)`` within the conformance gradient bound of the reference VJP of ``g``."""
    xn, wn, gn = x.numpy(), w.numpy(), g.numpy()
    dx_ref, dw_ref = reference.vjp(xn, wn, gn, spec)
    dx_mag, dw_mag = conformance.gradient_magnitudes(xn, wn, gn, spec)
    f32 = np.dtype(np.float32)
    err = conformance.gradient_error(
        np.asarray(dx.detach(), np.float64),
        dx_ref.astype(f32).astype(np.float64),
        dx_mag,
        None if dw is None else np.asarray(dw.detach(), np.float64),
        None if dw is None else dw_ref.astype(f32).astype(np.float64),
        dw_mag,
        f32,
        False,
    )
    assert err <= GRAD_EPS, f"{err} eps"


def reference_jacobian(
    x: torch.Tensor, w: torch.Tensor, spec: Spec = SPEC
) -> tuple[np.ndarray, np.ndarray]:
    """``(d y / d x, d y / d w)`` in float64, row ``i`` the reference VJP of ``e_i``."""
    xn, wn = x.numpy(), w.numpy()
    rows_x, rows_w = [], []
    for i in range(x.numel()):
        e = np.zeros(x.numel(), np.float32)
        e[i] = 1
        dx, dw = reference.vjp(xn, wn, e.reshape(x.shape), spec)
        rows_x.append(np.asarray(dx, np.float64).ravel())
        rows_w.append(np.asarray(dw, np.float64).ravel())
    return np.stack(rows_x), np.stack(rows_w)


def assert_jacobian(jx: torch.Tensor, jw: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """Each row of the Jacobians within the gradient bound of the reference VJP of its
    unit cotangent."""
    jx = jx.reshape(x.numel(), x.numel())
    jw = jw.reshape(x.numel(), w.numel())
    for i in range(x.numel()):
        e = torch.zeros(x.numel())
        e[i] = 1
        assert_vjp(jx[i].reshape(x.shape), jw[i], x, w, e.reshape(x.shape))


def assert_tangent(tangent: torch.Tensor, tx, tw, x, w, spec: Spec = SPEC) -> None:
    """A forward-mode tangent: the reference Jacobian times ``(tx, tw)``, each entry within
    a few roundings of its terms' sizes."""
    jx_ref, jw_ref = reference_jacobian(x, w, spec)
    tx64, tw64 = tx.double().numpy().ravel(), tw.double().numpy()
    want = jx_ref @ tx64 + jw_ref @ tw64
    size = np.abs(jx_ref) @ np.abs(tx64) + np.abs(jw_ref) @ np.abs(tw64)
    err = np.abs(tangent.double().numpy().ravel() - want)
    assert np.all(err <= 8 * np.finfo(np.float32).eps * size), err.max()


def loss(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (y * g).sum()


def eager_grads(fn, x, w, g) -> tuple[torch.Tensor, torch.Tensor]:
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss(fn(xr, wr), g).backward()
    return xr.grad, wr.grad


# --------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("lowering", WITH_TRITON)
def test_fake_tensors_and_the_meta_device_give_eager_metadata(lowering, memory_format):
    x, w, g = data(2, 8, 3, 5)
    x = x.contiguous(memory_format=memory_format)
    with use_lowering(lowering):
        want = l2_normalize(x, w)
        with FakeTensorMode() as mode:
            fx, fw = mode.from_tensor(x).requires_grad_(True), mode.from_tensor(w)
            fake = l2_normalize(fx, fw)
            loss(fake, mode.from_tensor(g)).backward()
        metas = [x.to("meta"), w.to("meta")] if lowering != "triton" else None
        meta = l2_normalize(*metas) if metas else fake
    for got in (fake, meta):
        assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
    assert fx.grad.shape == x.shape


@pytest.mark.parametrize("lowering", WITH_TRITON)
def test_make_fx_replay_equals_eager(lowering):
    x, w, _ = data(2, 8, 3, 5)

    def layer(a, b):
        return l2_normalize(a, b)

    with use_lowering(lowering):
        graph = make_fx(layer)(x, w)
        assert torch.equal(graph(x, w), l2_normalize(x, w))
        names = {str(n.target) for n in graph.graph.nodes}
        assert ("l2norm.kernel_forward.default" in names) == (lowering != "ops")
        if lowering != "triton":  # sizes as symbols: replay at another shape
            symbolic = make_fx(layer, tracing_mode="symbolic")(x, w)
            x2 = data(3, 8, 4, 7)[0]
            assert torch.equal(symbolic(x2, w), l2_normalize(x2, w))


def test_flop_counter_counts_the_kernel():
    x, w, g = data(2, 8, 3, 5)
    xr = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        loss(l2_normalize(xr, w), g).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # The kernels' arithmetic per entry: 4 forward, 12 backward (l2norm.torch._function).
    assert counts["l2norm.kernel_forward"] == 4 * x.numel()
    assert counts["l2norm.kernel_backward"] == 12 * x.numel()


# --------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_vmap_over_examples_and_over_scales_equals_a_loop(lowering):
    x, w, _ = data(3, 8, 3, 5)
    scales = torch.stack([w, 2 * w, w.flip(0)])
    with use_lowering(lowering):
        assert lowering_for(x) == expected_route(lowering)
        batched = torch.func.vmap(lambda xi: l2_normalize(xi[None], w)[0])
        per_example = batched(x)
        loop = torch.cat([l2_normalize(xi[None], w) for xi in x])
        assert torch.equal(per_example, loop)
        # The kernel runs under vmap (its batching rule), not a fallback.
        graph = str(make_fx(batched)(x).graph)
        assert ("l2norm.kernel_forward" in graph) == (lowering is None)
        per_scale = torch.func.vmap(l2_normalize, in_dims=(None, 0))(x, scales)
        assert torch.equal(per_scale, torch.stack([l2_normalize(x, s) for s in scales]))
        both = torch.func.vmap(l2_normalize)(x[:, None], scales)
        pairs = [l2_normalize(x[i : i + 1], scales[i]) for i in range(3)]
        assert torch.equal(both, torch.stack(pairs))
    assert_forward(per_example, x, w)


def test_the_ops_vmap_rules_equal_a_loop():
    """The registered ops' own batching rules, called directly (the layer's backward runs
    them where autograd does not record; transforms differentiate with create_graph)."""
    x, w, _ = data(3, 8, 10, 2)
    options = (1, "clamp_norm", 1e-12, "cpu-kernel")
    forward, backward = torch.ops.l2norm.kernel_forward, torch.ops.l2norm.kernel_backward
    gs = torch.stack([data(3, 8, 10, 2)[2], -x, 2 * x])
    dx, dw = torch.func.vmap(lambda g: backward(x, w, g, *options))(gs)
    loop = [backward(x, w, g, *options) for g in gs]
    assert torch.equal(dx, torch.stack([d for d, _ in loop]))
    assert torch.equal(dw, torch.stack([d for _, d in loop]))
    # Batched along the innermost axis in memory: per example, strided; folded, dense.
    dx = torch.func.vmap(lambda xi, g: backward(xi, w, g, *options)[0], in_dims=3)(x, gs[0])
    for i in range(2):
        example = (x[..., i].contiguous(), w, gs[0][..., i].contiguous())
        assert torch.equal(dx[i], backward(*example, *options)[0])
    ys = torch.func.vmap(lambda xi: forward(xi, w, *options), in_dims=3, out_dims=3)(x)
    examples = [forward(x[..., i].contiguous(), w, *options) for i in range(2)]
    assert torch.equal(ys, torch.stack(examples, 3))


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_per_example_gradients_match_the_reference(lowering):
    x, w, g = data(3, 8, 2, 5)

    def example_loss(xi, wi, gi):
        return loss(l2_normalize(xi[None], wi), gi[None])

    with use_lowering(lowering):
        dx, dw = torch.func.vmap(torch.func.grad(example_loss, argnums=(0, 1)), (0, None, 0))(
            x, w, g
        )
    for i in range(3):
        assert_vjp(dx[i][None], dw[i], x[i : i + 1], w, g[i : i + 1])


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_grad_jacrev_jacfwd_and_forward_ad_match_the_reference(lowering):
    x, w, g = data(1, 4, 2, 5)  # inner 10: the kernel applies
    with use_lowering(lowering):
        dx, dw = torch.func.grad(lambda a, b: loss(l2_normalize(a, b), g), argnums=(0, 1))(x, w)
        rev = torch.func.jacrev(l2_normalize, argnums=(0, 1))(x, w)
        fwd = torch.func.jacfwd(l2_normalize, argnums=(0, 1))(x, w)
        tx, tw = data(1, 4, 2, 5)[2], torch.linspace(-1, 1, 4)
        with fwAD.dual_level():
            dual = l2_normalize(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw))
            tangent = fwAD.unpack_dual(dual).tangent
    assert_vjp(dx, dw, x, w, g)
    for jx, jw in (rev, fwd):
        assert_jacobian(jx, jw, x, w)
    assert_tangent(tangent, tx, tw, x, w)


def test_the_op_called_directly_on_a_dual_tensor_raises_instead_of_dropping_the_tangent():
    x, w, _ = data(2, 8, 3, 5)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="no forward-mode rule"):
        torch.ops.l2norm.kernel_forward(
            fwAD.make_dual(x, x), w, 1, "clamp_norm", 1e-12, "cpu-kernel"
        )


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_functional_call_ensemble_equals_a_loop_over_models(lowering):
    x, _, g = data(2, 8, 3, 5)
    models = [L2Norm(8, scale_init=float(k)) for k in (1, 5, 20)]
    params, buffers = torch.func.stack_module_state(models)
    base = L2Norm(8).to("meta")

    def run(p, b, xs):
        return torch.func.functional_call(base, (p, b), (xs,))

    with use_lowering(lowering):
        ys = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        grads, dx = torch.func.vmap(
            torch.func.grad(lambda p, b, xs: loss(run(p, b, xs), g), argnums=(0, 2)),
            in_dims=(0, 0, None),
        )(params, buffers, x)
        for k, model in enumerate(models):
            assert torch.equal(ys[k], model(x))
            assert_vjp(dx[k], grads["weight"][k], x, model.weight.detach(), g)


# --------------------------------------------------------------------------- compile, export


def assert_compiles_once_for_all_shapes(layer, shapes, lowering, dynamic) -> None:
    """``torch.compile(layer, fullgraph=True)`` equals eager bitwise (output and input
    gradient) at each of ``shapes``, without a graph break, and compiles at most twice
    (``dynamic=None``: once static, once with dynamic sizes), once with ``dynamic=True``."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=dynamic)
    frames = []
    with use_lowering(lowering):
        for shape in shapes:
            x, _, g = data(*shape)
            got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            got, want = compiled(got_x), layer(want_x)
            loss(got, g).backward()
            loss(want, g).backward()
            assert torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad)
            frames.append(counter.frame_count)
    assert not torch._dynamo.utils.counters["graph_break"]
    # dynamic=None: the second size recompiles once with dynamic sizes, then no more.
    assert frames[2] == frames[1] and (dynamic is None or frames[1] == frames[0]), frames


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_compile_fullgraph_over_image_sizes_has_no_break_and_no_recompile(lowering, dynamic):
    # H != W: no duck-sized H == W guard
    shapes = ((2, 8, 5, 6), (2, 8, 7, 9), (2, 8, 9, 4))
    assert_compiles_once_for_all_shapes(L2Norm(8), shapes, lowering, dynamic)


def assert_exports_with_dynamic_dims(layer, example, dims, shapes, spec=SPEC) -> None:
    """``torch.export`` of ``layer`` with the dimensions ``dims`` dynamic is plain aten ops
    (``l2norm.torch._export``) and runs at ``shapes`` within the exported formula's bound of
    the reference."""
    program = torch.export.export(layer, (data(*example)[0],), dynamic_shapes={"x": dims})
    assert "l2norm" not in str(program.graph)
    bound = _portable.forward_ulps("float32", example[spec.axis])
    for shape in shapes:
        x = data(*shape)[0]
        assert_forward(program.module()(x), x, layer.weight.detach(), ulps=bound, spec=spec)


def test_export_with_dynamic_batch_and_image_size_runs_at_other_shapes():
    batch, height, width = torch.export.Dim("B"), torch.export.Dim("H"), torch.export.Dim("W")
    dims = {0: batch, 2: height, 3: width}
    shapes = ((1, 8, 3, 7), (4, 8, 6, 2))
    assert_exports_with_dynamic_dims(L2Norm(8, scale_init=3.0), (2, 8, 5, 6), dims, shapes)


def test_fx_symbolic_trace_records_the_layer_as_one_node():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), L2Norm(8), torch.nn.ReLU())
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls] == ["_fx_l2_normalize"]
    x = data(2, 3, 4, 5)[0]
    assert torch.equal(traced(x), model(x))
    functional = torch.fx.symbolic_trace(lambda a: l2_normalize(a, dim=-1))
    assert torch.equal(functional(x), l2_normalize(x, dim=-1))


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_activation_checkpointing_gives_the_eager_gradients(lowering, reentrant):
    x, w, g = data(2, 8, 3, 5)

    def checkpointed(a, b):
        return torch.utils.checkpoint.checkpoint(l2_normalize, a, b, use_reentrant=reentrant)

    with use_lowering(lowering):
        want = eager_grads(l2_normalize, x, w, g)
        got = eager_grads(checkpointed, x, w, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert_vjp(*got, x, w, g)


@pytest.mark.parametrize("shape", [(0, 8, 3, 5), (2, 8, 0, 5), (2, 0, 3, 5)])
@pytest.mark.parametrize("lowering", WITH_TRITON)
def test_zero_size_inputs_give_empty_results_and_gradients(lowering, shape):
    x = torch.randn(shape, requires_grad=True)
    w = torch.rand(shape[1], requires_grad=True)
    with use_lowering(lowering):
        y = l2_normalize(x, w)
        loss(y, torch.ones(shape)).backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))  # no entries: a zero scale gradient


# --------------------------------------------------------------------------- RMSNorm

#: RMSNorm is the L2 op with the mean placement, ``d = sqrt(mean(x**2) + eps)``, here over
#: the last axis of a transformer's ``(batch, tokens, channels)`` with a scale per channel.
#: A representative subset of the matrix runs it; the rest shares its code with L2Norm.
RMS_EPS = 1e-6
RMS_SPEC = RMSSpec.create(eps=RMS_EPS).spec("float32")
RMS_LOWERINGS = [None, "ops"]


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, w, eps=RMS_EPS)


def rms_layer(channels: int) -> RMSNorm:
    """An ``RMSNorm`` whose weight is not all ones (a scale the tests can see)."""
    layer = RMSNorm(channels, eps=RMS_EPS)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
    return layer


@pytest.mark.parametrize("lowering", [*RMS_LOWERINGS, "triton"])
def test_rms_norm_under_fake_tensors_gives_eager_metadata(lowering):
    x, w, _ = data(3, 4, 16, channel=-1)
    with use_lowering(lowering):
        want = rms(x, w)
        with FakeTensorMode() as mode:
            fake = rms(mode.from_tensor(x), mode.from_tensor(w))
    assert (fake.shape, fake.stride(), fake.dtype) == (want.shape, want.stride(), want.dtype)
    assert_forward(want, x, w, spec=RMS_SPEC)


@pytest.mark.parametrize("lowering", RMS_LOWERINGS)
def test_rms_norm_vmap_over_examples_and_scales_equals_a_loop(lowering):
    x, w, _ = data(3, 4, 16, channel=-1)
    scales = torch.stack([w, 2 * w, w.flip(0)])
    with use_lowering(lowering):
        per_example = torch.func.vmap(lambda xi: rms(xi[None], w)[0])(x)
        examples = torch.cat([rms(xi[None], w) for xi in x])
        per_scale = torch.func.vmap(rms, in_dims=(None, 0))(x, scales)
        ensemble = torch.stack([rms(x, s) for s in scales])
    assert torch.equal(per_example, examples) and torch.equal(per_scale, ensemble)
    assert_forward(per_example, x, w, spec=RMS_SPEC)


@pytest.mark.parametrize("lowering", RMS_LOWERINGS)
def test_rms_norm_per_example_gradients_and_forward_ad_match_the_reference(lowering):
    x, w, g = data(3, 2, 8, channel=-1)

    def example_loss(xi, wi, gi):
        return loss(rms(xi[None], wi), gi[None])

    tx, tw = data(3, 2, 8)[2], torch.linspace(-1, 1, 8)
    with use_lowering(lowering):
        per_example = torch.func.vmap(torch.func.grad(example_loss, argnums=(0, 1)), (0, None, 0))
        dx, dw = per_example(x, w, g)
        with fwAD.dual_level():
            dual = rms(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw))
            tangent = fwAD.unpack_dual(dual).tangent
    for i in range(3):
        assert_vjp(dx[i][None], dw[i], x[i : i + 1], w, g[i : i + 1], spec=RMS_SPEC)
    assert_tangent(tangent, tx, tw, x, w, spec=RMS_SPEC)


def test_rms_norm_compiles_once_for_every_sequence_length():
    # torch.compile traces the kernel wherever it applies, whatever use_lowering says.
    shapes = ((2, 5, 16), (2, 7, 16), (2, 9, 16))
    assert_compiles_once_for_all_shapes(rms_layer(16), shapes, None, dynamic=None)


def test_rms_norm_exports_with_dynamic_batch_and_sequence_length():
    dims = {0: torch.export.Dim("B"), 1: torch.export.Dim("T")}
    shapes = ((1, 3, 16), (4, 11, 16))
    assert_exports_with_dynamic_dims(rms_layer(16), (2, 5, 16), dims, shapes, spec=RMS_SPEC)
