"""The pure-torch lowering: the ladder of :mod:`l2norm._ladder` in plain, differentiable ops.

Accumulates in float64 where the device has it: every float32 or half square is exact
there, so the ladder has one rung (the plain sum of squares) for those inputs and three
for float64 inputs; elsewhere (MPS) in float32. Where the data is as wide as the
accumulator (float64), the sums are double-word pairs (:class:`l2norm._ladder.PairSums`:
squares split by their bits, a pairwise tree of error-free additions) and each output is
rounded once. The forward returns the per-slice rung sums for the backward (slice-sized),
and every op is differentiable without ``0 * Inf``, so the same functions serve
``torch.compile``, double backward and the traced forms (``torch.jit.trace``,
``torch.export``, ONNX), differentiated by autograd: those (``differentiable=True``) use
plain sums, since autograd cannot go through a float's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2norm import _ladder
from l2norm._compensated import Pair, two_sum
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


_HALF_BITS = {torch.float64: (torch.int64, 26), torch.float32: (torch.int32, 11)}


def _split(v: Tensor) -> tuple[Tensor, Tensor]:
    """``v = hi + lo`` exactly, each of at most half the significand (the bits rounded at
    the middle, half away from zero): their products are exact."""
    int_type, half = _HALF_BITS[v.dtype]
    bits = v.view(int_type)
    hi = ((bits + (1 << half)) & ~((2 << half) - 1)).view(v.dtype)
    return hi, v - hi


def _pair_reduce(plan: Plan):
    """Sums of pairs over the normalized axes (kept): a pairwise tree of error-free
    additions (torch has no reduction with a custom combiner), the same tree for every
    slice whatever the batch."""
    norm = plan.norm

    def reduce(hi: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
        kept = [d for d in range(hi.dim()) if d not in norm]
        order = kept + list(norm)
        lead = [hi.shape[d] for d in kept]
        h = hi.permute(order).reshape(*lead, -1)
        low = lo.permute(order).reshape(*lead, -1)
        width = 1 << max(0, (h.shape[-1] - 1).bit_length())
        pad = width - h.shape[-1]
        if pad:
            h = torch.nn.functional.pad(h, (0, pad))
            low = torch.nn.functional.pad(low, (0, pad))
        while h.shape[-1] > 1:
            half = h.shape[-1] // 2
            h, err = two_sum(h[..., :half], h[..., half:])
            low = (low[..., :half] + low[..., half:]) + err
        shape = [1 if d in norm else hi.shape[d] for d in range(hi.dim())]
        return h.reshape(shape), low.reshape(shape)

    return reduce


def _pairs(x: Tensor, plan: Plan, acc: torch.dtype, differentiable: bool):
    """The double-word hooks where the data is as wide as the accumulator, unless autograd
    is to differentiate these ops (``differentiable``, or an export or trace recording
    them: an exported graph's gradient is autograd's of the recorded ops)."""
    recording = torch.compiler.is_exporting() or torch.jit.is_tracing()
    if differentiable or recording or x.dtype != acc or acc not in _HALF_BITS:
        return None
    return _ladder.PairSums(_split, _pair_reduce(plan))


def _sums(
    xw: Tensor, plan: Plan, ladder: _ladder.Ladder, pairs: _ladder.PairSums | None = None
) -> tuple[list, Tensor]:
    return _ladder.sums(
        torch, xw, ladder, lambda v: v.sum(plan.norm, keepdim=True), _upscale, pairs
    )


def _pack(rung_sums: list, n_inf: Tensor) -> Tensor:
    """The rung sums in one tensor (pairs: their high words, then their low words); an
    Inf slice's bottom sum (Inf, no information) holds minus its count of infinities
    instead, so nothing else is saved."""
    pairs = isinstance(rung_sums[-1], Pair)
    highs = [p.hi for p in rung_sums] if pairs else rung_sums
    bottom = torch.where(n_inf > torch.zeros_like(n_inf), -n_inf, highs[-1])
    lows = [p.lo for p in rung_sums] if pairs else []
    return torch.stack([*highs[:-1], bottom, *lows])


def _unpack(packed: Tensor, rungs: int) -> tuple[list, Tensor]:
    """:func:`_pack`'s sums back: pairs where it holds two rows per rung."""
    rows = list(packed.unbind(0))
    pairs = len(rows) == 2 * rungs
    highs, lows = (rows[:rungs], rows[rungs:]) if pairs else (rows, [])
    bottom = highs[-1]
    inf_slice = bottom < torch.zeros_like(bottom)
    n_inf = torch.where(inf_slice, -bottom, torch.zeros_like(bottom))
    highs[-1] = torch.where(inf_slice, torch.full_like(bottom, torch.inf), bottom)
    if not pairs:
        return highs, n_inf
    return [Pair(h, lo, _split) for h, lo in zip(highs, lows, strict=True)], n_inf


def forward(
    x: Tensor, weight: Tensor | None, plan: Plan, differentiable: bool = False
) -> tuple[Tensor, Tensor]:
    """``(y, saved)``: the output in ``x``'s dtype and what :func:`vjp` may reuse.
    ``differentiable``: only ops autograd can differentiate (traced and exported forms)."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw = x.to(acc)
    pairs = _pairs(x, plan, acc, differentiable)
    rung_sums, n_inf = _sums(xw, plan, ladder, pairs)
    f = _ladder.slice_factors(torch, ladder, rung_sums, n_inf)
    w = _weight_view(weight, plan, acc)
    if pairs is None:
        u = _ladder.normalized(torch, xw, f, ladder, _upscale)
        y = u if w is None else u * w
    else:
        fmt = _ladder.FORMATS[_NAMES[acc]]
        y = _ladder.faithful_normalized(torch, xw, w, f, ladder, _upscale, pairs.split, fmt)
    return y.to(x.dtype), _pack(rung_sums, n_inf)


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
        rung_sums, n_inf = _sums(xw, plan, ladder, pairs)
    else:
        rung_sums, n_inf = _unpack(saved, len(ladder.shifts))
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
