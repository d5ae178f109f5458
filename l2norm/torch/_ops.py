"""The pure-torch lowering: the hooks of the one ladder driver (:mod:`l2norm.core.driver`) in
plain, differentiable ops.

Accumulates in float64 where the device has it (every float32 or half square is exact
there), elsewhere (MPS) in float32; float64 data in a pair
(:func:`l2norm.core.faithful.refined_pair`). The forward returns the per-slice sums for the
backward, and every op is differentiable without ``0 * Inf``, so the same functions serve
``torch.compile``, double backward and the traced forms (``torch.jit.trace``,
``torch.export``, ONNX), differentiated by autograd: those (``differentiable=True``) use
plain sums, since autograd cannot go through a float's bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l2norm.core import driver as _driver
from l2norm.core import faithful as _faithful
from l2norm.core import ladder as _ladder
from l2norm.core.pairs import Pair
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


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32}

#: The pairs' split and floor from the bits, read through a same-width integer view.
_PAIRS = _driver.bit_pairs(
    _driver.Bits(
        lambda v: (v.view(_INT_OF[v.dtype]), _ladder.FORMATS[_NAMES[v.dtype]]),
        lambda bits, like: bits.view(like.dtype),
        lambda ints, like: ints.to(like.dtype),
    )
)

_split = _PAIRS.split  # the split alone (tests/test_compensated.py)


def _pairs(x: Tensor, acc: torch.dtype, differentiable: bool) -> _faithful.PairSums | None:
    """The double-word hooks where the data is as wide as the accumulator, unless autograd
    is to differentiate these ops (``differentiable``, or an export or trace recording
    them: an exported graph's gradient is autograd's of the recorded ops)."""
    recording = torch.compiler.is_exporting() or torch.jit.is_tracing()
    if differentiable or recording or x.dtype != acc or acc not in _INT_OF:
        return None
    return _PAIRS


def _hooks(
    plan: Plan, acc: torch.dtype, pairs: _faithful.PairSums | None, weight: Tensor | None
) -> _driver.Hooks:
    def total(v: Tensor) -> Tensor:
        return v.sum(plan.norm, keepdim=True)

    def scale_sum(v: Tensor) -> Tensor:
        return v.sum() if weight is None or weight.numel() == 1 else v.sum(plan.reduced)

    return _driver.Hooks(
        torch, _NAMES[acc], total, lambda a, b: (total(a), total(b)), scale_sum, _upscale, pairs
    )


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
    pair = Pair(rows[rungs], rows[rungs + 1], _PAIRS.split) if len(rows) == rungs + 2 else None
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
    hooks = _hooks(plan, acc, _pairs(x, acc, differentiable), weight)
    out = _driver.forward(
        hooks, x.to(acc), weight_view(weight, plan, acc), _ladder_of(x, plan, acc)
    )
    return out.y.to(x.dtype), _pack(out.rung_sums, out.n_inf, out.pair)


def vjp(
    x: Tensor, weight: Tensor | None, g: Tensor, plan: Plan, saved: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dweight)`` (``dweight`` None without a weight), from ``x`` alone or with the
    forward's ``saved`` sums."""
    acc = accumulator(x)
    ladder = _ladder_of(x, plan, acc)
    xw = x.to(acc)
    if saved is None:
        hooks = _hooks(plan, acc, _pairs(x, acc, torch.is_grad_enabled()), weight)
        rung_sums, n_inf = _driver.sums(hooks, xw, ladder)
        pair = None
    else:
        rung_sums, n_inf, pair = _unpack(saved, len(ladder.shifts))
        hooks = _hooks(plan, acc, None if pair is None else _PAIRS, weight)
    f, _ = _driver.factors(hooks, xw, ladder, rung_sums, n_inf, pair)
    w = weight_view(weight, plan, acc)
    dx, dw = _driver.vjp(hooks, xw, w, g.to(acc), f, ladder, _NAMES[x.dtype])
    if weight is None:
        return dx.to(x.dtype), None
    return dx.to(x.dtype), dw.reshape(weight.shape).to(weight.dtype)
