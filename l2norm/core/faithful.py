"""Faithful rounding where a lowering has no wider accumulator than its data (float64
everywhere, float32 in JAX): the chosen rung summed again as a double-word pair, and each
output rounded once. ``docs/maths.md`` ("Pairs") explains the scheme and what it costs.

Framework-free like :mod:`l2norm.core.ladder`, on which it builds: a lowering passes its
array namespace, its reductions and a :class:`PairSums` of bit-level hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from l2norm.core.ladder import Chosen, FloatFormat, Ladder, SliceFactors, Upscale, rung_input
from l2norm.core.pairs import Pair, Split, fast_two_sum, two_prod, two_sum

__all__ = ["PairSums", "faithful_output", "refined_pair", "rung_values"]


class PairSums(NamedTuple):
    """The hooks of a lowering that sums in double-word pairs (:func:`refined_pair`).

    Attributes:
        split: :data:`l2norm.core.pairs.Split` for the accumulator dtype.
        pow2_floor: the power of two at or below each (positive, normal) entry, from
            its bits.
    """

    split: Split
    pow2_floor: Callable[[Any], Any]


def refined_pair(
    xp: Any, xs: Any, plain: Any, reduce2: Callable[[Any, Any], tuple[Any, Any]], pairs: PairSums
) -> Pair:
    """Each slice's sum of squares of ``xs`` (its entries in its chosen rung, finite) as
    a :class:`~l2norm.core.pairs.Pair`, from two plain sums: a second pass over the
    slice; ``reduce2`` sums two arrays over the normalized axes (kept), in one pass where
    the framework can.

    ``plain`` (the same sum, summed plainly) gives a power of two ``sigma`` above the
    exact sum. Each square, split exactly into ``p + e``, is cut at ``sigma``'s last bit,
    ``q = (sigma + p) - sigma`` and ``t = (p - q) + e`` (exact but the last addition):
    every ``q`` and every partial sum of them is a multiple of ``ulp(sigma)`` below
    ``2 sigma``, so the sum of the ``q`` is exact in any order, and the sum of the small
    ``t`` adds a relative error of about ``n u**2`` (Rump, Ogita and Oishi's error-free
    extraction, 2008).
    """
    ones = xp.ones_like(plain)
    usable = xp.isfinite(plain) & (plain > xp.zeros_like(plain))
    # 2 * (the power of two at or below plain * (1 + 2**-7)): above the exact sum, which
    # the plain one misses by far less than 2**-7.
    sigma = pairs.pow2_floor(xp.where(usable, plain * (1 + 2.0**-7), ones)) * 2
    p, e = two_prod(xs, xs, pairs.split)
    q = (sigma + p) - sigma
    hi, lo = reduce2(q, (p - q) + e)
    return Pair(*two_sum(hi, lo), pairs.split)


def rung_values(
    xp: Any, x: Any, chosen: Chosen, ladder: Ladder, upscale: Upscale, infinite: Any = None
) -> Any:
    """``x 2**s`` in each slice's chosen rung (what that rung summed), 0 at infinities
    (``infinite``: :func:`l2norm.core.ladder.rung_input`'s): the input of :func:`refined_pair`."""
    top = chosen.top > xp.zeros_like(chosen.top) if ladder.exact_top else None
    xin, _ = rung_input(xp, x, chosen.pre, top, ladder, upscale, infinite)
    return xin if ladder.single else xin * chosen.post


def faithful_output(
    xp: Any,
    xin: Any,
    scale: Any,
    f: SliceFactors,
    pairs: PairSums,
    fmt: FloatFormat,
    below: Any = None,
) -> Any:
    """``y = scale * xin * (inv_d + inv_d_lo)`` rounded once (``xin``: ``x`` read into its
    rung, finite), then ``* post``: within 1 ULP of the exact ``scale * x / d``.

    On rungs ``s >= 0`` the scale multiplies first (a slice of subnormals keeps a normal
    ``y`` on a flushing CPU even where ``x / d`` is subnormal); where ``below`` (rungs
    ``s < 0``: huge slices, where ``xin * scale`` could overflow) ``x / d`` comes first.
    ``scale`` None means 1. ``fmt``: the accumulator's format.
    """
    inv = (f.inv_d, f.inv_d_lo)
    if scale is None:
        y = _rounded_product(xp, (xin, xp.zeros_like(xin)), inv, pairs, fmt)
    else:
        y = _rounded_product(xp, two_prod(xin, scale, pairs.split), inv, pairs, fmt)
        if below is not None:
            u = _rounded_product(xp, (xin, xp.zeros_like(xin)), inv, pairs, fmt, keep_pair=True)
            v = _rounded_product(xp, u, (scale, xp.zeros_like(scale)), pairs, fmt)
            y = xp.where(below, v, y)
    return y if f.post is None else y * f.post


def _rounded_product(
    xp: Any, a: tuple, c: tuple, pairs: PairSums, fmt: FloatFormat, keep_pair: bool = False
) -> Any:
    """``(a_hi + a_lo) * (c_hi + c_lo)`` rounded once (or as a pair, ``keep_pair``).

    Where the product is small enough for its error terms to leave the normal range (a
    CPU that flushes subnormals would turn them into garbage, not zeros), ``a`` is
    lifted by an exact power of two first and the result brought back down: one more
    rounding, into the subnormal range only.
    """
    lift_exp = 2 * (fmt.mant + 1) + 4
    tiny = 2.0 ** (fmt.min_exp + lift_exp)
    a_hi, a_lo = a
    c_hi, c_lo = c
    small = xp.abs(a_hi * c_hi) < xp.full_like(a_hi, tiny)
    lift = xp.where(small, xp.full_like(a_hi, 2.0**lift_exp), xp.ones_like(a_hi))
    a_hi, a_lo = a_hi * lift, a_lo * lift
    q, q_err = two_prod(a_hi, c_hi, pairs.split)
    rest = q_err + (a_hi * c_lo + a_lo * c_hi)
    drop = xp.where(small, xp.full_like(a_hi, 2.0**-lift_exp), xp.ones_like(a_hi))
    if keep_pair:
        s, s_err = fast_two_sum(q, rest)
        return s * drop, s_err * drop
    return (q + rest) * drop
