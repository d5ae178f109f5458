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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from l2norm import _native
from l2norm.core.modes import EpsMode
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


def _call(
    x: Tensor, weight: Tensor | None, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, int, Any]:
    """What both directions pass the kernel: the scale as it takes it (float64, 0, 1 or C
    entries), the dtype code, and a pointer to the call's :class:`~l2norm._native.Params`."""
    w = _NO_SCALE if weight is None else weight.detach().to(torch.float64).reshape(-1)
    kind = _native.scale_kind(None if weight is None else w.numel(), view.rows[1])
    params = _native.params(view.rows, kind, mode, eps, torch.get_num_threads())
    code = _native.DTYPE_CODES[KERNEL_DTYPES[x.dtype]]
    return w.contiguous(), code, ctypes.byref(params)


_NO_SCALE = torch.empty(0, dtype=torch.float64)


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
    w, code, params = _call(x, weight, view, mode, eps)
    y = torch.empty_like(x)
    _check(require().l2norm_forward(code, params, x.data_ptr(), w.data_ptr(), y.data_ptr()))
    return y


def backward(
    x: Tensor, weight: Tensor | None, g: Tensor, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, Tensor]:
    """``(dx, the scale's gradient per channel in float64)`` by the kernel (it sums the
    squares again: nothing is saved from the forward)."""
    w, code, params = _call(x, weight, view, mode, eps)
    g = _like(g, x)
    dx = torch.empty_like(x)
    per_channel = torch.empty(view.rows[1], dtype=torch.float64)
    pointers = (x.data_ptr(), g.data_ptr(), w.data_ptr(), dx.data_ptr(), per_channel.data_ptr())
    _check(require().l2norm_backward(code, params, *pointers))
    return dx, per_channel
