"""The pure-torch lowering: the ladder of :mod:`l2norm._ladder` in plain, differentiable ops.

Accumulates in float64 where the device has it: every float32 or half square is exact
there, so the ladder has one rung (the plain sum of squares) for those inputs and three
for float64 inputs; elsewhere (MPS) in float32. The forward returns the per-slice rung
sums for the backward (slice-sized), and every op is differentiable without ``0 * Inf``,
so the same functions serve ``torch.compile`` (which fuses them), double backward and the
traced forms (``torch.jit.trace``, ``torch.export``, ONNX), differentiated by autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2norm import _ladder
from l2norm.torch._dispatch import Plan

__all__ = ["forward", "vjp"]

_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def accumulator(x: Tensor) -> torch.dtype:
    """float64 where the device computes in it, else float32."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _ladder_of(x: Tensor, plan: Plan, acc: torch.dtype) -> _ladder.Ladder:
    return _ladder.make_ladder(
        _NAMES[x.dtype], _NAMES[acc], plan.size, plan.spec.eps_mode, plan.spec.eps
    )


def _weight_view(weight: Tensor | None, plan: Plan, dtype: torch.dtype) -> Tensor | None:
    """The scale in ``dtype``, shaped to broadcast along the channel axis."""
    if weight is None:
        return None
    shape = [1] * plan.ndim
    if weight.numel() != 1:
        shape[plan.channel] = weight.numel()
    return weight.to(dtype).reshape(shape)


def _upscale(x: Tensor, shift: int) -> Tensor:
    # A tensor constant, not a Python number: see _ladder.slice_factors on the tracer.
    return x * torch.full((), 2.0**shift, dtype=x.dtype, device=x.device)


def _sums(xw: Tensor, plan: Plan, ladder: _ladder.Ladder) -> tuple[list[Tensor], Tensor]:
    return _ladder.sums(torch, xw, ladder, lambda v: v.sum(plan.norm, keepdim=True), _upscale)


def _pack(rung_sums: list[Tensor], n_inf: Tensor) -> Tensor:
    """The rung sums in one tensor; an Inf slice's bottom sum (Inf, no information) holds
    minus its count of infinities instead, so nothing else is saved."""
    bottom = torch.where(n_inf > torch.zeros_like(n_inf), -n_inf, rung_sums[-1])
    return torch.stack([*rung_sums[:-1], bottom])


def _unpack(packed: Tensor) -> tuple[list[Tensor], Tensor]:
    bottom = packed[-1]
    inf_slice = bottom < torch.zeros_like(bottom)
    n_inf = torch.where(inf_slice, -bottom, torch.zeros_like(bottom))
    bottom = torch.where(inf_slice, torch.full_like(bottom, torch.inf), bottom)
    return [*packed[:-1].unbind(0), bottom], n_inf


def forward(x: Tensor, weight: Tensor | None, plan: Plan) -> tuple[Tensor, Tensor]:
    """``(y, saved)``: the output in ``x``'s dtype and what :func:`vjp` may reuse."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw = x.to(acc)
    rung_sums, n_inf = _sums(xw, plan, ladder)
    f = _ladder.slice_factors(torch, ladder, rung_sums, n_inf)
    u = _ladder.normalized(torch, xw, f, ladder, _upscale)
    w = _weight_view(weight, plan, acc)
    y = u if w is None else u * w
    return y.to(x.dtype), _pack(rung_sums, n_inf)


def vjp(
    x: Tensor, weight: Tensor | None, g: Tensor, plan: Plan, saved: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dweight)`` (``dweight`` None without a weight), from ``x`` alone or with the
    forward's ``saved`` sums."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw, gw = x.to(acc), g.to(acc)
    rung_sums, n_inf = _sums(xw, plan, ladder) if saved is None else _unpack(saved)
    f = _ladder.slice_factors(torch, ladder, rung_sums, n_inf)
    xhat = _ladder.direction(torch, xw, f, ladder, _upscale)
    w = _weight_view(weight, plan, acc)
    sigma = gw if w is None else gw * w
    inner = (sigma * xhat).sum(plan.norm, keepdim=True)
    # Saturated where the exact gradient exceeds the dtype (float16 at an all-zero pixel).
    top = torch.finfo(x.dtype).max
    dx = _ladder.input_grad(sigma, xhat, inner, f).clamp(-top, top).to(x.dtype)
    if weight is None:
        return dx, None
    gu = gw * xhat * f.ratio
    total = gu.sum() if weight.numel() == 1 else gu.sum(plan.reduced)
    return dx, total.reshape(weight.shape).to(weight.dtype)
