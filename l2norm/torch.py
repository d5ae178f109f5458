r"""PyTorch adapter: :class:`L2Norm` and :func:`l2_normalize`.

The maths, the options and the rules for NaN, Inf, zeros and extreme magnitudes are those
of :mod:`l2norm.reference`; this module only decides how to compute them fast in torch.

Three implementations of the same formulas live here:

* the *eager* path (``_fast_forward`` / ``_fast_vjp``) computes the sum of squares in the
  working precision (float32 for float16/bfloat16/float32 input, float64 for float64)
  without any pre-scaling, then checks each slice's sum of squares: the few slices where
  it overflowed, underflowed or met a NaN/Inf are recomputed with the safe path, gathered
  and scattered back. Ordinary activations therefore pay one reduction and two
  elementwise passes, and the guarantees cost a handful of ops on slice-sized tensors.
* the *compiled* path (``_fused_forward`` / ``_fused_vjp``), under ``torch.compile``:
  the same formulas as the eager path as a few fused kernels, and a ``torch.cond`` to the
  safe path for a batch that holds a special slice;
* the *safe* path (``_safe_forward`` / ``_safe_vjp``) is branch-free: every slice is
  divided by the power of two just below its largest magnitude (as the reference does),
  so it traces cleanly under ``torch.compile(fullgraph=True)``, ``torch.export``,
  ``torch.jit.script`` / ``trace`` and ONNX export, and it is written in differentiable
  ops so that double backward works.

The gradient is hand-derived (see :mod:`l2norm.reference`'s docstring, which states the
formula; it is not re-derived here): with ``xhat = x / n``, ``sigma = s g`` and
``r = n d'(n) / d(n)``, ``dx = (sigma - r xhat <sigma, xhat>) / d`` and
``ds_c = sum_{all but c} g x / d``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from l2norm import conformance
from l2norm._spec import Axes, Spec, check_scale_shape, scale_init_values

__all__ = ["L2Norm", "l2_normalize", "use_cpu_kernel"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Plan:
    """Everything one call needs that depends only on the spec, the rank and the shape.

    Built in Python once per (spec, shape); the kernels below read plain ints and floats.
    """

    norm: tuple[int, ...]  # normalized axes, sorted
    channel: int
    ndim: int
    k: int  # elements per slice
    mode: str
    eps: float
    thr: float  # spec.threshold: eps (``*_norm``) or sqrt(eps) (``*_sumsq``)

    @property
    def reduced(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a != self.channel)

    @property
    def rest(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.norm)


def _plan(spec: Spec, axes: Axes, shape: Sequence[int]) -> _Plan:
    k = 1
    for a in axes.norm:
        k *= int(shape[a])
    return _Plan(axes.norm, axes.channel, axes.ndim, k, spec.eps_mode, spec.eps, spec.threshold)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- safe path
# Written in the TorchScript subset (no finfo, no frexp, no comprehension over tuples) because
# the scripted module (``L2Norm.__prepare_scriptable__``) runs these functions too.


def _minexp(x: Tensor) -> int:
    return -1022 if x.dtype == torch.float64 else -126


def _maxexp(x: Tensor) -> int:
    return 1024 if x.dtype == torch.float64 else 128


def _weight_view(weight: Tensor | None, ndim: int, channel: int, ref: Tensor) -> Tensor | None:
    """The scale in ``ref``'s dtype, reshaped to broadcast along the channel axis."""
    if weight is None:
        return None
    w = weight.to(ref.dtype)
    shape = [1] * ndim
    if w.numel() != 1:
        shape[channel] = w.numel()
    return w.reshape(shape)


def _safe_parts(
    x: Tensor,
    norm: list[int],
    mode: str,
    tm: float,
    te: int,
    wide: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-slice quantities in units of each slice's power of two (cf. reference._parts).

    Returns ``(xs, ns, ds, ts, p, inf_slice)``: the scaled slice (Inf slices replaced by
    the signs of their infinite entries), its norm, the denominator ``d(n) / p``, the
    threshold ``thr / p``, the power of two ``p`` and the Inf-slice mask.
    """
    # wide: float64 squares of float32-range values can neither overflow nor underflow, so
    # no pre-scaling is needed (p = 1); used under torch.compile, where the conversion is
    # fused into the reduction and costs no memory traffic.
    wide = wide and x.dtype != torch.float64
    xw = x.to(torch.float64) if x.dtype == torch.float64 or wide else x.to(torch.float32)
    is_inf = torch.isinf(xw)
    has_nan = torch.isnan(xw).sum(norm, keepdim=True) > 0
    inf_slice = (is_inf.sum(norm, keepdim=True) > 0) & ~has_nan
    xw = torch.where(inf_slice, torch.where(is_inf, torch.sign(xw), torch.zeros_like(xw)), xw)
    # p = 2**e just below the slice's largest magnitude keeps the squares from overflowing
    # or underflowing. e is bounded below so that thr / p stays finite for a zero or tiny
    # slice (thr = tm * 2**te < 2**te), and above so that p itself stays finite.
    e_lo = float(max(_minexp(xw) + 3, te - _maxexp(xw) + 3))
    e_hi = float(_maxexp(xw) - 1)
    if wide:
        e = torch.zeros_like(xw.sum(norm, keepdim=True))
    else:
        # Detached: e is piecewise constant, and autodiff through floor(log2(0)) of an
        # all-zero slice would give 0 * Inf = NaN (traced, scripted and exported modules
        # differentiate this function).
        amax = xw.detach().abs().amax(norm, keepdim=True)
        e = torch.floor(torch.log2(amax)).clamp(min=e_lo, max=e_hi)
        e = torch.where(torch.isnan(e), torch.zeros_like(e), e)
    p = torch.pow(2.0, e)
    xs = xw / p
    n2 = (xs * xs).sum(norm, keepdim=True)
    positive = n2 > 0
    # sqrt has an infinite derivative at 0: the double where keeps double backward finite.
    ns = torch.where(positive, torch.sqrt(torch.where(positive, n2, torch.ones_like(n2))), n2)
    ts = torch.pow(2.0, e.neg() + te) * tm  # thr / p without forming an over/underflowing thr
    if mode == "add_sumsq":
        big = torch.maximum(ns, ts)
        q = torch.minimum(ns, ts) / big
        ds = big * torch.sqrt(q * q + 1.0)
    elif mode == "add_norm":
        ds = ns + ts
    else:
        ds = torch.maximum(ns, ts)
    return xs, ns, ds, ts, p, inf_slice


def _safe_forward(
    x: Tensor,
    weight: Tensor | None,
    norm: list[int],
    channel: int,
    mode: str,
    tm: float,
    te: int,
    wide: bool = False,
) -> Tensor:
    """Branch-free, differentiable forward (see the module docstring)."""
    xs, ns, ds, _, _, inf_slice = _safe_parts(x, norm, mode, tm, te, wide)
    # In an Inf slice xs holds the signs of the infinite entries and the limit is xs / ns.
    u = xs / torch.where(inf_slice, ns, ds)
    w = _weight_view(weight, x.dim(), channel, u)
    y = u if w is None else u * w
    return y.to(x.dtype)


def _safe_vjp(
    x: Tensor,
    weight: Tensor | None,
    g: Tensor,
    norm: list[int],
    channel: int,
    mode: str,
    tm: float,
    te: int,
    wide: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Branch-free, differentiable VJP: the formula of reference.py's docstring."""
    xs, ns, ds, ts, p, inf_slice = _safe_parts(x, norm, mode, tm, te, wide)
    positive = ns > 0
    xhat = torch.where(positive, xs / torch.where(positive, ns, torch.ones_like(ns)), xs * 0)
    if mode == "add_sumsq":
        r = (ns / ds) ** 2
    elif mode == "add_norm":
        r = ns / ds
    else:
        r = (ns >= ts).to(xs.dtype)
    gw = g.to(xs.dtype)
    w = _weight_view(weight, x.dim(), channel, xs)
    sigma = gw if w is None else gw * w
    inner = (sigma * xhat).sum(norm, keepdim=True)
    dx = (sigma - r * xhat * inner) / ds / p
    dx = torch.where(inf_slice, torch.zeros_like(dx), dx)
    dw: Tensor | None = None
    if weight is not None:
        gu = gw * (xs / torch.where(inf_slice, ns, ds))
        if weight.numel() == 1:
            total = gu.sum()
        else:
            total = gu.sum([a for a in range(x.dim()) if a != channel])
        dw = total.reshape(weight.shape).to(weight.dtype)
    return dx.to(x.dtype), dw


def _split(thr: float) -> tuple[float, int]:
    """``thr`` as ``(tm, te)`` with ``thr = tm * 2**te`` (TorchScript has no frexp)."""
    return math.frexp(thr)


def _safe_forward_plan(x: Tensor, weight: Tensor | None, plan: _Plan, wide: bool = False) -> Tensor:
    tm, te = _split(plan.thr)
    return _safe_forward(x, weight, list(plan.norm), plan.channel, plan.mode, tm, te, wide)


def _safe_vjp_plan(
    x: Tensor, weight: Tensor | None, g: Tensor, plan: _Plan, wide: bool = False
) -> tuple[Tensor, Tensor | None]:
    tm, te = _split(plan.thr)
    return _safe_vjp(x, weight, g, list(plan.norm), plan.channel, plan.mode, tm, te, wide)


# --------------------------------------------------------------------------- slice factors
# The per-slice quantities of the unscaled formula, shared by the eager and compiled paths.


def _trusted_sums(plan: _Plan, dtype: torch.dtype) -> tuple[float, float]:
    """``(lo, hi)``: a plain sum of squares in ``[lo, hi]`` can be used as it is.

    Above ``hi`` it overflowed (NaN and Inf fail both comparisons); below ``lo``
    subnormal squares (absolute error <= 2**-150 each in float32) could matter.
    """
    finfo = torch.finfo(dtype)
    return 4.0 * plan.k * float(finfo.tiny), float(finfo.max)


def _ordinary_stats(n2: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """``(inv_d, n)`` per slice from a trusted sum of squares (:func:`_trusted_sums`):
    the same few slice-sized ops as the guarantee-free formula. ``n`` is None in
    add_sumsq mode; :func:`_ordinary_c` takes both when the backward needs ``c``."""
    if plan.mode == "add_sumsq":
        return (n2 + plan.eps).rsqrt_(), None
    n = n2.sqrt()
    if plan.mode == "add_norm":
        return (n + plan.eps).reciprocal_(), n
    return n.clamp_min(plan.thr).reciprocal_(), n


def _ordinary_c(inv_d: Tensor, n: Tensor | None, plan: _Plan) -> Tensor:
    """``c = r d / n**2`` from :func:`_ordinary_stats`' results, chosen so that
    ``dx = (sigma - c <sigma, x / d> x) / d``: ``1 / d`` (add_sumsq), ``1 / n`` (add_norm
    and the clamp modes above the threshold), 0 below a clamp threshold or at ``n = 0``."""
    if plan.mode == "add_sumsq":
        return inv_d
    if plan.mode == "add_norm":
        return torch.where(n > 0, n.reciprocal(), torch.zeros_like(n))
    return torch.where(n >= plan.thr, inv_d, torch.zeros_like(inv_d))


# --------------------------------------------------------------------------- compiled path


def _realized(t: Tensor) -> Tensor:
    """``t`` unchanged, as a buffer Inductor computes once instead of inlining it.

    Inductor inlines pointwise producers into their consumers, so slice-level arithmetic
    (log2, exp2, sqrt, division) would be redone for every element of the full-size
    pass. A max over a broadcast axis longer than Inductor's unrolling threshold (8) is a
    reduction, whose result is always a buffer; it costs nine reads of a slice-sized
    tensor.
    """
    return t.unsqueeze(0).expand((9, *t.shape)).amax(0)


def _zero_sum_is_exact(plan: _Plan, dtype: torch.dtype) -> bool:
    """Whether a slice whose sum of squares is 0 in ``dtype`` may be taken for all-zero.

    Every square of such a slice underflowed, so its norm is below
    ``sqrt(k * smallest subnormal)``: harmless when that vanishes next to ``d(0)``
    (always for the default eps), wrong for an eps below it (``eps=1e-30`` and entries
    near ``1e-24`` in float32).
    """
    finfo = torch.finfo(dtype)
    hidden_sq = plan.k * float(finfo.tiny) * float(finfo.eps)  # k * smallest subnormal
    negligible = float(finfo.eps) / 8
    if plan.mode == "add_sumsq":
        return hidden_sq <= plan.eps * negligible
    if plan.mode == "add_norm":
        return math.sqrt(hidden_sq) <= plan.eps * negligible
    return math.sqrt(hidden_sq) < plan.thr  # then d = thr exactly


def _ordinary_slices(a: Tensor, plan: _Plan) -> Tensor:
    """Per slice, whether the plain sum of squares ``a`` can be used as it is.

    NaN and Inf show up in ``a`` as NaN and Inf, overflow as Inf, underflow as a sum
    below ``4 k tiny``; a sum of 0 is fine where :func:`_zero_sum_is_exact` says so.
    """
    lo, hi = _trusted_sums(plan, a.dtype)
    ordinary = (a >= lo) & (a <= hi)
    if _zero_sum_is_exact(plan, a.dtype):
        ordinary = ordinary | (a == 0)
    return ordinary


def _fused_forward(x: Tensor, weight: Tensor | None, plan: _Plan) -> Tensor:
    """The forward under ``torch.compile`` (same results as the safe path).

    The plain float32 (float64) sum of squares tells whether every slice is ordinary
    (:func:`_ordinary_slices`). If so (the usual case) the output is one fused pass
    ``x / d * w``, as
    in the torchvision idiom; otherwise :func:`torch.cond` takes the exact branch,
    :func:`_fused_exact`, which reads ``x`` once more. Both branches are compiled; only
    one runs.
    """
    cd = _working_dtype(x.dtype)
    xw = x.to(cd)
    a = (xw * xw).sum(list(plan.norm), keepdim=True)
    ordinary = _ordinary_slices(a, plan)
    has_weight = weight is not None

    def exact(x: Tensor, *w: Tensor) -> Tensor:
        return _fused_exact(x, w[0] if has_weight else None, plan)

    def usual(x: Tensor, a: Tensor, *w: Tensor) -> Tensor:
        inv_d, _ = _ordinary_stats(a, plan)
        u = x.to(cd) * inv_d
        wv = _weight_view(w[0] if has_weight else None, plan.ndim, plan.channel, u)
        return (u if wv is None else u * wv).to(x.dtype)

    ws = (weight,) if weight is not None else ()
    return torch.cond(
        (~ordinary).any(),
        lambda x, a, *w: exact(x, *w),
        usual,
        (x, a, *ws),
    )


def _fused_vjp(
    x: Tensor, weight: Tensor | None, g: Tensor, plan: _Plan
) -> tuple[Tensor, Tensor | None]:
    """The VJP under ``torch.compile`` (same results as the safe VJP).

    One fused reduction gives, per slice, the sum of squares ``a`` and ``<sigma, x>``;
    when every slice is ordinary and no cotangent overflowed the latter, ``dx = (sigma -
    c <sigma, x / d> x) / d`` is one pointwise pass and ``dscale`` one reduction, as in
    :func:`_fast_vjp`; otherwise :func:`torch.cond` runs the safe VJP.
    """
    cd = _working_dtype(x.dtype)
    xw, gw = x.to(cd), g.to(cd)
    norm = list(plan.norm)
    has_weight = weight is not None
    wv = _weight_view(weight, plan.ndim, plan.channel, xw)
    sigma = gw if wv is None else gw * wv
    a = (xw * xw).sum(norm, keepdim=True)
    sx = (sigma * xw).sum(norm, keepdim=True)
    usable = _ordinary_slices(a, plan) & torch.isfinite(sx)

    def usual(x: Tensor, g: Tensor, a: Tensor, sx: Tensor, *w: Tensor) -> tuple[Tensor, ...]:
        xw, gw = x.to(cd), g.to(cd)
        inv_d, n = _ordinary_stats(a, plan)
        c = _ordinary_c(inv_d, n, plan)
        wv = _weight_view(w[0] if has_weight else None, plan.ndim, plan.channel, xw)
        sigma = gw if wv is None else gw * wv
        dx = ((sigma - (c * sx * inv_d) * xw) * inv_d).to(x.dtype)
        if not has_weight:
            return (dx,)
        gu = gw * xw * inv_d
        total = gu.sum() if w[0].numel() == 1 else gu.sum(list(plan.reduced))
        return dx, total.reshape(w[0].shape).to(w[0].dtype)

    def exact(x: Tensor, g: Tensor, a: Tensor, sx: Tensor, *w: Tensor) -> tuple[Tensor, ...]:
        dx, dw = _safe_vjp_plan(x, w[0] if has_weight else None, g, plan, True)
        return (dx,) if dw is None else (dx, dw)

    # Detached: x and the weight require grad, and torch.cond would mark the exact
    # branch's outputs as requiring grad too (a gradient that requires grad).
    operands = tuple(t.detach() for t in (x, g, a, sx, *((weight,) if has_weight else ())))
    out = torch.cond((~usable).any(), exact, usual, operands)
    return out[0], (out[1] if has_weight else None)


def _fused_exact(x: Tensor, weight: Tensor | None, plan: _Plan) -> Tensor:
    """The exact forward under ``torch.compile``: one fused read of ``x`` for the
    statistics and one fused pass for the output (same results as the safe path).

    One reduction kernel accumulates, per slice, the plain sum of squares ``a``, two
    sums of squares pre-scaled by fixed powers of two (``big`` over the entries large
    enough to matter when ``a`` overflows, ``small`` over the entries small enough to
    matter when ``a`` underflows; both masked so that no square lands in the subnormal
    range, which costs a microcode assist per element on x86), the largest magnitude and
    the count of infinite entries. Ordinary slices use ``a``; the others use the sum that
    is exact for them and the power of two ``p`` below their largest entry, as the
    reference does. Only slice-sized tensors tell the cases apart.
    """
    cd = _working_dtype(x.dtype)
    finfo = torch.finfo(cd)
    m = int(math.log2(finfo.tiny))  # -126 / -1022
    big_exp = int(math.log2(finfo.max)) + 1  # 128 / 1024
    sub = m + int(math.log2(finfo.eps))  # smallest subnormal exponent: -149 / -1074
    half_logk = math.ceil(math.log2(max(plan.k, 1)) / 2)
    e_b = big_exp // 2 + half_logk + 1  # (max * 2**-e_b)**2 * k cannot overflow
    t_b = 2.0 ** (e_b + (m + 6) // 2)  # (t_b * 2**-e_b)**2 = 2**(m + 6): normal
    e_s = (m // 2) - sub  # (smallest subnormal * 2**e_s)**2 = 2**m: normal
    t_s = 2.0 ** (half_logk + 1 + m // 2)  # bounds every entry of an underflowing slice
    norm = list(plan.norm)

    xw = x.to(cd)
    ax = xw.abs()
    zero = torch.zeros((), dtype=cd, device=x.device)
    a = (xw * xw).sum(norm, keepdim=True)
    big = torch.where(ax > t_b, xw * 2.0**-e_b, zero)
    big = (big * big).sum(norm, keepdim=True)
    small = torch.where(ax < t_s, xw * 2.0**e_s, zero)
    small = (small * small).sum(norm, keepdim=True)
    amax = ax.amax(norm, keepdim=True)
    n_inf = torch.where(ax == math.inf, 1.0, zero).sum(norm, keepdim=True)

    # Slice-sized from here on.
    tm, te = _split(plan.thr)
    lo, hi = _trusted_sums(plan, cd)
    mid = (a >= lo) & (a <= hi)
    over = a > 1.0  # overflowed (or Inf / NaN, handled below)
    e_lo = float(max(m + 3, te - big_exp + 3))
    e_p = torch.floor(torch.log2(amax)).clamp(min=e_lo, max=float(big_exp - 1))
    e_p = torch.where(mid | torch.isnan(e_p), zero, e_p)
    acc = torch.where(mid, a, torch.where(over, big, small))
    e_acc = torch.where(mid, zero, torch.where(over, float(e_b), float(-e_s)))
    ns = torch.sqrt(acc) * torch.pow(2.0, e_acc - e_p)
    ts = torch.pow(2.0, te - e_p) * tm
    if plan.mode == "add_sumsq":
        hi = torch.maximum(ns, ts)
        q = torch.minimum(ns, ts) / hi
        ds = hi * torch.sqrt(q * q + 1.0)
    elif plan.mode == "add_norm":
        ds = ns + ts
    else:
        ds = torch.maximum(ns, ts)
    nan_slice = torch.isnan(a)
    inf_slice = (n_inf > 0) & ~nan_slice
    f1 = torch.where(inf_slice, zero, torch.pow(2.0, -e_p))  # finite entries of Inf slices -> 0
    f2 = torch.where(nan_slice, a, 1.0 / ds)
    rs = torch.where(nan_slice, a, torch.rsqrt(n_inf))  # Inf entries -> ±1/sqrt(count)
    f = _realized(torch.stack([f1, f2, rs, -rs]))

    # Full-size: one fused pass.
    u = torch.where(xw == math.inf, f[2], torch.where(xw == -math.inf, f[3], xw * f[0] * f[1]))
    w = _weight_view(weight, plan.ndim, plan.channel, u)
    y = u if w is None else u * w
    return y.to(x.dtype)


# --------------------------------------------------------------------------- eager path


def _fast_ok(plan: _Plan, cd: torch.dtype) -> bool:
    """Whether eps fits the working dtype well enough for the unscaled fast path."""
    finfo = torch.finfo(cd)
    lo, hi = float(finfo.tiny), float(finfo.max) / 16
    return lo <= plan.eps <= hi and lo <= plan.thr <= hi


def _rows_perm(plan: _Plan) -> list[int]:
    return list(plan.rest) + list(plan.norm)


def _bad_rows(t: Tensor, bad: Tensor, plan: _Plan) -> Tensor:
    """The slices of ``t`` where ``bad`` (slice-shaped, keepdim) holds, as (m, *norm)."""
    perm = _rows_perm(plan)
    mask = bad.permute(perm).reshape([bad.shape[a] for a in plan.rest])
    return t.permute(perm)[mask]


def _put_rows(t: Tensor, bad: Tensor, rows: Tensor, plan: _Plan) -> None:
    perm = _rows_perm(plan)
    mask = bad.permute(perm).reshape([bad.shape[a] for a in plan.rest])
    t.permute(perm)[mask] = rows.to(t.dtype)


def _row_plan(plan: _Plan) -> _Plan:
    """The plan of the gathered rows: (m, *norm shape), channel inside the norm axes."""
    nd = 1 + len(plan.norm)
    return _Plan(
        tuple(range(1, nd)),
        1 + plan.norm.index(plan.channel),
        nd,
        plan.k,
        plan.mode,
        plan.eps,
        plan.thr,
    )


def _fast_stats(n2: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    """``(inv_d, c, ok)`` per slice from the unscaled sum of squares, for a batch that
    holds untrusted slices (``ok`` False, see :func:`_trusted_sums`): those get
    ``inv_d = c = 0`` here and are recomputed by the safe path."""
    lo, hi = _trusted_sums(plan, n2.dtype)
    ok = (n2 >= lo) & (n2 <= hi)
    # The ones keep the discarded slices finite.
    inv_d, n = _ordinary_stats(torch.where(ok, n2, torch.ones_like(n2)), plan)
    c = _ordinary_c(inv_d, n, plan)
    zero = torch.zeros_like(inv_d)
    return torch.where(ok, inv_d, zero), torch.where(ok, c, zero), ok


def _all_ordinary(n2: Tensor, plan: _Plan) -> bool:
    """Whether every slice's sum of squares is trustworthy: one reduction, one sync.

    A NaN anywhere makes the extremes NaN, which fails both comparisons."""
    lo, hi = _trusted_sums(plan, n2.dtype)
    smallest, largest = torch.stack(torch.aminmax(n2)).tolist()
    return lo <= smallest and largest <= hi


def _fast_forward(
    x: Tensor, weight: Tensor | None, plan: _Plan
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(y, inv_d, c, n)``: ``c`` is None for a batch of ordinary slices (then ``n``,
    or None in add_sumsq mode, gives it later); otherwise ``n`` is None and the slices
    handed to the safe path have ``inv_d = c = 0``."""
    cd = _working_dtype(x.dtype)
    xc = x.to(cd)
    buf = torch.mul(xc, xc)
    n2 = buf.sum(plan.norm, keepdim=True)
    ordinary = _all_ordinary(n2, plan)
    if ordinary:
        inv_d, n = _ordinary_stats(n2, plan)
        c = None
    else:
        inv_d, c, ok = _fast_stats(n2, plan)
        n = None
    w = _weight_view(weight, plan.ndim, plan.channel, xc)
    # One pass writes x / d into the squares' buffer and one in-place pass applies the
    # per-channel scale: cheaper than materialising the (slice x channel) outer product.
    if w is not None and w.numel() == 1:
        torch.mul(xc, inv_d * w, out=buf)
    else:
        torch.mul(xc, inv_d, out=buf)
        if w is not None:
            buf.mul_(w)
    y = buf.to(x.dtype)
    if not ordinary:
        bad = ~ok
        rows = _safe_forward_plan(_bad_rows(x, bad, plan), weight, _row_plan(plan))
        _put_rows(y, bad, rows, plan)
    return y, inv_d, c, n


def _nc_rest(t: Tensor, plan: _Plan) -> Tensor | None:
    """``t`` as (prefix, C, suffix) without a copy, when only the channel is normalized."""
    if plan.norm != (plan.channel,) or not t.is_contiguous():
        return None
    prefix = 1
    for a in range(plan.channel):
        prefix *= t.shape[a]
    return t.view(prefix, t.shape[plan.channel], -1)


def _fast_vjp(
    x: Tensor,
    weight: Tensor | None,
    g: Tensor,
    inv_d: Tensor,
    c: Tensor | None,
    n: Tensor | None,
    plan: _Plan,
) -> tuple[Tensor, Tensor | None]:
    """``dx = (sigma - c <sigma, x / d> x) / d`` and ``ds = sum g x / d`` on the fast path
    (``c``, ``n`` as :func:`_fast_forward` returns them)."""
    cd = inv_d.dtype
    xc = x.to(cd)
    gc = g.to(cd)
    w = _weight_view(weight, plan.ndim, plan.channel, xc)
    per_channel = w is not None and w.numel() > 1
    if c is None:  # every slice was ordinary
        c = _ordinary_c(inv_d, n, plan)
        bad, any_bad = None, False
    else:
        bad = inv_d == 0  # the slices the forward handed to the safe path
        any_bad = bool(bad.any())
    t = gc * xc
    if any_bad:  # their g * x may be Inf or NaN and must not reach the channel sums
        _put_rows(t, bad, torch.zeros((), dtype=cd, device=t.device), plan)
    t3 = _nc_rest(t, plan) if per_channel else None
    dw = None
    if t3 is not None:
        # NCHW-like: both contractions are matrix products on views (no temporaries).
        wb = weight.to(cd).reshape(1, 1, -1).expand(t3.shape[0], 1, -1)
        ip = torch.bmm(wb, t3).view(inv_d.shape) * inv_d  # <sigma, x / d>
        if weight is not None:
            dw = torch.bmm(t3, inv_d.reshape(t3.shape[0], -1, 1)).sum(0)
    else:
        t.mul_(inv_d)  # g * x / d
        if weight is not None:
            dw = t.sum() if weight.numel() == 1 else t.sum(plan.reduced)
        if per_channel:
            t.mul_(w)
        ip = t.sum(plan.norm, keepdim=True)  # <sigma, x / d> (times s when shared)
        if w is not None and not per_channel:
            ip = ip * w
    coef = c * ip
    if not bool(torch.isfinite(coef).all()) and bool(torch.isfinite(g).all()):
        # A huge cotangent overflowed <sigma, x> somewhere (the only way a finite g gives
        # a non-finite coefficient outside the bad slices): rare enough to redo it all.
        return _safe_vjp_plan(x, weight, g, plan)
    if any_bad:
        coef = torch.where(bad, torch.zeros_like(coef), coef)
    dx = t  # reuse the buffer
    if per_channel:
        torch.mul(gc, w, out=dx)
        dx.addcmul_(xc, coef, value=-1.0)
        dx.mul_(inv_d)
    else:
        torch.mul(gc, inv_d if w is None else inv_d * w, out=dx)
        dx.addcmul_(xc, coef * inv_d, value=-1.0)
    dx = dx.to(x.dtype)
    if any_bad:
        dw = _redo_bad_rows_vjp(dx, dw, x, weight, g, bad, plan)
    if dw is not None:
        dw = dw.reshape(weight.shape).to(weight.dtype)
    return dx, dw


def _redo_bad_rows_vjp(
    dx: Tensor,
    dw: Tensor | None,
    x: Tensor,
    weight: Tensor | None,
    g: Tensor,
    bad: Tensor,
    plan: _Plan,
) -> Tensor | None:
    """Write the safe VJP of the ``bad`` slices into ``dx``; ``dw`` plus their share."""
    rdx, rdw = _safe_vjp_plan(
        _bad_rows(x, bad, plan), weight, _bad_rows(g, bad, plan), _row_plan(plan)
    )
    _put_rows(dx, bad, rdx, plan)
    if dw is not None and rdw is not None:
        dw = dw + rdw.to(dw.dtype).reshape(dw.shape)
    return dw


# --------------------------------------------------------------------------- native CPU kernel
# Opt-in (use_cpu_kernel): a C++ kernel built on first use with torch.utils.cpp_extension.
# It reads each block of slices twice while the block sits in cache and sums in float64;
# see l2norm/_cpu_kernel.cpp.

_KERNEL_SOURCES = ("_cpu_kernel.cpp", "_cpu_kernel_loops.h")
_KERNEL_MODES = {"clamp_norm": 0, "clamp_sumsq": 1, "add_norm": 2, "add_sumsq": 3}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Slices after the channel axis (in memory) below which the kernel's blocks are too short
#: to pay off; 1 (channels innermost) runs the kernel's row loops instead.
KERNEL_MIN_INNER = 8


@dataclass
class _KernelState:
    module: Any = None  # the built extension, once loaded
    enabled: bool = False


_KERNEL = _KernelState()


def use_cpu_kernel(enabled: bool = True, *, verbose: bool = False) -> bool:
    """Turn the native CPU kernel on (building it the first time) or off.

    The kernel computes the eager forward and backward on CPU for float32, float16 and
    bfloat16 inputs normalized over one axis, dense in memory, with the channel axis
    innermost in memory (channels-last, ``(N, C)``) or at least :data:`KERNEL_MIN_INNER`
    slices after it (NCHW and the like): one read of ``x`` and one write of ``y``
    forward, one read of ``x`` and ``g`` and one write of ``dx`` backward, sums in float64
    (outputs rounded once). Other inputs, CUDA, and
    ``torch.compile`` keep the default paths. Building needs a C++ compiler and ``ninja``
    (``pip install ninja``); it takes about a minute once, and the result is cached by
    PyTorch (``TORCH_EXTENSIONS_DIR``) under a name that changes with the source.

    Setting the environment variable ``L2NORM_CPU_KERNEL=1`` calls this when
    ``l2norm.torch`` is imported.

    Args:
        enabled: ``True`` to build / load and use the kernel, ``False`` to go back to the
            default eager path.
        verbose: show the compiler's output while building.

    Returns:
        Whether the kernel is now in use.

    Raises:
        RuntimeError: the kernel could not be built (no compiler, no ninja, ...).

    Example::

        >>> import l2norm.torch
        >>> l2norm.torch.use_cpu_kernel()  # doctest: +SKIP
        True
    """
    if enabled and _KERNEL.module is None:
        _KERNEL.module = _build_kernel(verbose)
        # `l2norm check --cpu-kernel` (and the tests) check it against the reference.
        conformance.register(_backend("cpu", kernel=True))
    _KERNEL.enabled = bool(enabled)
    return _KERNEL.enabled


def _build_kernel(verbose: bool) -> Any:
    from torch.utils import cpp_extension  # imported only when a kernel is built

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(b"".join((here / n).read_bytes() for n in _KERNEL_SOURCES))
    # OpenMP runs at::parallel_for's blocks on torch's intra-op threads (GCC / Linux).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return cpp_extension.load(
        name=f"l2norm_cpu_{digest.hexdigest()[:12]}",
        sources=[str(here / _KERNEL_SOURCES[0])],
        extra_cflags=["-O3", *openmp],
        extra_ldflags=openmp,
        verbose=verbose,
    )


@dataclass(frozen=True)
class _KernelLayout:
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
        """The kernel's output or per-slice tensor (``shape`` with the channel 1) back
        in the input's dimension order: a view with the input's memory format."""
        permuted = t3.view([shape[d] for d in self.order])
        return permuted.permute([self.order.index(d) for d in range(len(shape))])


def _kernel_layout(x: Tensor, plan: _Plan) -> _KernelLayout | None:
    """The kernel's view of ``x``, or None where the kernel does not apply (see
    :func:`use_cpu_kernel`)."""
    if (
        not _KERNEL.enabled
        or x.device.type != "cpu"
        or x.dtype not in _KERNEL_DTYPES
        or plan.norm != (plan.channel,)
    ):
        return None
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))  # stable on ties
    if not x.permute(order).is_contiguous():
        return None  # not dense (a slice of a larger tensor, expanded, ...)
    at = order.index(plan.channel)
    outer = math.prod(x.shape[d] for d in order[:at])
    inner = math.prod(x.shape[d] for d in order[at + 1 :])
    if 1 < inner < KERNEL_MIN_INNER:
        return None
    return _KernelLayout(order, (outer, int(x.shape[plan.channel]), inner))


def _kernel_scale(weight: Tensor | None) -> Tensor:
    """The scale as the kernel takes it: float64, 0 (none), 1 or C entries."""
    if weight is None:
        return torch.empty(0, dtype=torch.float64)
    return weight.detach().to(torch.float64).reshape(-1).contiguous()


def _kernel_slices(t: Tensor, x: Tensor, layout: _KernelLayout, plan: _Plan) -> Tensor:
    """A kernel's per-slice ``(outer, inner)`` tensor, slice-shaped like ``x`` (keepdim)."""
    shape = list(x.shape)
    shape[plan.channel] = 1
    return layout.from_kernel(t, shape)


def _kernel_forward(
    x: Tensor, weight: Tensor | None, layout: _KernelLayout, plan: _Plan
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, inv_d, c)`` from the kernel, ``inv_d`` and ``c`` in its ``(outer, inner)``
    layout; slices with NaN or Inf (``inv_d = c = 0``) are recomputed by the safe path,
    as on the default eager path."""
    y3, inv_d, c = _KERNEL.module.forward(
        layout.to_kernel(x), _kernel_scale(weight), _KERNEL_MODES[plan.mode], plan.eps, plan.thr
    )
    y = layout.from_kernel(y3, x.shape)
    bad = _kernel_slices(inv_d, x, layout, plan) == 0
    if bool(bad.any()):
        rows = _safe_forward_plan(_bad_rows(x, bad, plan), weight, _row_plan(plan))
        _put_rows(y, bad, rows, plan)
    return y, inv_d, c


def _kernel_vjp(
    x: Tensor,
    weight: Tensor | None,
    g: Tensor,
    inv_d: Tensor,
    c: Tensor,
    layout: _KernelLayout,
    plan: _Plan,
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dweight)`` from the kernel (``inv_d``, ``c`` as :func:`_kernel_forward`
    returns them)."""
    bad = _kernel_slices(inv_d, x, layout, plan) == 0
    any_bad = bool(bad.any())
    xk, gk = x, g
    if any_bad:  # the kernel needs zeros there: their g x may be NaN
        zero = torch.zeros((), dtype=x.dtype)
        xk, gk = x.clone(), g.clone()
        _put_rows(xk, bad, zero, plan)
        _put_rows(gk, bad, zero, plan)
    dx3, dw = _KERNEL.module.backward(
        layout.to_kernel(xk), layout.to_kernel(gk), _kernel_scale(weight), inv_d, c
    )
    dx = layout.from_kernel(dx3, x.shape)
    if weight is None:
        dw = None
    elif weight.numel() == 1:
        dw = dw.sum()
    if any_bad:
        dw = _redo_bad_rows_vjp(dx, dw, x, weight, g, bad, plan)
    if dw is not None:
        dw = dw.reshape(weight.shape).to(weight.dtype)
    return dx, dw


class _L2NormFunction(torch.autograd.Function):
    """Forward and hand-derived backward; saves only the input and slice-sized tensors."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, plan: _Plan) -> Tensor:
        ctx.plan = plan
        compiling = torch.compiler.is_compiling()
        fits = _fast_ok(plan, _working_dtype(x.dtype))
        fast = not compiling and fits
        ctx.fast, ctx.wide, ctx.fused = fast, compiling, compiling and fits
        ctx.kernel = _kernel_layout(x, plan) if fast else None
        if ctx.kernel is not None:
            y, inv_d, c = _kernel_forward(x, weight, ctx.kernel, plan)
            ctx.save_for_backward(x, weight, inv_d, c)
        elif fast:
            y, inv_d, c, n = _fast_forward(x, weight, plan)
            ctx.save_for_backward(x, weight, inv_d, c, n)
        else:
            if ctx.fused:
                y = _fused_forward(x, weight, plan)
            else:
                y = _safe_forward_plan(x, weight, plan, compiling)
            ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        plan = ctx.plan
        if ctx.kernel is not None and not torch.is_grad_enabled():
            x, weight, inv_d, c = ctx.saved_tensors
            dx, dw = _kernel_vjp(x, weight, g, inv_d, c, ctx.kernel, plan)
        elif ctx.fast and not torch.is_grad_enabled():
            x, weight, inv_d, c, n = ctx.saved_tensors
            dx, dw = _fast_vjp(x, weight, g, inv_d, c, n, plan)
        elif ctx.fused and not torch.is_grad_enabled():
            x, weight = ctx.saved_tensors
            dx, dw = _fused_vjp(x, weight, g, plan)
        else:
            # create_graph=True (double backward): the safe VJP is made of
            # differentiable, traceable ops and recomputes from x alone.
            x, weight = ctx.saved_tensors[:2]
            dx, dw = _safe_vjp_plan(x, weight, g, plan, ctx.wide)
        if not ctx.needs_input_grad[1]:
            dw = None
        return dx, dw, None


# --------------------------------------------------------------------------- checks


def _check_tensor(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            "input must be a floating tensor (torch.float16, torch.bfloat16, torch.float32 "
            f"or torch.float64), got {x.dtype}"
        )


def _check_weight(weight: Any, x: Tensor, axes: Axes) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    # A float32 weight with a float16/bfloat16 input is the mixed-precision layout (master
    # weights in float32, activations in half, autocast); any other mix would silently
    # change the result's precision, so it is refused.
    accepted = (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)
    if weight.dtype not in accepted:
        names = " or ".join(str(d) for d in accepted)
        raise TypeError(
            f"weight has dtype {weight.dtype}, but the input is {x.dtype}; expected {names}"
        )
    if weight.device != x.device:
        raise ValueError(
            f"weight is on {weight.device} but the input is on {x.device}; move one of them"
        )
    check_scale_shape(tuple(weight.shape), int(x.shape[axes.channel]), axes)


def _apply(x: Tensor, weight: Tensor | None, spec: Spec, *, min_rank: int) -> Tensor:
    _check_tensor(x)
    if x.dim() < min_rank:
        raise ValueError(
            f"L2Norm expects an input of rank >= {min_rank} (batch, channels, ...), "
            f"got rank {x.dim()} with shape {tuple(x.shape)}"
        )
    axes = spec.resolve(x.dim())
    _check_weight(weight, x, axes)
    plan = _plan(spec, axes, x.shape)
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        # Exporters record plain, branch-free ops (they would otherwise meet a Python
        # autograd.Function they cannot serialize).
        return _safe_forward_plan(x, weight, plan)
    return _L2NormFunction.apply(x, weight, plan)


# --------------------------------------------------------------------------- public API


def l2_normalize(
    x: Tensor,
    weight: Tensor | None = None,
    *,
    dim: int | Sequence[int] = 1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> Tensor:
    r"""L2-normalize ``x`` along ``dim`` and multiply by ``weight`` (ParseNet / SSD).

    .. math::

        y = w \cdot \frac{x}{d\left(\lVert x \rVert_2\right)}

    with the norm over ``dim`` (or every axis but 0 with ``across_spatial``) and ``d`` the
    denominator of ``eps_mode`` (default ``max(n, 1e-12)``, as
    :func:`torch.nn.functional.normalize`). Same maths as :func:`l2norm.l2_normalize`.

    Args:
        x: float16, bfloat16, float32 or float64 tensor of rank >= 1. Half inputs are
            computed in float32 and the result is returned in ``x``'s dtype.
        weight: None, one shared value (shape ``()`` or ``(1,)``), or one value per
            channel of the channel axis. Its dtype is ``x``'s (or float32 for a half
            input); it must be on ``x``'s device.
        dim: the normalized axis, or a tuple of axes whose first entry is the channel axis.
        across_spatial: one norm per sample over every axis but 0 (Caffe); ``dim`` then
            names the channel axis only.
        eps: positive finite epsilon (default 1e-12, or the preset's).
        eps_mode: ``"add_sumsq"``, ``"add_norm"``, ``"clamp_sumsq"`` or ``"clamp_norm"``.
        preset: a peer's conventions: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``,
            ``"torchvision"``, ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``.

    Returns:
        A tensor of ``x``'s shape, dtype and memory format.

    Example:
        >>> import torch
        >>> from l2norm.torch import l2_normalize
        >>> l2_normalize(torch.tensor([[3.0, 4.0]]), torch.tensor([20.0, 10.0]))
        tensor([[12.,  8.]])
    """
    spec = Spec.create(
        axis=dim, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    return _apply(x, weight, spec, min_rank=1)


class L2Norm(nn.Module):
    r"""L2 normalization with a learnable per-channel scale (ParseNet, SSD's ``conv4_3``).

    .. math::

        y = \gamma \cdot \frac{x}{d\left(\lVert x \rVert_2\right)}

    The norm is taken over ``dim`` for every other position (per pixel over the channels
    for NCHW input), or over every axis but the batch axis with ``across_spatial``.
    :math:`\gamma` is a learnable vector of size ``num_channels`` (one value with
    ``channel_shared``) initialised to ``scale_init`` (SSD uses 20). ``d`` is the
    denominator of ``eps_mode``:

    =============== ========================= ===========================
    eps_mode        :math:`d(n)`              peers
    =============== ========================= ===========================
    ``clamp_norm``  :math:`\max(n, \epsilon)`  torchvision (the default)
    ``add_norm``    :math:`n + \epsilon`       ssd.pytorch, mmdetection
    ``add_sumsq``   :math:`\sqrt{n^2+\epsilon}` Caffe SSD
    ``clamp_sumsq`` :math:`\max(n, \sqrt{\epsilon})` TensorFlow, ssd_keras
    =============== ========================= ===========================

    Half-precision inputs (and inputs under :func:`torch.autocast`) are computed in
    float32 and returned in their own dtype; the result is exact to a few ULPs for every
    finite input (no overflow of the sum of squares, no NaN for all-zero pixels, a
    finite gradient everywhere).

    Args:
        num_channels: :math:`C`, the size of the channel axis ``dim``.
        dim: the channel axis (default 1, NCHW). A tuple normalizes over all its axes;
            its first entry is the channel axis. Negative values count from the end.
        scale_init: initial :math:`\gamma`: a number, or one value per channel
            (a sequence or a tensor). Default: 20.
        channel_shared: one scalar :math:`\gamma` for all channels (Caffe's option).
        across_spatial: one norm per sample over every axis but 0 (Caffe's option).
        learnable: :math:`\gamma` is a parameter; if False, a buffer (still in the
            ``state_dict``). Default: True.
        eps: epsilon (default 1e-12 or the preset's); eps_mode: where it goes (see the
            table); preset: a peer's (eps_mode, eps), e.g. ``"ssd.pytorch"``.
        device, dtype: of the parameter (factory kwargs, as in :class:`torch.nn.LayerNorm`).

    Attributes:
        weight: :math:`\gamma`, shape :math:`(C,)` or :math:`(1,)` with ``channel_shared``.
            The name matches ssd.pytorch and mmdetection checkpoints (``L2Norm.weight``).

    Shape:
        - Input: :math:`(N, C, *)` for ``dim=1``; in general any rank >= 2 with
          :math:`C` entries along ``dim``.
        - Output: same shape, dtype and memory format as the input.

    Examples::

        >>> import torch
        >>> from l2norm.torch import L2Norm
        >>> norm = L2Norm(512)  # SSD conv4_3: per pixel over the channels, gamma = 20
        >>> x = torch.randn(2, 512, 38, 38)
        >>> y = norm(x)
        >>> torch.allclose(y.norm(dim=1), torch.full((2, 38, 38), 20.0))
        True
        >>> L2Norm(512, preset="ssd.pytorch")  # eps placement of ssd.pytorch's L2Norm
        L2Norm(512, dim=1, eps_mode=add_norm, eps=1e-10, preset=ssd.pytorch)
    """

    def __init__(
        self,
        num_channels: int,
        *,
        dim: int | Sequence[int] = 1,
        scale_init: float | Sequence[float] | Tensor = 20.0,
        channel_shared: bool = False,
        across_spatial: bool = False,
        learnable: bool = True,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (
            not isinstance(num_channels, numbers.Integral)
            or isinstance(num_channels, bool)
            or num_channels < 1
        ):
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        for name, flag in (("channel_shared", channel_shared), ("learnable", learnable)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _FLOATS:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.spec = Spec.create(
            axis=dim, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
        )
        if isinstance(scale_init, Tensor):
            scale_init = scale_init.detach().to("cpu", torch.float64).numpy()
        self._scale_init = scale_init_values(scale_init, int(num_channels), channel_shared)
        self.num_channels = int(num_channels)
        self.dim = self.spec.axis
        self.channel_shared = channel_shared
        self.across_spatial = self.spec.across_spatial
        self.learnable = learnable
        weight = torch.empty(self._scale_init.shape, device=device, dtype=dtype)
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.reset_parameters()

    @property
    def eps(self) -> float:
        return self.spec.eps

    @property
    def eps_mode(self) -> str:
        return self.spec.eps_mode

    def reset_parameters(self) -> None:
        """Set :math:`\\gamma` back to ``scale_init``."""
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(self._scale_init))

    def forward(self, x: Tensor) -> Tensor:
        _check_tensor(x)
        if x.dim() >= 2:
            axes = self.spec.resolve(x.dim())
            if x.shape[axes.channel] != self.num_channels:
                raise ValueError(
                    f"L2Norm({self.num_channels}) got an input of shape {tuple(x.shape)} with "
                    f"{x.shape[axes.channel]} channels along dim {axes.channel}; expected "
                    f"{self.num_channels}"
                )
        return _apply(x, self.weight, self.spec, min_rank=2)

    def extra_repr(self) -> str:
        parts = [f"{self.num_channels}", f"dim={self.dim}"]
        if self.across_spatial:
            parts.append("across_spatial=True")
        if self.channel_shared:
            parts.append("channel_shared=True")
        if not self.learnable:
            parts.append("learnable=False")
        parts.append(f"eps_mode={self.spec.eps_mode}, eps={self.spec.eps:g}")
        if self.spec.preset is not None:
            parts.append(f"preset={self.spec.preset}")
        return ", ".join(parts)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this (as for torchvision's ops): the scripted twin shares
        # the weight and runs the safe path, which TorchScript can compile.
        return _ScriptableL2Norm(self)


class _ScriptableL2Norm(nn.Module):
    """What :func:`torch.jit.script` compiles in place of :class:`L2Norm`."""

    def __init__(self, module: L2Norm) -> None:
        super().__init__()
        if isinstance(module.weight, nn.Parameter):
            self.weight = module.weight
        else:
            self.register_buffer("weight", module.weight)
        axis = module.spec.axis
        self.axis = list(axis) if isinstance(axis, tuple) else [axis]
        self.across_spatial = module.spec.across_spatial
        self.num_channels = module.num_channels
        self.mode = module.spec.eps_mode
        self.tm, self.te = _split(module.spec.threshold)

    def forward(self, x: Tensor) -> Tensor:
        ndim = x.dim()
        if ndim < 2:
            raise ValueError("L2Norm expects an input of rank >= 2, got rank " + str(ndim))
        norm: list[int] = []
        for a in self.axis:
            if a < -ndim or a >= ndim:
                raise ValueError("L2Norm: dim " + str(a) + " is out of range for rank " + str(ndim))
            norm.append(a % ndim)
        channel = norm[0]
        if self.across_spatial:
            norm = list(range(1, ndim))
        else:
            norm.sort()
        if x.shape[channel] != self.num_channels:
            raise ValueError(
                "L2Norm(" + str(self.num_channels) + ") got " + str(x.shape[channel]) + " channels"
            )
        return _safe_forward(x, self.weight, norm, channel, self.mode, self.tm, self.te)


# --------------------------------------------------------------------------- conformance


def _to_torch(a: np.ndarray) -> Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(conformance.numpy_dtype("bfloat16"))
    return t.numpy()


def _options_to_kwargs(options: dict) -> dict:
    kwargs = dict(options)
    kwargs["dim"] = kwargs.pop("axis", -1)
    return kwargs


def _backend(device: str, kernel: bool = False) -> conformance.Backend:
    """The conformance backend computing on ``device`` (NumPy in and out), with the native
    CPU kernel on or off for its calls."""

    def forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
        w = None if scale is None else _to_torch(scale).to(device)
        with _kernel_enabled(kernel):
            y = l2_normalize(_to_torch(x).to(device), w, **_options_to_kwargs(options))
        return _to_numpy(y)

    def vjp(
        x: np.ndarray, scale: np.ndarray | None, g: np.ndarray, options: dict
    ) -> tuple[np.ndarray, np.ndarray | None]:
        xt = _to_torch(x).to(device).requires_grad_(True)
        wt = None if scale is None else _to_torch(scale).to(device).requires_grad_(True)
        with _kernel_enabled(kernel):
            y = l2_normalize(xt, wt, **_options_to_kwargs(options))
            inputs = (xt,) if wt is None else (xt, wt)
            grads = torch.autograd.grad(y, inputs, _to_torch(g).to(device))
        dx = _to_numpy(grads[0])
        return dx, (None if wt is None else _to_numpy(grads[1]))

    name = "torch" if device == "cpu" else f"torch-{device}"
    return conformance.Backend(
        name=name + ("-cpu-kernel" if kernel else ""), forward=forward, vjp=vjp
    )


@contextlib.contextmanager
def _kernel_enabled(enabled: bool) -> Iterator[None]:
    """The native CPU kernel on or off inside the block (it must be built to be on)."""
    before = _KERNEL.enabled
    _KERNEL.enabled = enabled
    try:
        yield
    finally:
        _KERNEL.enabled = before


conformance.register(_backend("cpu"))
if torch.cuda.is_available():  # `l2norm check` on a GPU machine covers CUDA too
    conformance.register(_backend("cuda"))
if os.environ.get("L2NORM_CPU_KERNEL", "") == "1":  # a deployment-wide switch
    use_cpu_kernel()
