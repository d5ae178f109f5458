"""The PyTorch adapter: conformance, properties against the reference, autograd,
mixed precision, memory formats, compilation, export, checkpoints, DDP and bad input,
for each lowering (the native CPU kernel, the pure-torch ops), plus the properties of the
design: batch invariance, no host synchronisation, one dispatch.

Every numerical check measures against :mod:`l2norm.reference` with the conformance
suite's measures (ULPs forward, machine epsilons relative to the slice for gradients).
The tests run on CUDA too when it is present (``DEVICES``).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import l2norm.torch as l2t
from l2norm import EPS_MODES, conformance, reference
from l2norm.core import portable as _portable
from l2norm.core.spec import Spec
from l2norm.testing.strategies import hostile_arrays, options
from l2norm.torch import L2Norm, l2_normalize, lowering_for, use_lowering

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: The conformance backends: the default CPU route (the native kernel where it applies),
#: the pure-torch lowering forced on the CPU, the Triton lowering forced (on CUDA where
#: present, else in Triton's interpreter: tests/conftest.py switches it on), and CUDA.
BACKEND_NAMES = ["torch", "torch-ops", "torch-triton"] + (
    ["torch-cuda"] if torch.cuda.is_available() else []
)
#: Where the Triton lowering runs here.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = list(EPS_MODES)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernel_is_built():
    """CI has a compiler and ninja: the kernel must build (a failure is a test failure)."""
    assert l2t.cpu_kernel_available()


def np_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(conformance.numpy_dtype("bfloat16"))
    return t.numpy()


def torch_of(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def ref_forward(x: torch.Tensor, w: torch.Tensor | None, **opts) -> np.ndarray:
    scale = None if w is None else np_of(w).astype(np_of(x).dtype)
    return reference.forward(np_of(x), scale, Spec.create(**opts))


def assert_close_ulps(got: torch.Tensor, want: np.ndarray, bound: float, flushes=False):
    got_np = np_of(got)
    assert got_np.dtype == want.dtype and got_np.shape == want.shape
    err = conformance.forward_error(got_np, want, want.dtype, flushes)
    nonfinite = conformance.nonfinite_mismatches(got_np.astype(np.float64), want.astype(np.float64))
    assert err <= bound and nonfinite == 0, f"{err} ULP, {nonfinite} non-finite mismatches"


def gradient_error_vs_reference(dx, ds, x, scale, g, spec, npdt) -> tuple[float, np.ndarray]:
    """The conformance suite's gradient measure (eps relative to the slice) of NumPy
    gradients ``(dx, ds)`` against the reference VJP, and the reference's ``dx``."""
    dx_ref, ds_ref = reference.vjp(x, scale, g, spec)
    dx_mag, ds_mag = conformance.gradient_magnitudes(x, scale, g, spec)

    def round_to(values, dtype):
        return np.asarray(values).astype(dtype).astype(np.float64)

    error = conformance.gradient_error(
        dx,
        round_to(dx_ref, npdt),
        dx_mag,
        ds,
        None if ds_ref is None else round_to(ds_ref, npdt),
        ds_mag,
        npdt,
        False,
    )
    return error, dx_ref


# --------------------------------------------------------------------------- conformance


# The conformance matrix of the torch lowerings: test_torch_conformance.py and
# test_triton_conformance.py (files of their own, so that the suite's two workers, which
# take a file at a time, share the load).


_HOSTILE_CALLS = given(
    data=st.data(),
    dtype=st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
    opts=options(),
    scale_kind=st.sampled_from(["per_channel", "shared", "none"]),
)
#: Triton's interpreter runs an example in seconds, not milliseconds: fewer examples there
#: (every conformance case above runs on it in full).
TRITON_EXAMPLES = settings(max_examples=6)


@pytest.mark.parametrize("backend_name", [n for n in BACKEND_NAMES if n != "torch-triton"])
@_HOSTILE_CALLS
def test_matches_reference_on_hostile_inputs(backend_name, data, dtype, opts, scale_kind):
    _hostile_inputs_match(backend_name, data, dtype, opts, scale_kind)


@TRITON_EXAMPLES
@_HOSTILE_CALLS
def test_triton_matches_reference_on_hostile_inputs(data, dtype, opts, scale_kind):
    _hostile_inputs_match("torch-triton", data, dtype, opts, scale_kind)


def _hostile_inputs_match(backend_name, data, dtype, opts, scale_kind):
    backend = conformance.get_backend(backend_name)
    shape = data.draw(st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x_np = data.draw(
        hostile_arrays(dtype, shape, axis=dim, allow_nan=True, allow_infinity=True), "x"
    )
    rng = np.random.default_rng(0)
    npdt = conformance.numpy_dtype(dtype)
    c = shape[dim]
    scale = {
        "per_channel": rng.uniform(0.5, 20, c).astype(npdt),
        "shared": np.array([20.0], dtype=npdt),
        "none": None,
    }[scale_kind]
    g_np = rng.standard_normal(shape).astype(npdt)
    full = {"axis": dim, **opts}
    spec = Spec.create(**full)
    y = backend.forward(x_np, scale, full)
    want = reference.forward(x_np, scale, spec)
    # Subnormal outputs are measured against the smallest normal (flushes=True): when the
    # input mixes ordinary values with subnormal ones, x / d * s rounds twice down there,
    # an absolute error below 2**-140 that says nothing about the slice. The conformance
    # cases above hold the strict measure.
    fwd = conformance.forward_error(y, want, npdt, True)
    assert fwd <= backend.forward_ulps[dtype], f"forward {fwd} ULP"
    assert conformance.nonfinite_mismatches(y.astype(np.float64), want.astype(np.float64)) == 0
    # In a clamp mode the gradient jumps where the norm crosses the threshold; a norm within
    # float32 rounding of it may take either side (the reference decides in float64).
    axes = spec.resolve(len(shape))
    with np.errstate(all="ignore"):
        parts = reference._parts(x_np.astype(np.float64), spec, axes)
        norm = parts.ratio * parts.d_scaled * parts.p
    near = np.abs(norm / spec.threshold - 1) < 1e-5
    assume(not (spec.eps_mode.startswith("clamp") and near.any()))
    dx, ds = backend.vjp(x_np, scale, g_np, full)
    grad, dx_ref = gradient_error_vs_reference(dx, ds, x_np, scale, g_np, spec, npdt)
    assert grad <= backend.grad_eps[dtype], f"gradient {grad} eps"
    assert np.isfinite(dx.astype(np.float64))[np.isfinite(dx_ref)].all()


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale_kind", ["per_channel", "shared", "none"])
@pytest.mark.parametrize(
    "layout", [((2, 5, 3), 1, False), ((2, 3, 2, 4), (1, 3), False), ((3, 4, 2), 2, True)]
)
def test_gradcheck_and_gradgradcheck(mode, scale_kind, layout):
    shape, dim, across = layout
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    channels = shape[dim[0] if isinstance(dim, tuple) else dim]
    w = {
        "per_channel": torch.rand(channels, dtype=torch.float64, generator=gen) + 0.5,
        "shared": torch.tensor([3.0], dtype=torch.float64),
        "none": None,
    }[scale_kind]
    inputs = (x,) if w is None else (x, w.requires_grad_(True))

    def fn(*args):
        return l2_normalize(*args, dim=dim, across_spatial=across, eps_mode=mode, eps=1e-3)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("preset", ["ssd.pytorch", "mmdet", "caffe", "torchvision", "tensorflow"])
def test_zero_pixels_have_the_exact_finite_gradient(preset):
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    x[0, :, 1, 1] = 0.0  # a pixel that a ReLU zeroed on every channel
    x.requires_grad_(True)
    w = torch.full((8,), 20.0, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    y = l2_normalize(x, w, preset=preset)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    spec = Spec.create(axis=1, preset=preset)
    xn, wn, gn = x.detach().numpy(), w.detach().numpy(), g.numpy()
    grad, _ = gradient_error_vs_reference(dx.numpy(), dw.numpy(), xn, wn, gn, spec, np.dtype("f8"))
    assert grad <= conformance.DEFAULT_GRAD_EPS["float64"], f"gradient {grad} eps"
    # d = eps at zero, so the gradient there is s * g / eps exactly.
    eps = Spec.create(preset=preset).threshold
    np.testing.assert_allclose(dx[0, :, 1, 1].numpy(), (20.0 * g[0, :, 1, 1] / eps).numpy())


@pytest.mark.parametrize("form", ["script", "trace", "export"])
@pytest.mark.parametrize("mode", MODES)
def test_exported_forms_have_finite_gradients_at_zero_pixels(form, mode):
    # Scripted, traced and exported modules run the branch-free formula, differentiated
    # by autograd (not by the hand-written backward): it must be NaN-free too.
    m = L2Norm(8, eps_mode=mode, dtype=torch.float64)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    x[0, :, 1, 1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = {
            "script": lambda: torch.jit.script(m),
            "trace": lambda: torch.jit.trace(m, x),
            "export": lambda: torch.export.export(m, (x,)).module(),
        }[form]()
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(run(xg), xg, g)
    dx_ref, _ = reference.vjp(
        x.numpy(), np_of(m.weight), g.numpy(), Spec.create(axis=1, eps_mode=mode)
    )
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-9, atol=0)


def test_double_backward_matches_autodiff_of_a_plain_formula():
    # Away from every threshold, the plain clamp_norm formula is smooth: its Hessian-vector
    # products must equal ours.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=gen)

    def plain(x, w):
        return x / x.norm(dim=1, keepdim=True) * w.view(1, -1, 1, 1)

    results = []
    for f in (plain, lambda x, w: l2_normalize(x, w)):
        loss = (f(x, w) ** 3).sum()
        gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
        results.append(torch.autograd.grad((gx * v).sum() + gw.sum(), (x, w)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def saved_bytes(fn, *args) -> int:
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


@pytest.mark.parametrize("lowering", l2t.LOWERINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"channel_shared": True}, {"preset": "caffe"}])
def test_memory_saved_for_backward_is_about_the_input(lowering, dtype, kwargs):
    m = L2Norm(64, dtype=torch.float32 if dtype != torch.float64 else dtype, **kwargs)
    x = torch.randn(4, 64, 16, 16, dtype=dtype, requires_grad=True)
    with use_lowering(lowering):
        saved = saved_bytes(m, x)
    # The kernel saves the input (and the weight); the ops lowering adds its per-slice
    # sums (slice-sized: 1/64 of the entries here, at most 8 bytes each).
    assert saved <= 1.1 * x.numel() * x.element_size(), saved
    # and the peers' idiom, for scale: autograd of ssd.pytorch's formula saves ~3x
    peer = saved_bytes(
        lambda x: x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * m.weight.view(1, -1, 1, 1),
        x.float().detach().requires_grad_(True),
    )
    assert peer > 2 * x.numel() * 4


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("make", "kwargs", "want", "want_triton"),
    [
        (lambda: torch.randn(2, 16, 4, 4), {}, "cpu-kernel", "triton"),  # NCHW, 16 after C
        (lambda: torch.randn(2, 16, 4, 4).bfloat16(), {}, "cpu-kernel", "triton"),
        (lambda: torch.randn(2, 4, 4, 16).half(), {"dim": -1}, "cpu-kernel", "triton"),  # rows
        (
            lambda: torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last),
            {},
            "cpu-kernel",
            "triton",
        ),
        (lambda: torch.randn(2, 16, 4, 4).double(), {}, "ops", "ops"),  # no wider sums
        (lambda: torch.randn(2, 16, 4, 4), {"dim": (1, 2)}, "ops", "ops"),  # several axes
        (lambda: torch.randn(2, 16, 4, 4), {"across_spatial": True}, "ops", "ops"),
        # 4 slices after C: too short for the CPU kernel's blocks, fine for Triton's tiles
        (lambda: torch.randn(2, 16, 2, 2), {}, "ops", "triton"),
        (lambda: torch.randn(2, 16, 8, 8)[:, :, ::2], {}, "ops", "ops"),  # not dense
    ],
)
def test_dispatch_picks_the_kernel_where_it_applies(make, kwargs, want, want_triton):
    x = make()
    assert lowering_for(x, **kwargs) == want
    with use_lowering("ops"):
        assert lowering_for(x, **kwargs) == "ops"
    with use_lowering("cpu-kernel"):
        assert lowering_for(x, **kwargs) == want
    with use_lowering("triton"):
        assert lowering_for(x.to(TRITON_DEVICE), **kwargs) == want_triton
    if torch.cuda.is_available():  # CUDA tensors take the Triton kernels by default
        assert lowering_for(x.cuda(), **kwargs) == want_triton


def test_use_lowering_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown lowering"), use_lowering("cuda"):
        pass


def _run_in_child(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_environment_switch_turns_the_kernel_off():
    code = "import torch, l2norm.torch as t; print(t.lowering_for(torch.randn(2, 16, 4, 4)))"
    for value, want in (("0", "ops"), ("1", "cpu-kernel")):
        out = _run_in_child(code, L2NORM_CPU_KERNEL=value)
        assert out.returncode == 0 and out.stdout.split() == [want], out.stderr


def test_use_cpu_kernel_turns_it_off_and_on_again():
    x = torch.randn(2, 16, 4, 4)
    assert not l2t.use_cpu_kernel(False)
    try:
        assert lowering_for(x) == "ops"
    finally:
        assert l2t.use_cpu_kernel(True)
    assert lowering_for(x) == "cpu-kernel"


def test_the_kernel_installed_with_the_package_needs_no_compiler(tmp_path):
    # scripts/setup installs the package with its build hook, which compiles the kernel
    # into it: a process with no compiler and an empty cache still loads it, silently.
    code = """
import warnings, torch
warnings.simplefilter("error")
import l2norm.torch as t
from l2norm import _native
x = torch.ones(1, 8, 4, 4)
print(_native.installed_capi() is not None, t.cpu_kernel_available(), t.lowering_for(x))
"""
    out = _run_in_child(code, L2NORM_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++")
    assert out.returncode == 0 and out.stdout.split() == ["True", "True", "cpu-kernel"], (
        out.stdout + out.stderr
    )
    assert not any(tmp_path.iterdir())  # nothing compiled at run time


def test_without_a_compiler_the_layer_warns_once_and_computes_with_ops(tmp_path):
    # A fresh extension cache and no C++ compiler: the build fails, the layer says so once
    # and gives the reference's answer through the ops lowering.
    code = """
import warnings, numpy as np, torch
import l2norm.torch as t
from l2norm import reference
from l2norm.core.spec import Spec
x = torch.randn(2, 16, 4, 4)
x[0, :, 0, 0] = 0
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = t.l2_normalize(x, torch.full((16,), 20.0))
    y2 = t.l2_normalize(x)
messages = [str(w.message) for w in caught if "native CPU kernel" in str(w.message)]
want = reference.forward(x.numpy(), np.full(16, 20.0, np.float32), Spec.create(axis=1))
print(len(messages), t.cpu_kernel_available(), t.lowering_for(x), np.abs(y.numpy() - want).max())
"""
    no_kernel = {
        "L2NORM_CACHE_DIR": str(tmp_path),  # nothing built here yet
        "L2NORM_KERNEL_PREBUILT": "0",  # as if installed without a compiler
        "CXX": "/nonexistent/c++",
    }
    out = _run_in_child(code, **no_kernel)
    assert out.returncode == 0, out.stderr
    count, available, route, error = out.stdout.split()
    assert (count, available, route) == ("1", "False", "ops"), out.stdout
    assert float(error) <= 1e-6
    forced = _run_in_child(
        "import torch, l2norm.torch as t\n"
        "try:\n"
        "    with t.use_lowering('cpu-kernel'):\n"
        "        t.l2_normalize(torch.randn(2, 16, 4, 4))\n"
        "except RuntimeError as err:\n"
        "    print(err)\n",
        **no_kernel,
    )
    assert "native CPU kernel is not available" in forced.stdout, forced.stderr


# --------------------------------------------------------------------------- design properties


def _neighbourhood(layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Sample 0 (float32, per-channel scale, fixed cotangent) and the batches it is put in:
    alone, then with neighbours holding an all-zero pixel, a pixel whose squares overflow
    float32 (1e25) and one whose squares underflow (1e-25)."""
    gen = torch.Generator().manual_seed(11)
    shape = (16, 32, 5, 5) if layout == "nchw" else (16, 5, 5, 32)
    x = torch.randn(shape, generator=gen) * 3
    g = torch.randn(shape, generator=gen)
    w = torch.rand(32, generator=gen) * 20
    pixel = (slice(None), 1, 2) if layout == "nchw" else (1, 2, slice(None))
    x[(1, *pixel)] = 0.0
    x[(2, *pixel)] *= 1e25
    x[(3, *pixel)] *= 1e-25
    x[4] *= 1e-30  # a whole sample of tiny values
    batches = [[0], [0], [0, 1, 2], [0, 3, 4, 5, 6, 7, 8, 9], list(range(16)), [0, 2, 1]]
    return x, g, w, batches


def _run_route(route: str, x, w, g, dim):
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    if route == "compiled":
        fn = torch.compile(lambda a, b: l2_normalize(a, b, dim=dim), dynamic=False)
        y = fn(xg, wg)
    else:
        with use_lowering(None if route == "default" else route):
            y = l2_normalize(xg, wg, dim=dim)
    (dx,) = torch.autograd.grad(y, xg, g)
    return y.detach(), dx


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("route", ["default", "ops", "triton", "compiled"])
def test_batch_invariance_bitwise(route, layout):
    """One sample's output and input gradient do not depend on the rest of the batch."""
    x, g, w, batches = _neighbourhood(layout)
    dim = 1 if layout == "nchw" else -1
    if route == "compiled":
        torch._dynamo.reset()
    alone_y, alone_dx = _run_route(route, x[:1], w, g[:1], dim)
    for members in batches:
        y, dx = _run_route(route, x[members], w, g[members], dim)
        assert torch.equal(y[0], alone_y[0]), (route, members)
        assert torch.equal(dx[0], alone_dx[0]), (route, members)
    # and every sample, hostile ones included, equals itself computed alone
    y, dx = _run_route(route, x, w, g, dim)
    for i in range(1, 5):
        yi, dxi = _run_route(route, x[i : i + 1], w, g[i : i + 1], dim)
        assert torch.equal(y[i], yi[0]) and torch.equal(dx[i], dxi[0]), (route, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_streams_large_outputs_with_the_same_results(dtype):
    """Outputs of at least 8 MiB are written with streaming stores (kernel.h: kStreamBytes):
    the batch takes that path, each sample alone the plain one, and they agree bit for bit,
    Inf and zero pixels included; the values are within 1 ULP of the reference."""
    batch = 3 if dtype == torch.float32 else 6  # 8.9 MB, each sample 3.0 or 1.5 MB
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 512, 38, 38, generator=gen).to(dtype)
    x[1, :, 5, 7] = 0.0
    x[2, 3, 0, 0] = float("inf")
    assert x.nbytes >= 8 << 20 > x[0].nbytes
    g = torch.randn(x.shape, generator=gen).to(dtype)
    w = torch.full((512,), 20.0)
    assert lowering_for(x) == "cpu-kernel"
    y, dx = _run_route("default", x, w, g, 1)
    for i in range(batch):
        yi, dxi = _run_route("default", x[i : i + 1], w, g[i : i + 1], 1)
        assert torch.equal(y[i], yi[0]) and torch.equal(dx[i], dxi[0]), i
    assert_close_ulps(y[:2], ref_forward(x[:2], w, axis=1), 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_kernel_splits_long_samples_into_blocks(dtype):
    """A sample of more than 2048 slices spans several kernel blocks (kernel.h:
    block_slices); the blocks' seams change nothing: each slice within 1 ULP, and the
    gradients within the suite's bound, of the reference."""
    npdt = conformance.numpy_dtype(dtype)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 24, 2100)).astype(npdt)
    x[0, :, 2047:2050] = 0  # zero slices at the seam
    x[1, 5, 2048] = np.inf
    scale = rng.uniform(0.5, 20, 24).astype(npdt)
    g = rng.standard_normal(x.shape).astype(npdt)
    backend = conformance.get_backend("torch")
    options = {"axis": 1}
    spec = Spec.create(**options)
    assert lowering_for(torch_of(x)) == "cpu-kernel"
    want = reference.forward(x, scale, spec)
    y = backend.forward(x, scale, options)
    assert conformance.forward_error(y, want, npdt, False) <= 1
    assert conformance.nonfinite_mismatches(y.astype(np.float64), want.astype(np.float64)) == 0
    dx, ds = backend.vjp(x, scale, g, options)
    grad, _ = gradient_error_vs_reference(dx, ds, x, scale, g, spec, npdt)
    assert grad <= 2, f"gradient {grad} eps"


class _HostSyncs(TorchDispatchMode):
    """Records the aten calls that read a device value back to the host."""

    SYNCS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    )

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lowering", [None, "ops", "triton"])
@pytest.mark.parametrize("hostile", [False, True], ids=["ordinary", "hostile"])
def test_no_host_synchronisation(device, lowering, hostile):
    # Every lowering (on the CPU the Triton one runs in Triton's interpreter): forward and
    # backward make no call that reads a value back to the host, whatever the data.
    x = torch.randn(4, 16, 5, 5, device=device)
    if hostile:
        x[0, :, 0, 0] = 0.0
        x[1, :, 1, 1] *= 1e25
        x[2, :, 2, 2] *= 1e-25
        x[3, 3, 3, 3] = float("inf")
    x.requires_grad_(True)
    m = L2Norm(16, device=device)
    g = torch.randn_like(x)
    counter = _HostSyncs()
    with use_lowering(lowering), counter:
        y = m(x)
        dx, dw = torch.autograd.grad(y, (x, m.weight), g)
    assert counter.seen == [], counter.seen
    # and the counter does see one where there is one
    with _HostSyncs() as control:
        bool(x.detach().sum() > 0)
    assert control.seen


# --------------------------------------------------------------------------- Triton kernels


def test_triton_forced_where_it_cannot_run_says_why():
    # Without the interpreter switched on before triton is imported, a CPU tensor cannot
    # take the Triton kernels: a clear error naming the switch, not a crash inside Triton.
    code = (
        "import torch, l2norm.torch as t\n"
        "try:\n"
        "    with t.use_lowering('triton'):\n"
        "        t.l2_normalize(torch.randn(2, 8, 4, 4))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    if torch.cuda.is_available():
        pytest.skip("with a GPU the Triton lowering runs; this is the CPU-only refusal")
    out = _run_in_child(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_triton_forced_without_triton_names_the_package(monkeypatch):
    from l2norm.torch import _triton

    monkeypatch.setattr(_triton, "installed", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"), use_lowering("triton"):
        l2_normalize(torch.randn(2, 8, 4, 4, device=TRITON_DEVICE))
    # and the default dispatch falls back to the ops lowering rather than failing
    assert lowering_for(torch.randn(2, 8, 4, 4, device=TRITON_DEVICE)) != "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_op_is_one_graph_node_with_its_backward(dtype):
    # torch.compile keeps the registered op whole (fullgraph: no graph break), forward and
    # backward, and gives the eager kernels' bits.
    x = (torch.randn(2, 16, 5, 5) * 3).to(dtype).to(TRITON_DEVICE).requires_grad_(True)
    w = (torch.rand(16) * 20).to(TRITON_DEVICE).requires_grad_(True)
    g = torch.randn(2, 16, 5, 5).to(dtype).to(TRITON_DEVICE)

    def op(a, b):
        return torch.ops.l2norm.kernel_forward(a, b, 1, "add_sumsq", 1e-10, "triton")

    torch._dynamo.reset()
    compiled = torch.compile(op, fullgraph=True, dynamic=False)
    y = compiled(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    with use_lowering("triton"):
        y_eager = l2_normalize(x, w, preset="caffe")
        dx_eager, dw_eager = torch.autograd.grad(y_eager, (x, w), g)
    assert torch.equal(y, y_eager) and torch.equal(dx, dx_eager) and torch.equal(dw, dw_eager)


def test_triton_keeps_channels_last_and_deterministic_scale_gradient():
    x = (torch.randn(3, 24, 5, 7) * 3).to(memory_format=torch.channels_last)
    x[0, :, 1, 1] = 0.0
    x[1, :3, 0, 0] = 3e38  # squares overflow float32
    x[1, 5, 4, 6] = float("-inf")
    x = x.to(TRITON_DEVICE).requires_grad_(True)
    w = (torch.rand(24) + 0.5).to(TRITON_DEVICE).requires_grad_(True)
    g = torch.randn(3, 24, 5, 7, device=TRITON_DEVICE)  # NCHW: the lowering copies it
    runs = []
    for _ in range(2):
        with use_lowering("triton"):
            y = l2_normalize(x, w)
            runs.append((y, *torch.autograd.grad(y, (x, w), g)))
    (y, dx, dw), (y2, dx2, dw2) = runs
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(dw, dw2)  # run to run
    want = ref_forward(x.detach().cpu(), w.detach().cpu(), axis=1)
    assert_close_ulps(y.cpu(), want, 1)
    # the Inf pixel: its limit direction, and no gradient through it
    assert torch.all(dx[1, :, 4, 6] == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_no_sync_in_forward_and_backward():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), L2Norm(64)).cuda()
    x = torch.randn(4, 3, 19, 19, device="cuda")
    g = torch.randn(4, 64, 19, 19, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = model(x)
        y.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert lowering_for(y.detach()) == "triton"
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(static_y, model(static_x), rtol=0, atol=0)


# --------------------------------------------------------------------------- native CPU kernel


_KERNEL_CALLS = given(
    data=st.data(),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    mode=st.sampled_from(MODES),
    scale_kind=st.sampled_from(["per_channel", "shared", "none"]),
)


@_KERNEL_CALLS
def test_cpu_kernel_matches_the_reference(data, dtype, mode, scale_kind):
    _kernel_matches_the_reference("cpu-kernel", "torch", data, dtype, mode, scale_kind)


@TRITON_EXAMPLES
@_KERNEL_CALLS
def test_triton_kernels_match_the_reference(data, dtype, mode, scale_kind):
    _kernel_matches_the_reference("triton", "torch-triton", data, dtype, mode, scale_kind)


def _kernel_matches_the_reference(lowering, backend_name, data, dtype, mode, scale_kind):
    # Shapes the kernels take: channel axis 1 with at least 8 slices after it (their block
    # layout), or the channel axis last (rows); hostile slices: zeros, huge, tiny,
    # subnormal, NaN, Inf.
    c = data.draw(st.integers(1, 40), "channels")
    spatial = data.draw(st.sampled_from([(8,), (3, 5), (2, 3, 4), (37,)]), "spatial")
    batch = data.draw(st.integers(1, 3), "batch")
    axis = data.draw(st.sampled_from([1, -1]), "axis")
    shape = (batch, c, *spatial) if axis == 1 else (batch, *spatial, c)
    x = data.draw(hostile_arrays(dtype, shape, axis=axis, allow_nan=True, allow_infinity=True))
    rng = np.random.default_rng(c)
    npdt = conformance.numpy_dtype(dtype)
    scale = conformance.scale_values(scale_kind, c, rng)
    scale = None if scale is None else scale.astype(npdt)
    g = rng.standard_normal(shape).astype(npdt)
    backend = conformance.get_backend(backend_name)
    options = {"axis": axis, "eps_mode": mode}
    spec = Spec.create(**options)
    xt = torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16) if dtype == "bfloat16" else None
    xt = (torch.from_numpy(x) if xt is None else xt).to(
        TRITON_DEVICE if lowering == "triton" else "cpu"
    )
    with use_lowering(lowering):
        assert lowering_for(xt, dim=axis) == lowering
    y = backend.forward(x, scale, options)
    fwd = conformance.forward_error(y, reference.forward(x, scale, spec), npdt, False)
    # Sums in float64, each output rounded once: at most one rounding from the reference.
    assert fwd <= 1, f"forward {fwd} ULP"
    assert (
        conformance.nonfinite_mismatches(
            y.astype(np.float64), reference.forward(x, scale, spec).astype(np.float64)
        )
        == 0
    )
    dx, ds = backend.vjp(x, scale, g, options)
    grad, dx_ref = gradient_error_vs_reference(dx, ds, x, scale, g, spec, npdt)
    assert grad <= backend.grad_eps[dtype], f"gradient {grad} eps"
    assert np.isfinite(dx.astype(np.float64))[np.isfinite(dx_ref)].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_keeps_channels_last(dtype):
    # channels_last memory: the kernel's row loops, output and gradient in the same format
    x = (torch.randn(2, 24, 5, 7) * 3).to(dtype)
    x[0, :, 1, 1] = 0.0
    x[1, :, 2, 3] = float("nan")
    x[1, :3, 0, 0] = 3e38  # squares overflow in float32
    x[1, 5, 4, 6] = float("-inf")
    x = x.to(memory_format=torch.channels_last).requires_grad_(True)
    w = (torch.rand(24) + 0.5).requires_grad_(True)
    g = torch.randn(2, 24, 5, 7).to(dtype)  # contiguous NCHW: the kernel copies it
    assert lowering_for(x) == "cpu-kernel"
    y = l2_normalize(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    npdt = conformance.numpy_dtype(str(dtype).removeprefix("torch."))
    xn, gn, wn = np_of(x), np_of(g), np_of(w).astype(npdt)
    spec = Spec.create(axis=1)
    assert_close_ulps(y, reference.forward(xn, wn, spec), 1)
    grad, _ = gradient_error_vs_reference(np_of(dx), np_of(dw).astype(npdt), xn, wn, gn, spec, npdt)
    assert grad <= 2, f"gradient {grad} eps"


def test_cpu_kernel_with_a_broadcast_cotangent():
    m = L2Norm(64)
    x = torch.randn(4, 64, 16, 16, requires_grad=True)
    assert lowering_for(x) == "cpu-kernel"
    m(x).sum().backward()  # the cotangent is a zero-stride broadcast of a scalar
    ones = np.ones(x.shape, np.float32)
    spec = Spec.create(axis=1)
    dx_ref, dw_ref = reference.vjp(x.detach().numpy(), np_of(m.weight), ones, spec)
    dx_mag, dw_mag = conformance.gradient_magnitudes(
        x.detach().numpy(), np_of(m.weight), ones, spec
    )
    assert np.max(np.abs(x.grad.numpy() - dx_ref) / dx_mag) <= 2 * np.finfo(np.float32).eps
    assert np.max(np.abs(m.weight.grad.numpy() - dw_ref) / dw_mag) <= 2 * np.finfo(np.float32).eps


def test_kernel_placement_codes_come_from_the_mode_table():
    # The kernel is told each placement as (is_add, power, mean) from l2norm.core.modes, three
    # fields of its Params: a new mode of the same family needs no kernel change.
    from l2norm import _native
    from l2norm.core.modes import MODES as TABLE

    fields = [name for name, _ in _native.Params._fields_]
    assert fields[fields.index("is_add") :][:3] == ["is_add", "power", "mean"]
    codes = {(1, 1, 0), (1, 2, 0), (0, 1, 0), (0, 2, 0), (1, 2, 1)}
    assert {m.kernel_code for m in TABLE.values()} == codes
    assert list(TABLE) == MODES


# --------------------------------------------------------------------------- dtypes, formats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_are_kept_and_computed_wide(device, dtype):
    m = L2Norm(16, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)
    x = (torch.randn(2, 16, 4, 4, device=device) * 600).to(dtype)  # float16 norm ~ 1e4
    x.requires_grad_(True)
    y = m(x)
    assert y.dtype == dtype
    assert_close_ulps(y, ref_forward(x, m.weight, axis=1), 1 if dtype != torch.float64 else 4)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and m.weight.grad.dtype == m.weight.dtype
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.bfloat16),
        pytest.param(
            "cuda",
            torch.float16,
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="autocast float16 needs CUDA"
            ),
        ),
    ],
)
def test_autocast(device, dtype):
    conv = torch.nn.Conv2d(3, 16, 3, device=device)
    m = L2Norm(16, device=device)
    x = torch.randn(2, 3, 8, 8, device=device) * 300  # float16 squares overflow
    with torch.autocast(device, dtype=dtype):
        h = conv(x)
        y = m(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert_close_ulps(y, ref_forward(h, m.weight, axis=1), 1)
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_is_preserved(device):
    m = L2Norm(16, device=device)
    x = torch.randn(2, 16, 5, 5, device=device).to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_ulps(y, ref_forward(x, m.weight, axis=1), 4)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "shape, dim",
    [((4, 7), 1), ((4, 7), -1), ((2, 3, 7), -1), ((2, 7, 3, 3, 2), 1), ((2, 3, 7, 2), (2, 3))],
)
def test_any_rank_and_dim(shape, dim):
    channel = dim[0] if isinstance(dim, tuple) else dim
    m = L2Norm(shape[channel], dim=dim, scale_init=torch.arange(1.0, shape[channel] + 1))
    x = torch.randn(shape)
    assert_close_ulps(m(x), ref_forward(x, m.weight, axis=dim), 4)


def test_overflow_and_underflow_safe_float32():
    x = torch.randn(3, 8, 4, 4)
    x[0] *= 1e20  # squares overflow float32
    x[1] *= 1e-25  # squares underflow
    x[2, :, 0, 0] = torch.tensor([5e-41] * 8)  # subnormal pixel
    w = torch.rand(8) + 0.5
    y = l2_normalize(x, w)
    assert_close_ulps(y, ref_forward(x, w, axis=1), 4)
    xg = x.clone().requires_grad_(True)
    l2_normalize(xg, w).backward(torch.ones_like(x))
    assert torch.isfinite(xg.grad).all()


def test_nan_and_inf_slices_follow_the_reference():
    x = torch.randn(2, 4, 3)
    x[0, 1, 0] = float("nan")
    x[1, 0, 2] = float("inf")
    x[1, 3, 2] = float("-inf")
    y = l2_normalize(x, torch.full((4,), 2.0))
    assert torch.isnan(y[0, :, 0]).all() and not torch.isnan(y[0, :, 1:]).any()
    inf_col = y[1, :, 2]
    torch.testing.assert_close(inf_col, torch.tensor([2.0, 0, 0, -2.0]) / 2**0.5)


# --------------------------------------------------------------------------- compile, export


def make_inputs():
    x = torch.randn(2, 16, 5, 5)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 1] *= 1e20
    x[1, :, 2, 2] *= 1e-25
    return x


@pytest.fixture(scope="module")
def model():
    return torch.nn.Sequential(torch.nn.Identity(), L2Norm(16, scale_init=torch.rand(16) + 1))


def reference_of(model, x):
    return reference.forward(x.numpy(), np_of(model[1].weight), Spec.create(axis=1))


def test_torch_compile_fullgraph(model):
    compiled = torch.compile(model, fullgraph=True)
    x = make_inputs().requires_grad_(True)
    y = compiled(x)
    assert_close_ulps(y, reference_of(model, x.detach()), 4)
    g = torch.randn_like(y)
    y.backward(g)
    dx_ref, _ = reference.vjp(
        x.detach().numpy(), np_of(model[1].weight), g.numpy(), Spec.create(axis=1)
    )
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-4, atol=1e-5 * np.abs(dx_ref).max())


@pytest.mark.parametrize("preset", ["torchvision", "ssd.pytorch", "caffe"])
@pytest.mark.parametrize("hostile", [False, True], ids=["ordinary", "hostile"])
def test_torch_compile_matches_the_reference(preset, hostile):
    x = make_inputs() if hostile else torch.randn(2, 16, 5, 5)
    w = torch.rand(16) + 1
    f = torch.compile(lambda x, w: l2_normalize(x, w, preset=preset), fullgraph=True)
    want = reference.forward(x.numpy(), w.numpy(), Spec.create(axis=1, preset=preset))
    assert_close_ulps(f(x, w), want, 4)


def _compiled_case_result(case: conformance.Case, device: str) -> conformance.CaseResult:
    """One conformance case through ``torch.compile(fullgraph=True)``, forward and VJP
    from the same compiled graph (compiled afresh: dynamo recompiles per option set)."""
    torch._dynamo.reset()
    compiled = torch.compile(l2_normalize, fullgraph=True, dynamic=False)

    def run(x, scale, g, options):
        """``(y, dx, dscale)`` from one compiled call and its backward."""
        xt = torch_of(x).to(device).requires_grad_(True)
        wt = None if scale is None else torch_of(scale).to(device).requires_grad_(True)
        kwargs = dict(options)
        kwargs["dim"] = kwargs.pop("axis")
        y = compiled(xt, wt, **kwargs)
        inputs = (xt,) if wt is None else (xt, wt)
        grads = torch.autograd.grad(y, inputs, torch_of(g).to(device))
        return np_of(y), np_of(grads[0]), None if wt is None else np_of(grads[1])

    backend = conformance.Backend(
        name="torch-compiled",
        forward=lambda x, scale, options: run(x, scale, np.zeros_like(x), options)[0],
        vjp=lambda x, scale, g, options: run(x, scale, g, options)[1:],
    )
    return conformance.run_case(backend, case)


COMPILED_CASES = [
    conformance.Case(1, option_set, "per_channel", dtype, data)
    for option_set in ("default", *(f"mode={m}" for m in MODES), "tiny-eps", "large-eps")
    for dtype in ("float32",)
    for data in ("random", "hostile")
] + [
    conformance.Case(1, "default", "per_channel", dtype, d)
    for dtype in ("float64", "bfloat16")
    for d in ("random", "hostile")
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: c.id)
def test_torch_compile_conformance(case, device):
    """The compiled graph (the ops lowering, fused by Inductor) on hostile and random data."""
    result = _compiled_case_result(case, device)
    assert result.passed, result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 512, 38, 38), (1, 512, 19, 19), (2, 1024, 10, 10)])
def test_torch_compile_meets_the_eager_bounds_at_ssd_widths(device, shape):
    # SSD's conv4_3 (512 channels) and fc7 (1024): long strided reductions, where a
    # float32 accumulation loses accuracy with the length; the compiled sums are float64.
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    m = L2Norm(shape[1], scale_init=torch.rand(shape[1], generator=gen) * 20, device=device)
    x = torch.randn(shape, generator=gen).to(device)
    x[0, :, 0, 0] = 0.0
    compiled = torch.compile(m, dynamic=False)
    want = ref_forward(x.cpu(), m.weight.cpu(), axis=1)
    assert_close_ulps(compiled(x), want, conformance.get_backend("torch").forward_ulps["float32"])
    assert_close_ulps(m(x), want, 1)  # eager: the kernel (CPU) rounds once


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_slices_whose_squares_all_underflow(mode):
    # Only such slices in the batch, and an eps below their norm: the compiled one-pass
    # branch must not take them for all-zero slices (their float32 sum of squares is 0).
    torch._dynamo.reset()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    x[0, :, 0, 0] *= 1e-24
    x = x.float()
    w = torch.rand(16) + 1
    f = torch.compile(
        lambda x, w: l2_normalize(x, w, eps=1e-30, eps_mode=mode), fullgraph=True, dynamic=False
    )
    xg = x.clone().requires_grad_(True)
    y = f(xg, w)
    spec = Spec.create(axis=1, eps=1e-30, eps_mode=mode)
    assert_close_ulps(y, reference.forward(x.numpy(), w.numpy(), spec), 4)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, xg, g)
    assert not dx.requires_grad  # a gradient that required grad would break optimizers
    dx_ref, _ = reference.vjp(x.numpy(), w.numpy(), g.numpy(), spec)
    dx_mag, _ = conformance.gradient_magnitudes(x.numpy(), w.numpy(), g.numpy(), spec)
    assert np.max(np.abs(dx.numpy() - dx_ref) / dx_mag) <= 16 * np.finfo(np.float32).eps


def test_torch_jit_script(model):
    scripted = torch.jit.script(model)
    x = make_inputs()
    assert_close_ulps(scripted(x), reference_of(model, x), 4)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_close_ulps(torch.jit.load(buffer)(x), reference_of(model, x), 4)
    with pytest.raises(Exception, match="channels"):
        scripted(torch.randn(2, 8, 3, 3))
    # torch.jit.script swaps the twin into the model it was given: run from Python, the
    # model must still behave as the layer (eager, traced for ONNX).
    assert_close_ulps(model(x), reference_of(model, x), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    assert "l2norm::" not in str(traced.graph)


def test_torch_jit_trace(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, make_inputs())
    x = make_inputs() * 3
    assert_close_ulps(traced(x), reference_of(model, x), 4)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)


def test_torch_export(model):
    exported = torch.export.export(model, (make_inputs(),))
    x = make_inputs()
    assert_close_ulps(exported.module()(x), reference_of(model, x), 4)


def test_onnx_export_runs_in_onnxruntime(model):
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: the dynamo one needs onnxscript, not a dependency.
        torch.onnx.export(
            model,
            (make_inputs(),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 16, 7, 4)
    x[0, :, 0, 0] = 0.0
    x[2, :, 1, 1] *= 1e20
    (y,) = session.run(None, {"x": x.numpy()})
    assert_close_ulps(torch.from_numpy(y), reference_of(model, x), 4)


# --------------------------------------------------------------------------- module API


def test_state_dict_round_trip_and_peer_checkpoints():
    class SSDLike(torch.nn.Module):  # ssd.pytorch names the layer L2Norm, the scale weight
        def __init__(self):
            super().__init__()
            self.L2Norm = L2Norm(512, preset="ssd.pytorch")

    src, dst = SSDLike(), SSDLike()
    with torch.no_grad():
        src.L2Norm.weight.uniform_(5, 25)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert list(state) == ["L2Norm.weight"] and state["L2Norm.weight"].shape == (512,)
    dst.load_state_dict(state)
    assert torch.equal(dst.L2Norm.weight, src.L2Norm.weight)
    # a checkpoint from ssd.pytorch / mmdetection is a plain (512,) tensor under that key
    dst.load_state_dict({"L2Norm.weight": torch.full((512,), 20.0)})
    assert torch.equal(dst.L2Norm.weight, torch.full((512,), 20.0))
    frozen = L2Norm(8, learnable=False, scale_init=3.0)
    assert list(frozen.parameters()) == [] and "weight" in frozen.state_dict()


def test_module_api():
    m = L2Norm(4, scale_init=[1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    with torch.no_grad():
        m.weight.zero_()
    m.reset_parameters()
    assert m.weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    shared = L2Norm(4, channel_shared=True)
    assert shared.weight.shape == (1,) and shared.weight.item() == 20.0
    assert "channel_shared=True" in repr(shared)
    assert repr(L2Norm(512, preset="caffe")) == (
        "L2Norm(512, dim=1, eps_mode=add_sumsq, eps=1e-10, preset=caffe)"
    )
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(shared(x), F.normalize(x, dim=1) * 20)


def test_matches_torchvision_idiom_on_ordinary_activations():
    x = torch.randn(2, 32, 6, 6)
    w = torch.rand(32) * 20
    torch.testing.assert_close(l2_normalize(x, w), F.normalize(x, dim=1) * w.view(1, -1, 1, 1))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: L2Norm(8)(torch.randn(8)), ValueError, "rank >= 2"),
        (lambda: L2Norm(8, dim=4)(torch.randn(2, 8, 3)), ValueError, "out of range"),
        (lambda: L2Norm(8)(torch.randn(2, 6, 3)), ValueError, "6 channels.*expected 8"),
        (lambda: L2Norm(8)(torch.ones(2, 8, dtype=torch.int64)), TypeError, "torch.int64"),
        (lambda: L2Norm(8)(torch.ones(2, 8, dtype=torch.bool)), TypeError, "torch.bool"),
        (lambda: L2Norm(8)(torch.ones(2, 8, dtype=torch.complex64)), TypeError, "complex64"),
        (lambda: L2Norm(8)(np.ones((2, 8))), TypeError, "torch.Tensor"),
        (lambda: L2Norm(8, dtype=torch.float64)(torch.randn(2, 8)), TypeError, "float64, wider"),
        (
            lambda: l2_normalize(torch.randn(2, 8), torch.ones(8, dtype=torch.int32)),
            TypeError,
            "int32",
        ),
        (lambda: L2Norm(8, device="meta")(torch.randn(2, 8)), ValueError, "meta"),
        (lambda: l2_normalize(torch.randn(2, 8), torch.ones(4)), ValueError, "shape \\(4,\\)"),
        (lambda: l2_normalize(torch.randn(2, 8), torch.ones(8, 1)), ValueError, "shape"),
        (lambda: l2_normalize(torch.randn(2, 8), [1.0] * 8), TypeError, "weight"),
        (lambda: l2_normalize(torch.randn(2, 8), eps=-1.0), ValueError, "eps"),
        (lambda: l2_normalize(torch.randn(2, 8), eps_mode="add"), ValueError, "eps_mode"),
        (lambda: l2_normalize(torch.randn(2, 8), preset="x"), ValueError, "preset"),
        (
            lambda: l2_normalize(torch.randn(2, 8), preset="caffe", eps_mode="add_norm"),
            ValueError,
            "conflicts",
        ),
        (lambda: l2_normalize(torch.randn(2, 8), dim=True), TypeError, "axis"),
        (lambda: l2_normalize(torch.randn(2, 8), dim=(1, 1)), ValueError, "repeats"),
        (lambda: L2Norm(0), ValueError, "num_channels"),
        (lambda: L2Norm(8, scale_init=[1.0, 2.0]), ValueError, "scale_init"),
        (lambda: L2Norm(8, scale_init=float("nan")), ValueError, "finite"),
        (lambda: L2Norm(8, dtype=torch.int32), TypeError, "dtype"),
        (lambda: L2Norm(8, learnable=1), TypeError, "learnable"),
        (lambda: L2Norm(8, across_spatial=True, dim=0)(torch.randn(8, 3)), ValueError, "axis 0"),
    ],
)
def test_bad_input_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------- DDP


def test_distributed_data_parallel_gradients_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    store = str(tmp_path / "store")
    from _ddp_worker import ddp_worker  # a small module: the workers import only it

    context = mp.spawn(ddp_worker, args=(2, store, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 270

    def worker_logs() -> str:
        return "".join(p.read_text() for p in sorted(tmp_path.glob("worker*.log")))

    # join() returns False while some worker is still running; it raises if one failed.
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() < deadline:
                continue
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"DDP workers did not finish within 270 s:\n{worker_logs()}")
    except mp.ProcessExitedException as err:
        pytest.fail(f"{err}; the workers' output:\n{worker_logs()}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), L2Norm(8))
    x, g = torch.randn(4, 3, 5, 5), torch.randn(4, 8, 5, 5)
    (model(x) * g).sum().backward()
    for single, ddp in zip(model.parameters(), torch.load(tmp_path / "ddp.pt"), strict=True):
        torch.testing.assert_close(ddp, single.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- API as called


def test_scale_init_is_positional_as_in_ssd_pytorch():
    m = L2Norm(8, 10.0)  # ssd.pytorch: L2Norm(n_channels, scale)
    assert torch.equal(m.weight, torch.full((8,), 10.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_the_functional_takes_a_plain_number_as_the_scale(dtype):
    x = torch.randn(2, 8, 3, 3).to(dtype)
    wide = torch.float32 if dtype == torch.float16 else dtype
    assert torch.equal(l2_normalize(x, 20.0), l2_normalize(x, torch.tensor(20.0, dtype=wide)))
    assert torch.equal(l2_normalize(x, 3), l2_normalize(x, torch.tensor(3.0, dtype=wide)))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        l2_normalize(x, True)


def test_jit_trace_gives_no_tracer_warnings():
    model, x = torch.nn.Sequential(L2Norm(8)), torch.randn(2, 8, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    bound = _portable.forward_ulps("float32", 8)  # the exported formula's own bound
    assert_close_ulps(traced(x), ref_forward(x, model[0].weight, axis=1), bound)


def test_importing_the_adapter_loads_neither_dynamo_nor_the_flop_counter():
    """``import l2norm.torch`` stays cheap: Dynamo (~1.4 s) and the flop counter (~0.3 s,
    it loads Triton) are loaded only by whoever uses them; the flop formulas still
    register when the counter is imported later (tested in test_torch_transforms)."""
    code = (
        "import sys, torch, l2norm.torch\n"
        "print([m for m in ('torch._dynamo', 'torch.utils.flop_counter', 'triton')"
        " if m in sys.modules])\n"
    )
    out = _run_in_child(code)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
