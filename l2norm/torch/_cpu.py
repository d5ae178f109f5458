"""The native CPU kernel (:mod:`l2norm._native`) for torch tensors, on their memory as it lies.

The kernel reads each block of slices twice while it sits in the core's cache and sums in
float64 (see ``l2norm/_native/kernel.h``). It is compiled the first time a call can use it
(a few seconds, once; ``bash scripts/setup`` does it at install) and called through a plain
C ABI on the tensors' data pointers. It is the default lowering for CPU calls it applies
to. Where it cannot be built (no C++ compiler), the layer warns once and computes with
plain torch ops, never an error. ``L2NORM_CPU_KERNEL=0`` in the environment, or
:func:`use_cpu_kernel`\\ ``(False)``, turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from l2norm import _native
from l2norm._modes import EpsMode
from l2norm.torch._layout import KERNEL_DTYPES, Layout, dense_layout

__all__ = [
    "available",
    "backward",
    "enabled",
    "forward",
    "layout",
    "load",
    "ready",
    "require",
    "use_cpu_kernel",
]

#: Slices after the channel axis (in memory) below which the kernel's blocks are too short
#: to pay off; 1 (channels innermost) runs the kernel's row loops instead.
MIN_INNER = 8


@dataclass
class _State:
    enabled: bool = os.environ.get("L2NORM_CPU_KERNEL", "1") != "0"


_STATE = _State()


def use_cpu_kernel(enabled: bool = True) -> bool:
    """Turn the native CPU kernel on (the default) or off for every later call.

    Off, CPU calls compute with plain torch ops (slower, same guarantees).

    Returns:
        Whether the kernel will be used: ``enabled`` and it could be loaded.

    Example::

        >>> import l2norm.torch
        >>> l2norm.torch.use_cpu_kernel(False)
        False
        >>> _ = l2norm.torch.use_cpu_kernel(True)
    """
    _STATE.enabled = bool(enabled)
    return _STATE.enabled and load() is not None


def enabled() -> bool:
    return _STATE.enabled


def constant_to_compile(fn: Callable[[], bool]) -> Callable[[], bool]:
    """``torch.compiler.assume_constant_result(fn)``, without its cost: that function
    imports ``torch._dynamo`` (about 1.4 s) only to set the attribute Dynamo reads, which
    would make ``import l2norm.torch`` that much slower than ``import torch``. The effect
    is tested (``torch.compile(fullgraph=True)`` calls ``fn`` once, as a constant)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@constant_to_compile
def ready() -> bool:
    """Whether calls may use the kernel: on, and built (building it now if needed). A
    constant to ``torch.compile``, which calls it once while tracing."""
    return _STATE.enabled and load() is not None


def available() -> bool:
    """Whether the kernel can be used here (building it if needed; warns once if not)."""
    return load() is not None


def load() -> Any:
    """The kernel library, built on first use; None (after one warning) if it cannot be."""
    return _native.capi()


def require() -> Any:
    """The kernel library, or RuntimeError saying it is not there."""
    lib = load()
    if lib is None:
        raise RuntimeError(
            "the l2norm native CPU kernel is not available: it could not be built here "
            "(see the warning above; it needs a C++ compiler)"
        )
    return lib


def layout(x: Tensor, norm: tuple[int, ...], channel: int) -> Layout | None:
    """The kernel's view of ``x``, or None where the kernel does not apply: not CPU, not
    dense or not one axis (:func:`~l2norm.torch._layout.dense_layout`), or fewer than
    :data:`MIN_INNER` slices after the channel (except channels innermost)."""
    if x.device.type != "cpu":
        return None
    view = dense_layout(x, norm, channel)
    if view is None or 1 < view.rows[2] < MIN_INNER:
        return None
    return view


def _scale(weight: Tensor | None) -> Tensor:
    """The scale as the kernel takes it: float64, 0 (none), 1 or C entries."""
    if weight is None:
        return _NO_SCALE
    return weight.detach().to(torch.float64).reshape(-1).contiguous()


_NO_SCALE = torch.empty(0, dtype=torch.float64)


@functools.cache
def _entry_points() -> tuple[Any, Any]:
    """The C ABI's forward and backward with every pointer as ``c_void_p``: a plain int
    from ``data_ptr()`` then goes in without a ``ctypes.cast`` per call (a microsecond
    each, a tenth of a small call). New function objects, so the library's own stay as
    :mod:`l2norm._native` declared them."""
    lib = require()
    i64, ptr, c_int, c_double = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    fwd, bwd = lib["l2norm_forward"], lib["l2norm_backward"]
    fwd.argtypes = [c_int, ptr, ptr, i64, i64, i64, ptr, i64, c_int, c_int, c_double, c_int]
    bwd.argtypes = [
        *(c_int, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i64, c_int, c_int, c_double, c_int)
    ]
    fwd.restype = bwd.restype = c_int
    return fwd, bwd


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError("the l2norm native CPU kernel refused its arguments")


def _like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s dtype and memory layout (``x`` is dense: :func:`layout`)."""
    t = t.to(x.dtype)
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def forward(x: Tensor, weight: Tensor | None, view: Layout, mode: EpsMode, eps: float) -> Tensor:
    """``y = weight * x / d(n)`` by the kernel, on ``x``'s memory as it lies: ``x`` is
    dense in ``view``'s order, so ``empty_like`` gives ``y`` the same strides, and both
    are ``view.rows`` in memory."""
    is_add, power, mean = mode.kernel_code
    if mean:  # until the kernel reads the mean placement
        raise NotImplementedError(f"eps_mode={mode.name!r} is not in this kernel yet")
    y = torch.empty_like(x)
    w = _scale(weight)
    outer, channels, inner = view.rows
    code = _native.DTYPE_CODES[KERNEL_DTYPES[x.dtype]]
    threads = torch.get_num_threads()
    _check(
        _entry_points()[0](
            *(code, x.data_ptr(), y.data_ptr(), outer, channels, inner),
            *(w.data_ptr(), w.numel(), is_add, power, eps, threads),
        )
    )
    return y


def backward(
    x: Tensor, weight: Tensor | None, g: Tensor, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, Tensor]:
    """``(dx, the scale's gradient per channel in float64)`` by the kernel (it sums the
    squares again: nothing is saved from the forward)."""
    is_add, power, mean = mode.kernel_code
    if mean:  # until the kernel reads the mean placement
        raise NotImplementedError(f"eps_mode={mode.name!r} is not in this kernel yet")
    g = _like(g, x)
    dx = torch.empty_like(x)
    outer, channels, inner = view.rows
    per_channel = torch.empty(channels, dtype=torch.float64)
    w = _scale(weight)
    code = _native.DTYPE_CODES[KERNEL_DTYPES[x.dtype]]
    threads = torch.get_num_threads()
    _check(
        _entry_points()[1](
            *(code, x.data_ptr(), g.data_ptr(), dx.data_ptr(), per_channel.data_ptr()),
            *(outer, channels, inner, w.data_ptr(), w.numel(), is_add, power, eps, threads),
        )
    )
    return dx, per_channel
