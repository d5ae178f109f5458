"""The one forward / VJP driver of the ladder (:mod:`l2norm.core.ladder`), for every framework.

Sum the rungs, choose a rung per slice, sum it again as a pair where the data is as wide
as the accumulator, write ``y``; backward: ``xhat``, ``sigma = scale * g``, the input
gradient saturated at the dtype's largest finite value and the scale gradient. A
framework supplies :class:`Hooks` only: its array namespace and reductions, an exact
``x * 2**s`` where its CPU flushes subnormals, how it reads a float's bits
(:class:`Bits`) and where the scale joins the output.

Example (NumPy as the framework):
    >>> import numpy as np
    >>> from l2norm.core import ladder as _ladder
    >>> x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32).astype(np.float64)
    >>> sum_ = lambda v: v.sum(-1, keepdims=True)
    >>> hooks = Hooks(np, "float64", sum_, lambda a, b: (sum_(a), sum_(b)), np.sum)
    >>> ladder = _ladder.make_ladder("float32", "float64", 2, "clamp_norm", 1e-12)
    >>> forward(hooks, x, None, ladder).y
    array([[0.6, 0.8],
           [0. , 0. ]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from l2norm.core import faithful as _faithful
from l2norm.core import ladder as _ladder
from l2norm.core.ladder import FORMATS, FloatFormat, Ladder, SliceFactors, Upscale
from l2norm.core.pairs import Pair

__all__ = ["Bits", "Forward", "Hooks", "bit_pairs", "exact_upscale", "factors", "forward"]
__all__ += ["output", "saturate", "sums", "vjp"]


@dataclass(frozen=True)
class Bits:
    """How a framework reads and writes a float array's bits (same-width signed integers):
    the one framework difference of the pairs' split and power-of-two floor."""

    ints: Callable[[Any], tuple[Any, FloatFormat]]  # v -> (its bits, its format)
    floats: Callable[[Any, Any], Any]  # (bits, like) -> floats of like's dtype
    convert: Callable[[Any, Any], Any]  # (integers, like) -> their values in like's dtype


def bit_pairs(bits: Bits) -> _faithful.PairSums:
    """The hooks of :func:`l2norm.core.faithful.refined_pair` from a framework's bit access:
    Dekker's split (the significand rounded at its middle bit, half away from zero, so
    that products of halves are exact) and the power of two at or below a positive
    normal value (its exponent bits).

    Example:
        >>> import numpy as np
        >>> from l2norm.core.ladder import FORMATS
        >>> np_bits = Bits(lambda v: (v.view(np.int64), FORMATS["float64"]),
        ...                lambda b, like: b.view(like.dtype), None)
        >>> split, floor = bit_pairs(np_bits)
        >>> hi, lo = split(np.array([1.0 + 2.0**-40]))
        >>> float(hi[0]), float(lo[0]), float(floor(np.array([6.0]))[0])
        (1.0, 9.094947017729282e-13, 4.0)
    """

    def split(v: Any) -> tuple[Any, Any]:
        ints, fmt = bits.ints(v)
        cleared = (fmt.mant + 2) // 2  # the low half of the significand, rounded away
        hi = bits.floats((ints + (1 << (cleared - 1))) & ~((1 << cleared) - 1), v)
        return hi, v - hi

    def pow2_floor(v: Any) -> Any:
        ints, fmt = bits.ints(v)
        return bits.floats(ints & ~((1 << fmt.mant) - 1), v)

    return _faithful.PairSums(split, pow2_floor)


def subnormal(bits: Bits, x: Any) -> Any:
    """Where ``x`` is subnormal or zero, read from its bits (a flushing compare says 0)."""
    ints, fmt = bits.ints(x)
    width = 1 + fmt.max_exp.bit_length() + fmt.mant  # sign, exponent and mantissa bits
    return (ints & ((1 << (width - 1)) - 1)) < (1 << fmt.mant)


def upscaled_from_bits(xp: Any, bits: Bits, x: Any, shift: int) -> Any:
    """``x * 2**shift`` for a subnormal ``x`` (garbage elsewhere), from its bits.

    A subnormal is ``mant * 2**sub`` (``sub`` = -149 for float32): the integer ``mant``
    converts exactly, and two normal power-of-two factors bring it up to a normal number,
    so no floating operand is ever subnormal. The sign is kept.
    """
    ints, fmt = bits.ints(x)
    mant = bits.convert(ints & ((1 << fmt.mant) - 1), x)
    low = fmt.subnormal_exp // 2
    value = mant * 2.0**low * 2.0 ** (fmt.subnormal_exp + shift - low)
    return xp.where(ints < 0, -value, value)


def exact_upscale(xp: Any, bits: Bits, x: Any, shift: int, from_bits: Upscale | None = None) -> Any:
    """``x * 2**shift``, exact also where ``x`` is subnormal and ``shift > 0`` (a CPU that
    flushes subnormal operands reads them as 0); ``from_bits``: the framework's wrapper of
    :func:`upscaled_from_bits` (JAX: with its derivative).

    Example:
        >>> import numpy as np
        >>> b = Bits(lambda v: (v.view(np.int32), FORMATS["float32"]),
        ...          lambda i, like: i.view(like.dtype), lambda i, like: i.astype(like.dtype))
        >>> x = np.float32([1e-45, -3e-40, 2.0])
        >>> exact_upscale(np, b, x, 100) / np.float32(2.0**100) == x
        array([ True,  True,  True])
    """
    if shift <= 0:  # a subnormal x then maps below the normal range anyway
        return x * 2.0**shift if shift else x
    rebuilt = (from_bits or (lambda v, s: upscaled_from_bits(xp, bits, v, s)))(x, shift)
    return xp.where(subnormal(bits, x), rebuilt, x * 2.0**shift)


@dataclass(frozen=True)
class Hooks:
    """What a framework supplies to the driver (built per call: the reductions know the
    axes).

    Attributes:
        xp: the array namespace (NumPy's names).
        acc: the accumulator dtype's name.
        reduce: ``v`` summed over the normalized axes (kept).
        reduce2: two arrays summed so, in one pass where the framework can (the pairs).
        scale_sum: the scale gradient's terms summed down to the scale's entries (for
            :func:`vjp`).
        upscale: ``x * 2**s`` exactly (from the bits where the CPU flushes subnormals).
        pairs: the pairs' split and floor (:func:`bit_pairs`) where the data is as wide as
            the accumulator and the result is not to be differentiated by autodiff, else
            None (plain sums).
        sums: the rungs' sums and the count of infinities of ``x`` in one pass, where the
            framework sums several terms together; default: :func:`l2norm.core.ladder.sums`
            with ``reduce``.
        stop_gradient: where autodiff runs through the pairs (JAX's higher orders): the
            pair is then differentiated as the plain sum.
        infinite: where ``x`` is +-Inf, where the framework reads it otherwise than by a
            float compare (JAX: from the bits).
        scale_order: where the scale joins ``y = scale x / d`` (each order is some
            framework's rounding, kept bitwise): ``"last"`` after ``x / d``;
            ``"inside"`` into ``1 / d`` (and ``dscale``'s ``n / d`` into ``xhat``),
            ``"first"`` before ``1 / d`` on the rungs ``s >= 0``: the flushing CPUs'
            orders, where ``x / d`` may be subnormal and ``scale * x / d`` is not.
    """

    xp: Any
    acc: str
    reduce: Callable[[Any], Any]
    reduce2: Callable[[Any, Any], tuple[Any, Any]]
    scale_sum: Callable[[Any], Any] | None = None
    upscale: Upscale = _ladder.plain_upscale
    pairs: _faithful.PairSums | None = None
    sums: Callable[[Any, Ladder], tuple[list[Any], Any]] | None = None
    stop_gradient: Callable[[Any], Any] | None = None
    infinite: Callable[[Any], Any] | None = None
    scale_order: str = "last"


class Forward(NamedTuple):
    """The forward's output (accumulator dtype) and what a backward may reuse."""

    y: Any
    factors: SliceFactors
    rung_sums: list[Any]
    n_inf: Any
    pair: Pair | None


def sums(h: Hooks, x: Any, ladder: Ladder) -> tuple[list[Any], Any]:
    """Each rung's sum of squares and the count of infinities per slice (one pass)."""
    if h.sums is None:
        return _ladder.sums(h.xp, x, ladder, h.reduce, h.upscale)
    return h.sums(x, ladder)


def saturate(xp: Any, v: Any, data: str) -> Any:
    """``v`` clipped to the largest finite magnitude of the ``data`` dtype, NaN kept (as
    :func:`l2norm.reference.saturate`): the input gradient of an all-zero float16 pixel,
    ``scale * g / eps``, must stay finite, or a loss scaler skips every step.

    Example:
        >>> import numpy as np
        >>> saturate(np, np.array([1e6, -np.inf, np.nan, 2.0]), "float16").tolist()
        [65504.0, -65504.0, nan, 2.0]
    """
    fmt = FORMATS[data]
    top = math.ldexp(2.0 - 2.0**-fmt.mant, fmt.max_exp - 1)  # the largest finite value
    return xp.clip(v, -top, top)


def factors(
    h: Hooks, x: Any, ladder: Ladder, rung_sums: list[Any], n_inf: Any, pair: Pair | None = None
) -> tuple[SliceFactors, Pair | None]:
    """The slice factors; with ``h.pairs``, from the chosen rung summed again as a pair
    (:func:`l2norm.core.faithful.refined_pair`, a second pass over ``x``), or from ``pair``
    where a forward saved it."""
    xp = h.xp
    chosen = _ladder.choose_rung(xp, ladder, rung_sums)
    if h.pairs is None:
        return _ladder.factors(xp, ladder, chosen, rung_sums[-1], n_inf), None
    if pair is None:
        xs = _faithful.rung_values(xp, x, chosen, ladder, h.upscale, h.infinite)
        plain, stop = chosen.sumsq, h.stop_gradient
        if stop is None:
            pair = _faithful.refined_pair(xp, xs, plain, h.reduce2, h.pairs)
        else:  # the plain sum's tangent, added as 0: differentiated as the plain sum
            pair = _faithful.refined_pair(xp, stop(xs), stop(plain), h.reduce2, h.pairs)
            pair = Pair(pair.hi + (plain - stop(plain)), pair.lo, pair.split)
    f = _ladder.factors(xp, ladder, chosen._replace(sumsq=pair), rung_sums[-1], n_inf)
    return f, pair


def forward(h: Hooks, x: Any, scale: Any, ladder: Ladder) -> Forward:
    """``y = scale * x / d`` for ``x`` in the accumulator dtype (``scale`` None means 1,
    else broadcastable), with the slice factors and sums."""
    rung_sums, n_inf = sums(h, x, ladder)
    f, pair = factors(h, x, ladder, rung_sums, n_inf)
    return Forward(output(h, x, scale, f, ladder), f, rung_sums, n_inf, pair)


def output(h: Hooks, x: Any, scale: Any, f: SliceFactors, ladder: Ladder) -> Any:
    """``y = scale * x / d`` from the slice factors, the power of two on the side that
    keeps it in range, Inf slices at their limit direction; each output rounded once
    from pair factors (:func:`l2norm.core.faithful.faithful_output`)."""
    xp = h.xp
    xin, infinite = _ladder.rung_input(xp, x, f.pre, f.top, ladder, h.upscale, h.infinite)
    limit = xp.sign(x) * f.rinf
    if f.inv_d_lo is None and (scale is None or h.scale_order == "last"):
        y = xin * f.inv_d if ladder.single else (xin * f.inv_d) * f.post
        y = xp.where(infinite, limit, y)
        return y if scale is None else y * scale
    below = None if ladder.single else f.post < xp.ones_like(f.post)  # the rungs s < 0
    if f.inv_d_lo is not None:
        y = _faithful.faithful_output(xp, xin, scale, f, h.pairs, FORMATS[h.acc], below)
    elif h.scale_order == "inside":
        y = xin * (f.inv_d * scale)
        y = y if ladder.single else y * f.post
    elif ladder.single:  # "first"
        y = (xin * scale) * f.inv_d
    else:
        ones = xp.ones_like(f.inv_d)
        y = ((xin * xp.where(below, f.inv_d, ones)) * scale) * xp.where(below, f.post, f.inv_d)
    return xp.where(infinite, limit if scale is None else limit * scale, y)


def vjp(
    h: Hooks, x: Any, scale: Any, g: Any, f: SliceFactors, ladder: Ladder, data: str
) -> tuple[Any, Any]:
    """``(dx, dscale)`` in the accumulator dtype (``dscale`` None without a scale) for the
    cotangent ``g``: ``dx = (sigma - r <sigma, xhat> xhat) / d`` with ``sigma = scale g``
    (:func:`l2norm.core.ladder.input_grad`) saturated to the ``data`` dtype (:func:`saturate`),
    ``dscale = sum g u`` with ``u = xhat n / d``: bounded terms, no ``1 / d`` blow-up."""
    xp = h.xp
    xhat = _ladder.direction(xp, x, f, ladder, h.upscale)
    sigma = g if scale is None else g * scale
    dx = saturate(xp, _ladder.input_grad(sigma, xhat, h.reduce(sigma * xhat), f), data)
    if scale is None:
        return dx, None
    gu = g * (xhat * f.ratio) if h.scale_order == "inside" else g * xhat * f.ratio
    return dx, h.scale_sum(gu)
