"""The native kernel's parameters as one struct (kernel.h's ``Params``) end to end: its
ctypes mirror, the ABI version written once, the C ABI refusing what it does not take,
the XLA attributes read by name; and the mean placement (``add_meansq``) on the kernel,
through torch and JAX, against the reference."""

from __future__ import annotations

import ctypes
import importlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from l2norm import _native, conformance, reference
from l2norm.core.modes import get_mode
from l2norm.core.spec import Spec

NATIVE = Path(_native.__file__).parent
KERNEL_H = (NATIVE / "kernel.h").read_text()


def _struct_fields(name: str) -> list[str]:
    """The member names of ``struct name { ... }`` in kernel.h, in order."""
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", KERNEL_H, re.DOTALL)
    assert body is not None, name
    names: list[str] = []
    for line in body.group(1).splitlines():
        declaration = line.split("//")[0].strip().rstrip(";")
        if declaration:
            names += [part.strip().split()[-1] for part in declaration.split(",")]
    return names


def _lib() -> ctypes.CDLL:
    lib = _native.capi()
    assert lib is not None, "the native kernel must build here"
    return lib


def test_the_ctypes_mirror_is_the_struct_of_kernel_h():
    assert [name for name, _ in _native.Shape._fields_] == _struct_fields("Shape")
    assert [name for name, _ in _native.Params._fields_] == _struct_fields("Params")
    assert _lib().l2norm_params_size() == ctypes.sizeof(_native.Params)


def test_the_abi_version_is_written_once():
    build = importlib.import_module("l2norm._native.build")
    sources = [p.read_text() for p in NATIVE.iterdir() if p.suffix in (".h", ".cpp", ".py")]
    assert sum(len(re.findall(r"kAbiVersion = \d+", text)) for text in sources) == 1
    assert _native.ABI_VERSION == build.abi_version() == _lib().l2norm_abi_version()


def _forward(params: _native.Params, x: np.ndarray, dtype_code: int = 0) -> tuple[int, Any]:
    y = np.empty_like(x)
    w = np.ones(max(params.shape.C, 1))
    status = _lib().l2norm_forward(
        dtype_code, ctypes.byref(params), x.ctypes.data, w.ctypes.data, y.ctypes.data
    )
    return status, y


def test_the_c_abi_takes_the_struct_and_refuses_what_the_kernel_does_not_take():
    x = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
    mode = get_mode("add_meansq")
    good = _native.params(x.shape, _native.ScaleKind.NONE, mode, 1e-6, 1)
    status, y = _forward(good, x)
    assert status == 0
    spec = Spec.create(axis=1, eps_mode="add_meansq", eps=1e-6)
    want = reference.forward(x, None, spec)
    assert conformance.forward_error(y, want, np.dtype(np.float32), False) <= 1
    for field, value in (("power", 1), ("mean", 2), ("scale", 3), ("is_add", 2), ("threads", 0)):
        bad = _native.Params.from_buffer_copy(good)
        setattr(bad, field, value)
        assert _forward(bad, x)[0] == -1, field
    assert _forward(good, x, dtype_code=7)[0] == -1
    assert _lib().l2norm_forward(0, None, x.ctypes.data, None, x.ctypes.data) == -1


def test_the_xla_handlers_read_every_attribute_by_its_field_name():
    attributes = _native.xla_attributes(
        _native.params((0, 3, 4), _native.ScaleKind.SHARED, get_mode("clamp_norm"), 1e-12, 2)
    )
    fields = _struct_fields("Shape")[1:] + _struct_fields("Params")[1:]
    assert list(attributes) == fields
    source = (NATIVE / "xla_ffi.cpp").read_text()
    assert all(f'read("{name}"' in source for name in attributes)
    assert {k: v.item() for k, v in attributes.items()} == {
        "C": 3,
        "inner": 4,
        "eps": 1e-12,
        "scale": 1,
        "is_add": 0,
        "power": 1,
        "mean": 0,
        "threads": 2,
    }


def test_a_scale_kind_from_the_number_of_entries():
    assert _native.scale_kind(None, 5) == _native.ScaleKind.NONE
    assert _native.scale_kind(1, 5) == _native.ScaleKind.SHARED
    assert _native.scale_kind(5, 5) == _native.ScaleKind.PER_CHANNEL
    with pytest.raises(ValueError, match="3 entries over 5 channels"):
        _native.scale_kind(3, 5)


# --------------------------------------------------------------------------- the mean


def _mean_inputs(dtype: np.dtype, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices over 12 channels: random, zero, tiny (eps dominates), huge, 3 infinities
    (both signs, finite neighbours), a single infinity; a scale and a cotangent."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((6, 12, 9)).astype(np.float64)
    x[1, :, 0] = 0.0
    x[2, :, 1] *= 1e-6
    x[3, :, 2] *= 1e3 if dtype == np.float16 else 1e30  # squares overflow the dtype
    x[4, [0, 5, 11], 3] = [np.inf, -np.inf, np.inf]
    x[5, 7, 4] = -np.inf
    scale = (rng.random(12) + 0.5).astype(dtype)
    g = rng.standard_normal(x.shape)
    x, g = x.astype(dtype), g.astype(dtype)
    if axis == -1:  # channels last: the kernel's row loops
        x, g = np.moveaxis(x, 1, -1).copy(), np.moveaxis(g, 1, -1).copy()
    return x, scale, g


def _check_against_reference(dx, ds, y, x, scale, g, spec, npdt):
    want = reference.forward(x, scale, spec)
    assert conformance.forward_error(y, want, npdt, False) <= 1
    assert conformance.nonfinite_mismatches(y.astype(np.float64), want.astype(np.float64)) == 0
    dx_ref, ds_ref = reference.vjp(x, scale, g, spec)
    dx_mag, ds_mag = conformance.gradient_magnitudes(x, scale, g, spec)
    rounded = [r.astype(npdt).astype(np.float64) for r in (dx_ref, ds_ref)]
    error = conformance.gradient_error(dx, rounded[0], dx_mag, ds, rounded[1], ds_mag, npdt, False)
    assert error <= 2, f"gradient {error} eps"
    infinite = np.isinf(x.astype(np.float64))
    slices = np.any(infinite, axis=spec.axis, keepdims=True)
    assert np.all(dx[np.broadcast_to(slices, x.shape)] == 0)  # the Inf limit is flat


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_mean_placement_on_the_torch_kernel(dtype, axis):
    import torch

    from l2norm.torch import l2_normalize, lowering_for

    npdt = conformance.numpy_dtype(dtype)
    x, scale, g = _mean_inputs(npdt, axis)
    as_torch = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).to(as_torch[dtype])

    xt, wt = tensor(x).requires_grad_(True), tensor(scale).requires_grad_(True)
    options = {"eps_mode": "add_meansq", "eps": 1e-6}
    assert lowering_for(xt, dim=axis, **options) == "cpu-kernel"
    y = l2_normalize(xt, wt, dim=axis, **options)
    dx, ds = torch.autograd.grad(y, (xt, wt), tensor(g))

    def back(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy().astype(npdt)

    spec = Spec.create(axis=axis, **options)
    _check_against_reference(
        back(dx).astype(np.float64), ds.double().numpy(), back(y), x, scale, g, spec, npdt
    )


@pytest.mark.parametrize("axis", [1, -1])
def test_the_mean_placement_on_the_jax_kernel(axis):
    import jax
    import jax.numpy as jnp

    from l2norm.jax import l2_normalize, use_lowering

    x, scale, g = _mean_inputs(np.float32, axis)
    options = {"axis": axis, "eps_mode": "add_meansq", "eps": 1e-6}
    with use_lowering("cpu-kernel"):
        y, vjp = jax.vjp(lambda a, s: l2_normalize(a, s, **options), jnp.asarray(x), scale)
        dx, ds = vjp(jnp.asarray(g))
    dx, ds, y = np.asarray(dx, np.float64), np.asarray(ds, np.float64), np.asarray(y)
    spec = Spec.create(**options)
    _check_against_reference(dx, ds, y, x, scale, g, spec, np.dtype(np.float32))
