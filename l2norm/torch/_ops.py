"""The pure-torch lowering: the ladder of :mod:`l2norm._ladder` in plain, differentiable ops.

Accumulates in float64 where the device has it: every float32 or half square is exact
there, so the ladder has one rung (the plain sum of squares) for those inputs and three
for float64 inputs; elsewhere (MPS) in float32. Where the data is as wide as the
accumulator (float64), the chosen rung's sum is taken again as a double-word pair
(:func:`l2norm._faithful.refined_pair`: squares split by their bits, cut at a power of two
above the sum, two plain sums) and each output is rounded once. The forward returns the
per-slice sums for the backward (slice-sized), and every op is differentiable without
``0 * Inf``, so the same functions serve ``torch.compile``, double backward and the
traced forms (``torch.jit.trace``, ``torch.export``, ONNX), differentiated by autograd:
those (``differentiable=True``) use plain sums, since autograd cannot go through a
float's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2norm import _faithful, _ladder
from l2norm._compensated import Pair
from l2norm.torch._dispatch import Plan

__all__ = ["accumulator", "forward", "vjp", "weight_view"]

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
    # The rungs depend on the slice's size: traced with symbolic sizes (torch.compile,
    # make_fx), int() specializes it (the channel count; for across_spatial, H and W too).
    size = int(plan.size)
    return _ladder.make_ladder(
        _NAMES[x.dtype], _NAMES[acc], size, plan.spec.eps_mode, plan.spec.eps
    )


def weight_view(weight: Tensor | None, plan: Plan, dtype: torch.dtype) -> Tensor | None:
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


_HALF_BITS = {torch.float64: (torch.int64, 26), torch.float32: (torch.int32, 11)}


def _split(v: Tensor) -> tuple[Tensor, Tensor]:
    """``v = hi + lo`` exactly, each of at most half the significand (the bits rounded at
    the middle, half away from zero): their products are exact."""
    int_type, half = _HALF_BITS[v.dtype]
    bits = v.view(int_type)
    hi = ((bits + (1 << half)) & ~((2 << half) - 1)).view(v.dtype)
    return hi, v - hi


def _pow2_floor(v: Tensor) -> Tensor:
    """The power of two at or below each positive normal entry: its exponent bits."""
    int_type, _ = _HALF_BITS[v.dtype]
    mantissa = (1 << _ladder.FORMATS[_NAMES[v.dtype]].mant) - 1
    return (v.view(int_type) & ~mantissa).view(v.dtype)


_PAIRS = _faithful.PairSums(_split, _pow2_floor)


def _pairs(x: Tensor, plan: Plan, acc: torch.dtype, differentiable: bool):
    """The double-word hooks where the data is as wide as the accumulator, unless autograd
    is to differentiate these ops (``differentiable``, or an export or trace recording
    them: an exported graph's gradient is autograd's of the recorded ops)."""
    recording = torch.compiler.is_exporting() or torch.jit.is_tracing()
    if differentiable or recording or x.dtype != acc or acc not in _HALF_BITS:
        return None
    return _PAIRS


def _sum_over(plan: Plan):
    return lambda v: v.sum(plan.norm, keepdim=True)


def _sums(xw: Tensor, plan: Plan, ladder: _ladder.Ladder) -> tuple[list, Tensor]:
    return _ladder.sums(torch, xw, ladder, _sum_over(plan), _upscale)


def _factors(
    xw: Tensor,
    plan: Plan,
    ladder: _ladder.Ladder,
    rung_sums: list,
    n_inf: Tensor,
    pairs: _faithful.PairSums | None,
    pair: Pair | None = None,
) -> tuple[_ladder.SliceFactors, Pair | None]:
    """The slice factors; with ``pairs``, from the chosen rung's sum summed again as a
    pair (:func:`l2norm._faithful.refined_pair`, a second pass over ``x``), or ``pair``
    where the forward saved it."""
    if pairs is None:
        return _ladder.slice_factors(torch, ladder, rung_sums, n_inf), None
    chosen = _ladder.choose_rung(torch, ladder, rung_sums)
    if pair is None:
        xs = _faithful.rung_values(torch, xw, chosen, ladder, _upscale)
        total = _sum_over(plan)
        pair = _faithful.refined_pair(
            torch, xs, chosen.sumsq, lambda a, b: (total(a), total(b)), pairs
        )
    f = _ladder.factors(torch, ladder, chosen._replace(sumsq=pair), rung_sums[-1], n_inf)
    return f, pair


def _pack(rung_sums: list, n_inf: Tensor, pair: Pair | None) -> Tensor:
    """The rung sums in one tensor (then the refined pair's two words, if any); an Inf
    slice's bottom sum (Inf, no information) holds minus its count of infinities
    instead, so nothing else is saved."""
    bottom = torch.where(n_inf > torch.zeros_like(n_inf), -n_inf, rung_sums[-1])
    words = [] if pair is None else [pair.hi, pair.lo]
    return torch.stack([*rung_sums[:-1], bottom, *words])


def _unpack(packed: Tensor, rungs: int) -> tuple[list, Tensor, Pair | None]:
    """:func:`_pack`'s sums back, with the pair where it holds one."""
    rows = list(packed.unbind(0))
    highs = rows[:rungs]
    pair = Pair(rows[rungs], rows[rungs + 1], _split) if len(rows) == rungs + 2 else None
    bottom = highs[-1]
    inf_slice = bottom < torch.zeros_like(bottom)
    n_inf = torch.where(inf_slice, -bottom, torch.zeros_like(bottom))
    highs[-1] = torch.where(inf_slice, torch.full_like(bottom, torch.inf), bottom)
    return highs, n_inf, pair


def forward(
    x: Tensor, weight: Tensor | None, plan: Plan, differentiable: bool = False
) -> tuple[Tensor, Tensor]:
    """``(y, saved)``: the output in ``x``'s dtype and what :func:`vjp` may reuse.
    ``differentiable``: only ops autograd can differentiate (traced and exported forms)."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw = x.to(acc)
    pairs = _pairs(x, plan, acc, differentiable)
    rung_sums, n_inf = _sums(xw, plan, ladder)
    f, pair = _factors(xw, plan, ladder, rung_sums, n_inf, pairs)
    w = weight_view(weight, plan, acc)
    if pairs is None:
        u = _ladder.normalized(torch, xw, f, ladder, _upscale)
        y = u if w is None else u * w
    else:
        fmt = _ladder.FORMATS[_NAMES[acc]]
        y = _faithful.faithful_normalized(torch, xw, w, f, ladder, _upscale, pairs, fmt)
    return y.to(x.dtype), _pack(rung_sums, n_inf, pair)


def vjp(
    x: Tensor, weight: Tensor | None, g: Tensor, plan: Plan, saved: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dweight)`` (``dweight`` None without a weight), from ``x`` alone or with the
    forward's ``saved`` sums."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw, gw = x.to(acc), g.to(acc)
    if saved is None:
        pairs = _pairs(x, plan, acc, differentiable=torch.is_grad_enabled())
        rung_sums, n_inf = _sums(xw, plan, ladder)
        f, _ = _factors(xw, plan, ladder, rung_sums, n_inf, pairs)
    else:
        rung_sums, n_inf, pair = _unpack(saved, len(ladder.shifts))
        pairs = None if pair is None else _PAIRS
        f, _ = _factors(xw, plan, ladder, rung_sums, n_inf, pairs, pair)
    xhat = _ladder.direction(torch, xw, f, ladder, _upscale)
    w = weight_view(weight, plan, acc)
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
