"""How the kernels (the native CPU one, the Triton one) see a tensor: ``(outer, C, inner)``.

Both read the memory of a dense tensor as it lies, normalized over one axis: NCHW
(``inner`` = the pixels after the channel) or channels innermost in memory
(``channels_last``, NHWC with ``dim=-1``, ``(N, C)``: ``inner == 1``, one row per slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KERNEL_DTYPES", "Layout", "dense_layout", "memory_order"]

#: The dtypes the kernels take (float64 goes to the ops lowering: no wider sums there).
KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Layout:
    """``t.permute(order)`` is contiguous and viewed as ``rows = (outer, C, inner)``; NCHW
    is the identity order, channels-last memory puts the channel last (``inner == 1``)."""

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


def memory_order(x: Tensor) -> tuple[int, ...]:
    """``x``'s dimensions from the outermost in memory to the innermost (ties keep their
    order): an insertion sort by stride in pairwise comparisons, which ``torch.compile``
    traces on symbolic strides as guards (it cannot trace ``sorted`` with a key).

    Example:
        >>> memory_order(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last))
        (0, 2, 3, 1)
    """
    strides = x.stride()
    order: list[int] = []
    for d in range(x.dim()):
        at = len(order)
        while at > 0 and strides[order[at - 1]] < strides[d]:
            at -= 1
        order.insert(at, d)
    return tuple(order)


def dense_layout(x: Tensor, norm: tuple[int, ...], channel: int) -> Layout | None:
    """The kernels' view of ``x``, or None where they do not apply: not float32 / float16 /
    bfloat16, more than one normalized axis, or not dense in memory. The sizes stay
    symbolic under ``torch.compile`` (no ``int()``: that would specialize them)."""
    if x.dtype not in KERNEL_DTYPES or norm != (channel,):
        return None
    order = memory_order(x)
    if not x.permute(order).is_contiguous():
        return None  # a slice of a larger tensor, expanded, ...
    at = order.index(channel)
    outer = inner = 1  # plain loops: torch.compile traces this function
    for d in order[:at]:
        outer = outer * x.shape[d]
    for d in order[at + 1 :]:
        inner = inner * x.shape[d]
    return Layout(order, (outer, x.shape[channel], inner))
