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
import os
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


@torch.compiler.assume_constant_result
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
        return torch.empty(0, dtype=torch.float64)
    return weight.detach().to("cpu", torch.float64).reshape(-1).contiguous()


def _doubles(t: Tensor) -> Any:
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_double))


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError("the l2norm native CPU kernel refused its arguments")


def forward(x: Tensor, weight: Tensor | None, view: Layout, mode: EpsMode, eps: float) -> Tensor:
    """``y = weight * x / d(n)`` by the kernel."""
    is_add, power = mode.kernel_code
    x3 = view.to_kernel(x)
    y3 = torch.empty_like(x3)
    w = _scale(weight)
    outer, channels, inner = view.rows
    _check(
        require().l2norm_forward(
            _native.DTYPE_CODES[KERNEL_DTYPES[x.dtype]],
            x3.data_ptr(),
            y3.data_ptr(),
            outer,
            channels,
            inner,
            _doubles(w),
            w.numel(),
            is_add,
            power,
            eps,
            torch.get_num_threads(),
        )
    )
    return view.from_kernel(y3, x.shape)


def backward(
    x: Tensor, weight: Tensor | None, g: Tensor, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, Tensor]:
    """``(dx, the scale's gradient per channel in float64)`` by the kernel (it sums the
    squares again: nothing is saved from the forward)."""
    is_add, power = mode.kernel_code
    x3, g3 = view.to_kernel(x), view.to_kernel(g.to(x.dtype))
    dx3 = torch.empty_like(x3)
    outer, channels, inner = view.rows
    per_channel = torch.empty(channels, dtype=torch.float64)
    w = _scale(weight)
    _check(
        require().l2norm_backward(
            _native.DTYPE_CODES[KERNEL_DTYPES[x.dtype]],
            x3.data_ptr(),
            g3.data_ptr(),
            dx3.data_ptr(),
            _doubles(per_channel),
            outer,
            channels,
            inner,
            _doubles(w),
            w.numel(),
            is_add,
            power,
            eps,
            torch.get_num_threads(),
        )
    )
    return view.from_kernel(dx3, x.shape), per_channel
