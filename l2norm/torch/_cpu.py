"""The native CPU kernel: loading it, and running it on a tensor's memory as it lies.

The kernel (``_cpu_kernel.cpp``) reads each block of slices twice while it sits in the
core's cache and sums in float64 (see that file). It is built with
``torch.utils.cpp_extension`` the first time a call can use it (about a minute, once; the
result is cached by PyTorch under a name that changes with the source) and it is the
default lowering for eager CPU calls. Where it cannot be built (no C++ compiler, no
``ninja``) the layer warns once and computes with plain torch ops, never an error.
``L2NORM_CPU_KERNEL=0`` in the environment, or :func:`use_cpu_kernel`\\ ``(False)``, turns it
off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from l2norm._modes import EpsMode

__all__ = [
    "Layout",
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

_SOURCES = ("_cpu_kernel.cpp", "_cpu_kernel_loops.h")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Slices after the channel axis (in memory) below which the kernel's blocks are too short
#: to pay off; 1 (channels innermost) runs the kernel's row loops instead.
MIN_INNER = 8


@dataclass
class _State:
    module: Any = None  # the built extension, once loaded
    error: str | None = None  # why it could not be built, once tried
    enabled: bool = os.environ.get("L2NORM_CPU_KERNEL", "1") != "0"


_STATE = _State()


def use_cpu_kernel(enabled: bool = True) -> bool:
    """Turn the native CPU kernel on (the default) or off for every later call.

    Off, eager CPU calls compute with plain torch ops (slower, same guarantees).

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
    """Whether the kernel can be used here (loading or building it if needed)."""
    return load() is not None


def load() -> Any:
    """The kernel module, built on first use; None (after one warning) if it cannot be."""
    if _STATE.module is None and _STATE.error is None:
        try:
            _STATE.module = _build()
        except Exception as err:  # no compiler, no ninja, a failed build: fall back
            _STATE.error = f"{type(err).__name__}: {err}"
            warnings.warn(
                "l2norm: the native CPU kernel could not be built, so l2norm.torch computes "
                "with plain torch ops on the CPU (correct, slower). It needs a C++ compiler "
                f"and ninja (pip install ninja). Cause: {_STATE.error[:500]}",
                RuntimeWarning,
                stacklevel=4,
            )
    return _STATE.module


def require() -> Any:
    """The kernel module, or RuntimeError saying why it is not there."""
    module = load()
    if module is None:
        raise RuntimeError(f"the l2norm native CPU kernel is not available: {_STATE.error}")
    return module


def _build() -> Any:
    from torch.utils import cpp_extension  # only when a kernel is built or loaded

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(b"".join((here / n).read_bytes() for n in _SOURCES))
    name = f"l2norm_cpu_{digest.hexdigest()[:12]}"
    try:  # a private helper, used only to tell whether this is the (slow) first build
        built = any(Path(cpp_extension._get_build_directory(name, False)).glob(f"{name}*.so"))
    except Exception:
        built = False
    if not built:
        print(
            "l2norm: building the native CPU kernel (once, about a minute)...",
            file=sys.stderr,
            flush=True,
        )
    # OpenMP runs at::parallel_for's blocks on torch's intra-op threads (GCC / Linux).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return cpp_extension.load(
        name=name,
        sources=[str(here / _SOURCES[0])],
        extra_cflags=["-O3", *openmp],
        extra_ldflags=openmp,
        verbose=False,
    )


@dataclass(frozen=True)
class Layout:
    """How the kernel sees a tensor: ``t.permute(order)`` is contiguous and viewed as
    ``rows = (outer, C, inner)``; NCHW is the identity order, channels-last memory puts
    the channel last (inner = 1)."""

    order: tuple[int, ...]
    rows: tuple[int, int, int]

    def to_kernel(self, t: Tensor) -> Tensor:
        """``t`` (like the input) in the kernel's layout; a copy only if ``t``'s memory
        is laid out otherwise (a cotangent in another memory format, a broadcast)."""
        return t.permute(self.order).contiguous().view(self.rows)

    def from_kernel(self, t3: Tensor, shape: Sequence[int]) -> Tensor:
        """The kernel's output back in the input's dimension order: a view with the
        input's memory format."""
        permuted = t3.view([shape[d] for d in self.order])
        return permuted.permute([self.order.index(d) for d in range(len(shape))])


def layout(x: Tensor, norm: tuple[int, ...], channel: int) -> Layout | None:
    """The kernel's view of ``x``, or None where the kernel does not apply: not CPU, not
    float32 / float16 / bfloat16, more than one normalized axis, not dense in memory, or
    fewer than :data:`MIN_INNER` slices after the channel (except channels innermost)."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or norm != (channel,):
        return None
    strides = x.stride()
    order = tuple(sorted(range(x.dim()), key=lambda d: -strides[d]))  # stable on ties
    if not x.permute(order).is_contiguous():
        return None  # a slice of a larger tensor, expanded, ...
    at = order.index(channel)
    outer = inner = 1  # plain loops: torch.compile traces this function
    for d in order[:at]:
        outer *= int(x.shape[d])
    for d in order[at + 1 :]:
        inner *= int(x.shape[d])
    if 1 < inner < MIN_INNER:
        return None
    return Layout(order, (outer, int(x.shape[channel]), inner))


def _scale(weight: Tensor | None) -> Tensor:
    """The scale as the kernel takes it: float64, 0 (none), 1 or C entries."""
    if weight is None:
        return torch.empty(0, dtype=torch.float64)
    return weight.detach().to(torch.float64).reshape(-1).contiguous()


def forward(x: Tensor, weight: Tensor | None, view: Layout, mode: EpsMode, eps: float) -> Tensor:
    """``y = weight * x / d(n)`` by the kernel."""
    is_add, power = mode.kernel_code
    y3 = require().forward(view.to_kernel(x), _scale(weight), bool(is_add), power, eps)
    return view.from_kernel(y3, x.shape)


def backward(
    x: Tensor, weight: Tensor | None, g: Tensor, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, Tensor]:
    """``(dx, the scale's gradient per channel in float64)`` by the kernel (it sums the
    squares again: nothing is saved from the forward)."""
    is_add, power = mode.kernel_code
    dx3, per_channel = require().backward(
        view.to_kernel(x), view.to_kernel(g.to(x.dtype)), _scale(weight), bool(is_add), power, eps
    )
    return view.from_kernel(dx3, x.shape), per_channel
