r"""Double-word arithmetic: a value carried as an unevaluated sum ``hi + lo`` of two floats.

Where a lowering has no wider accumulator than its data (float64 everywhere; float32 in
JAX, which has no float64 without ``jax_enable_x64``), the ladder (:mod:`l2norm.core.ladder`)
sums each slice's squares as such pairs and computes its per-slice factors in them, so
that ``d(n)`` and ``1 / d`` carry about twice the working precision and each output is
rounded once: faithful rounding (within 1 ULP of the exact result), where a plain sum,
square root and division in the working precision leave up to 3.

The building blocks are the error-free transformations of Dekker and Knuth (Muller et
al., *Handbook of Floating-Point Arithmetic*, ch. 4), written with operators and ``xp``
functions only, so they run on NumPy, torch, jax.numpy and TensorFlow arrays alike:

* :func:`two_sum`: ``s + e = a + b`` exactly (6 additions, any order of magnitudes);
* :func:`two_prod`: ``p + e = a * b``, given a ``split`` of each factor into two halves
  whose products are exact: built from those products only, so that a compiler fusing a
  multiplication into the next addition (XLA does) changes no result.

:class:`Pair` and :class:`PairNamespace` let :mod:`l2norm.core.modes`' formulas (written
with ``+``, ``*``, ``/``, comparisons, ``xp.sqrt`` and ``xp.where``) run unchanged in
this arithmetic: each eps placement stays written once.

Accuracy (Joldes, Muller, Popescu, *Tight and rigorous error bounds for basic building
blocks of double-word arithmetic*, 2017): addition, multiplication, division and square
root below ``4 u**2`` relative (``u`` the unit roundoff), far below what one final
rounding adds. Overflow is the caller's: the ladder keeps every operand in range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l2norm.core.modes import EpsMode

__all__ = [
    "Pair",
    "PairNamespace",
    "Split",
    "fast_two_sum",
    "pair_slice_terms",
    "two_prod",
    "two_sum",
]

#: ``split(v) -> (hi, lo)``: ``v = hi + lo`` exactly, each with at most half the
#: significand's bits (rounded at the middle bit), so that products of halves are exact.
Split = Callable[[Any], tuple[Any, Any]]


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """:func:`two_sum` for ``|a| >= |b|`` (or ``a = 0``): 3 additions (Dekker)."""
    s = a + b
    return s, b - (s - a)


def two_prod(a: Any, b: Any, split: Split) -> tuple[Any, Any]:
    """``(p, e)`` with ``p`` about ``fl(a * b)`` and ``p + e = a * b`` to about ``u**3``
    (Dekker's product from the halves), unless it underflows.

    Every multiplication is of two halves, so exact: a compiler that fuses one into the
    addition that follows (XLA does, into a multiply-add) changes nothing. (Dekker's own
    form starts from ``p = a * b``, which a fused ``p + e`` would turn into the exact
    product plus ``e``: its error counted twice.)
    """
    ah, al = split(a)
    bh, bl = (ah, al) if b is a else split(b)  # a square: split once
    high = ah * bh
    cross = ah * bl + al * bh
    p = high + cross
    return p, ((high - p) + cross) + al * bl


@dataclass(frozen=True)
class Pair:
    """``hi + lo`` with ``|lo| <= ulp(hi) / 2`` (normalized), elementwise over arrays.

    Arithmetic with another :class:`Pair` or a plain array (read as ``(a, 0)``) is
    double-word arithmetic; comparisons order by ``hi``, then ``lo``.
    """

    hi: Any
    lo: Any
    split: Split

    # NumPy arrays defer to this class's reflected operators instead of looping over it.
    __array_ufunc__ = None

    def _lift(self, other: Any) -> Pair:
        if isinstance(other, Pair):
            return other
        return Pair(other, other * 0, self.split)

    def _new(self, hi: Any, lo: Any) -> Pair:
        return Pair(*fast_two_sum(hi, lo), self.split)

    def __add__(self, other: Any) -> Pair:
        o = self._lift(other)
        s, e = two_sum(self.hi, o.hi)
        t, f = two_sum(self.lo, o.lo)
        s, e = fast_two_sum(s, e + t)
        return self._new(s, e + f)

    __radd__ = __add__

    def __neg__(self) -> Pair:
        return Pair(-self.hi, -self.lo, self.split)

    def __sub__(self, other: Any) -> Pair:
        return self + (-self._lift(other))

    def __rsub__(self, other: Any) -> Pair:
        return self._lift(other) - self

    def __mul__(self, other: Any) -> Pair:
        o = self._lift(other)
        p, e = two_prod(self.hi, o.hi, self.split)
        return self._new(p, e + (self.hi * o.lo + self.lo * o.hi))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Pair:
        o = self._lift(other)
        q = self.hi / o.hi
        # The remainder self - q * o, exactly enough: q * o.hi as a pair.
        p, e = two_prod(q, o.hi, self.split)
        r = ((self.hi - p) - e + self.lo) - q * o.lo
        return self._new(q, r / o.hi)

    def __rtruediv__(self, other: Any) -> Pair:
        return self._lift(other) / self

    def _less(self, other: Any, strict: bool) -> Any:
        o = self._lift(other)
        lo_cmp = self.lo < o.lo if strict else self.lo <= o.lo
        return (self.hi < o.hi) | ((self.hi == o.hi) & lo_cmp)

    def __lt__(self, other: Any) -> Any:
        return self._less(other, True)

    def __le__(self, other: Any) -> Any:
        return self._less(other, False)

    def __gt__(self, other: Any) -> Any:
        return self._lift(other)._less(self, True)

    def __ge__(self, other: Any) -> Any:
        return self._lift(other)._less(self, False)


@dataclass(frozen=True)
class PairNamespace:
    """The few ``xp`` functions :mod:`l2norm.core.modes` calls, on :class:`Pair` values.

    Args:
        xp: the array namespace of the pairs' halves.
        split: the lowering's :data:`Split` for their dtype.
    """

    xp: Any
    split: Split

    def pair(self, hi: Any, lo: Any = None) -> Pair:
        return Pair(hi, self.xp.zeros_like(hi) if lo is None else lo, self.split)

    def _lift(self, v: Any) -> Pair:
        return v if isinstance(v, Pair) else self.pair(v)

    def sqrt(self, a: Any) -> Pair:
        """``sqrt(a)`` for ``a >= 0``: one Newton step from the working-precision root
        (0 at 0: no division by it)."""
        a = self._lift(a)
        xp = self.xp
        root = xp.sqrt(a.hi)
        positive = root > xp.zeros_like(root)
        safe = xp.where(positive, root, xp.ones_like(root))
        p, e = two_prod(safe, safe, self.split)
        correction = ((a.hi - p) - e + a.lo) / (safe + safe)
        correction = xp.where(positive, correction, xp.zeros_like(root))
        return self.pair(root)._new(root, correction)

    def where(self, cond: Any, a: Any, b: Any) -> Pair:
        a, b = self._lift(a), self._lift(b)
        xp = self.xp
        return Pair(xp.where(cond, a.hi, b.hi), xp.where(cond, a.lo, b.lo), self.split)

    def ones_like(self, v: Any) -> Pair:
        return self.pair(self.xp.ones_like(v.hi if isinstance(v, Pair) else v))

    def zeros_like(self, v: Any) -> Pair:
        return self.pair(self.xp.zeros_like(v.hi if isinstance(v, Pair) else v))


def pair_slice_terms(
    xp: Any, mode: EpsMode, sumsq: Pair, eps: Any, count: int = 1
) -> tuple[Any, ...]:
    """``(1 / d, 1 / n, r, n / d, the low word of 1 / d)`` from a pair sum, computed in
    double-word arithmetic (the table of :mod:`l2norm.core.modes` run on pairs); NaN and Inf
    slices are left to the caller (their pair is replaced by 1 here)."""
    pxp = PairNamespace(xp, sumsq.split)
    ones, zeros = xp.ones_like(sumsq.hi), xp.zeros_like(sumsq.hi)
    finite = xp.isfinite(sumsq.hi) & xp.isfinite(sumsq.lo)
    a = pxp.pair(xp.where(finite, sumsq.hi, ones), xp.where(finite, sumsq.lo, zeros))
    positive = a.hi > zeros
    n = pxp.sqrt(a)
    e = pxp.pair(eps)
    # The slice size as an array: a Python number has no bits for the pair's split.
    size = count if count == 1 else xp.full_like(sumsq.hi, float(count))
    d = mode.denominator(pxp, a, n, e, size)
    r, _ = mode.ratio(pxp, a, n, d, e, size)
    inv_d = 1.0 / d
    inv_n = xp.where(positive, ones / xp.where(positive, n.hi + n.lo, ones), zeros)
    ratio = n / d
    return inv_d.hi, inv_n, r.hi + r.lo, ratio.hi + ratio.lo, inv_d.lo
