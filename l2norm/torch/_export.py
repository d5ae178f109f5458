"""The layer for graphs that leave torch: :func:`forward` in plain aten operations.

``torch.jit.trace``, ``torch.export`` and both ONNX exporters record the operations a
call runs; a kernel or an ``autograd.Function`` is not something a deployment runtime
can run. :func:`forward` computes the max-scaled formula of :mod:`l2norm.core.portable`
(overflow-safe in every dtype, half precision in float32) with no Python branch on
values, no read back to the host and no shape arithmetic (so ``torch.export`` keeps
batch / H / W dynamic), and autograd differentiates it (finite at all-zero slices).

Exported to ONNX it is 14 to 16 standard operators by the eps placement (``Abs``,
``ReduceMax``, ``Clip``, ``Equal``, ``Sign``, ``Div``, ``Where``, ``Mul``, ``ReduceSum``,
``Sqrt``, ``Reciprocal``, and ``Add`` or ``Greater`` + ``Where``), one ``Mul`` more for a
scale and two ``Cast`` for half precision, within :func:`l2norm.core.portable.forward_ulps`
of the reference.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from l2norm.core import portable as _portable
from l2norm.core.modes import get_mode

__all__ = ["forward"]

_HALF = (torch.float16, torch.bfloat16)


class _Namespace:
    """The array namespace of :func:`l2norm.core.portable.normalized` in torch."""

    abs = staticmethod(torch.abs)
    where = staticmethod(torch.where)
    sign = staticmethod(torch.sign)
    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def maximum(t: Tensor, floor: float) -> Tensor:
        # The upper bound spelled out: ONNX's Clip without one clamps Inf to the dtype's
        # largest finite value.
        return torch.clamp(t, min=floor, max=math.inf)


def forward(
    x: Tensor,
    weight: Tensor | None,
    *,
    norm: tuple[int, ...],
    channel: int,
    eps_mode: str,
    eps: float,
) -> Tensor:
    """``weight * x / d(||x||)`` over the axes ``norm``, in plain differentiable aten ops.

    Args:
        x: a float16, bfloat16, float32 or float64 tensor.
        weight: None, or a validated scale of one element or one per entry of ``x``'s
            ``channel`` axis (any float dtype; applied in the working precision).
        norm: the normalized axes; ``channel`` the axis the scale runs along.
        eps_mode, eps: the eps placement (:mod:`l2norm.core.modes`).

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float16)
        >>> forward(x, torch.tensor([20.0]), norm=(1,), channel=1,
        ...         eps_mode="clamp_norm", eps=1e-12)
        tensor([[12., 16.],
                [ 0.,  0.]], dtype=torch.float16)
    """
    work = torch.float32 if x.dtype in _HALF else x.dtype
    with warnings.catch_warnings():  # torch.jit.trace: sizes are tensors; this is static
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        empty = any(x.shape[a] == 0 for a in norm)
    if empty:
        return x.clone()  # no slice to reduce (amax refuses an empty axis)
    scale = None
    if weight is not None:
        # One value, or one per channel: -1 takes the channel count from the weight.
        shape = [-1 if a == channel % x.dim() else 1 for a in range(x.dim())]
        scale = _cast(weight, work).reshape(shape)
    y = _portable.normalized(
        _Namespace,
        _cast(x, work),
        scale,
        get_mode(eps_mode),
        eps,
        lambda v: v.amax(dim=norm, keepdim=True),
        lambda v: v.sum(dim=norm, keepdim=True),
        str(work).removeprefix("torch."),
        math.prod(x.shape[a] for a in norm),
    )
    return _cast(y, x.dtype)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Only where needed: the TorchScript-based ONNX exporter records even a no-op cast.
    return t if t.dtype == dtype else t.to(dtype)
