r"""How every fast lowering stays exact without branches: a ladder of scaled sums of squares.

A lowering must give every finite slice its norm without overflow or underflow, treat
every slice the same way (so that one sample's result never depends on its neighbours),
read nothing back to the host and make one pass over the input. It does so by summing
the squares of each slice at a few fixed power-of-two scales at once, the *rungs* of a
ladder, and keeping per slice the most finely scaled sum that stayed finite:

.. math::

    A_j = \sum_i \left(x_i\, 2^{s_j}\right)^2, \qquad s_1 > s_2 > \dots > s_R .

This is LAPACK 3.10's ``nrm2`` idea (Anderson 2017, after Blue 1978: constant scales, no
division, associative) reorganised so that every element goes to every rung and the
choice is made per slice afterwards: a rung's sum is finite exactly when it did not
overflow, and the rungs are spaced (:func:`make_ladder`) so that the highest finite one
has lost at most ``2**-m`` of its value to underflowed squares, ``m`` = the accumulator's
mantissa bits + 8. Where the accumulator is wide enough for every square of the data
(float32 or half data summed in float64, half data in float32) the ladder has one rung,
``s = 0``, and the scheme is the plain sum of squares.

Per slice the chosen rung gives ``d`` in its units (``d_s = d 2**s``, eps scaled along,
:meth:`~l2norm.core.modes.EpsMode.scaled_eps`), and the full-size passes are

* forward ``u = x / d = ((x 2**s) / d_s)`` with the power of two applied before the
  division for ``s > 0`` and after it for ``s < 0`` (so no intermediate leaves the range),
  then ``y = scale * u``;
* backward ``dx = ((sigma - c <sigma, u> u) / d_s) 2**s`` with ``sigma = scale * g`` and
  ``c`` the coupling of :mod:`l2norm.core.modes`; ``dscale = sum g u``.

NaN and Inf need no branch either: a NaN reaches every rung (NaN slice, NaN out); a slice
holding ±Inf (and no NaN) overflows every rung and has a non-zero count of infinities,
summed with the rungs: its finite entries map to 0, its ``k`` infinite entries to
``±1 / sqrt(k)`` (the reference's limit) and its input gradient is 0, all by selects.

A lowering passes its own ``upscale(x, s)`` (``x 2**s``, exactly) where a plain
multiplication would not do: backends whose CPU kernels read subnormal operands as zero
(XLA, TensorFlow) build it from the bits for subnormal ``x`` (the top rung serves the
slices made of subnormals), and torch multiplies by a tensor constant (see
:func:`choose_rung` on the TorchScript tracer).

Where the accumulator is the data's own dtype (float64 everywhere, float32 in JAX), a
plain sum, square root and division leave up to 3 ULP; :mod:`l2norm.core.faithful` then sums
the chosen rung again as a double-word pair, from which :func:`factors` computes in
double-word arithmetic, and rounds each output once.

This module is framework-free: it takes an array namespace ``xp`` (NumPy, torch,
jax.numpy, TensorFlow) and the lowering's own reduction; :mod:`l2norm.core.modes` supplies
the per-placement formulas.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from l2norm.core.modes import EpsMode, get_mode
from l2norm.core.pairs import Pair, pair_slice_terms

__all__ = ["FORMATS", "Chosen", "FloatFormat", "Ladder", "SliceFactors", "make_ladder"]


@dataclass(frozen=True)
class FloatFormat:
    """The exponent range of a binary floating-point format.

    Attributes:
        min_exp: the smallest normal number is ``2**min_exp``.
        max_exp: every finite number is below ``2**max_exp``.
        mant: explicit mantissa bits (the smallest subnormal is ``2**(min_exp - mant)``).
    """

    min_exp: int
    max_exp: int
    mant: int

    @property
    def subnormal_exp(self) -> int:
        return self.min_exp - self.mant


FORMATS: dict[str, FloatFormat] = {
    "float16": FloatFormat(-14, 16, 10),
    "bfloat16": FloatFormat(-126, 128, 7),
    "float32": FloatFormat(-126, 128, 23),
    "float64": FloatFormat(-1022, 1024, 52),
}


@dataclass(frozen=True)
class Ladder:
    """The rungs of one call: everything static (hashable, a JAX static argument).

    Attributes:
        mode: the eps placement.
        shifts: the rungs' exponents ``s_j``, decreasing; the first finite rung is used.
        eps: eps in each rung's units (clamped below to the accumulator's smallest normal,
            so a zero slice keeps ``d > 0``).
        exact_top: whether the top rung may serve slices whose entries are subnormal in
            the accumulator (then a flushing backend must scale them up from their bits).
        count: the slice size where the placement reads the mean of the squares, else 1.
    """

    mode: EpsMode
    shifts: tuple[int, ...]
    eps: tuple[float, ...]
    exact_top: bool
    count: int = 1

    @property
    def single(self) -> bool:
        """One rung at ``s = 0``: the plain sum of squares, nothing scaled."""
        return self.shifts == (0,)


@functools.lru_cache(maxsize=512)
def make_ladder(data: str, acc: str, size: int, eps_mode: str, eps: float) -> Ladder:
    """The ladder for slices of ``size`` entries of dtype ``data`` summed in dtype ``acc``.

    With ``lk = ceil(log2 size)`` and ``m`` the precision margin, a rung ``s``:

    * serves as the top rung if even a slice of one smallest subnormal sums to at least
      ``size 2**(min_exp + m)`` there, so that the underflowed squares (each below
      ``2**min_exp``) weigh at most ``2**-m``: ``s_1 >= (min_exp + lk + m) / 2 - sub``;
    * may follow the rung ``s + delta`` if a sum that overflowed there is still precise
      here: ``delta <= (max_exp - min_exp - lk - m) / 2``;
    * serves as the bottom rung if no finite slice overflows it:
      ``2 (top + s) + lk <= max_exp - 2``.

    Rungs are placed around ``s = 0`` when that needs no more of them than the greedy
    placement from the top, so ordinary activations are summed unscaled.
    """
    fmt, accf = FORMATS[data], FORMATS[acc]
    mode = get_mode(eps_mode)
    lk = max(0, math.ceil(math.log2(max(size, 1))))
    margin = accf.mant + 8
    top_min = math.ceil((accf.min_exp + lk + margin) / 2 - fmt.subnormal_exp)
    bottom_max = math.floor((accf.max_exp - 2 - lk) / 2 - fmt.max_exp)
    delta = (accf.max_exp - accf.min_exp - lk - margin) // 2
    if delta < 1:
        raise ValueError(f"slices of {size} entries are too long for {acc} sums")
    # No rung above the one where eps itself would near overflow: a slice that needs a
    # finer rung than that is dominated by eps, whose scale then hides the data's error.
    eps_cap = math.floor((accf.max_exp - 3 - math.log2(eps)) / mode.power)
    top_min = max(min(top_min, eps_cap), bottom_max if eps_cap < bottom_max else -(10**9))
    if top_min <= bottom_max:
        shifts: tuple[int, ...] = (min(max(0, top_min), bottom_max),)
    else:
        shifts = _around_zero(top_min, bottom_max, delta)
        greedy = _greedy(top_min, bottom_max, delta)
        if len(greedy) < len(shifts):
            shifts = greedy
    highest = 2.0 ** (accf.max_exp - 2)
    rung_eps = tuple(
        min(max(mode.scaled_eps(eps, 2.0**-s), 2.0**accf.min_exp), highest) for s in shifts
    )
    exact_top = shifts[0] > 0 and fmt.subnormal_exp < accf.min_exp
    return Ladder(mode, shifts, rung_eps, exact_top, size if mode.mean else 1)


def _around_zero(top_min: int, bottom_max: int, delta: int) -> tuple[int, ...]:
    up, s = [], 0
    while s < top_min:
        s = min(s + delta, top_min)
        up.append(s)
    down, s = [], 0
    while s > bottom_max:
        s = max(s - delta, bottom_max)
        down.append(s)
    return (*reversed(up), 0, *down)


def _greedy(top_min: int, bottom_max: int, delta: int) -> tuple[int, ...]:
    shifts = [top_min]
    while shifts[-1] > bottom_max:
        shifts.append(max(shifts[-1] - delta, bottom_max))
    return tuple(shifts)


# --------------------------------------------------------------------------- the passes


class SliceFactors(NamedTuple):
    """Per-slice factors (each shaped like a slice, keepdims), in the accumulator dtype.

    Full-size passes (:func:`normalized`, :func:`input_grad`) read ``x`` through
    ``((x pre) * f) * post`` with ``f = inv_d`` (forward, ``u = x / d``) or ``f = inv_n``
    (backward, ``xhat = x / n``), ``x pre`` read from the bits on the top rung where
    ``top`` says so. For a one-rung ladder ``pre``, ``post``, ``unit`` and ``top`` are None.
    """

    inv_d: Any  # 1 / d in the chosen rung's units; 0 in Inf slices, NaN in NaN slices
    inv_n: Any  # 1 / n in the same units; 0 where n = 0 and in Inf slices
    r: Any  # n d'(n) / d(n) (l2norm.core.modes), 0 in Inf slices
    ratio: Any  # n / d: u = ratio * xhat; 1 in Inf slices (rinf holds the limit)
    rinf: Any  # 1 / sqrt(number of infinities), for the Inf slices' infinite entries
    pre: Any  # 2**s for s > 0, else 1
    post: Any  # 2**s for s < 0, else 1
    unit: Any  # 2**s
    top: Any  # the slice uses the top rung (only where the ladder needs exact scaling)
    inv_d_lo: Any = None  # with a pair sum: 1 / d = inv_d + inv_d_lo to twice the precision


Upscale = Callable[[Any, int], Any]


def plain_upscale(x: Any, shift: int) -> Any:
    """``x * 2**shift`` by multiplication: for backends that keep subnormal operands and
    record Python numbers faithfully (NumPy, JAX); a lowering passes its own otherwise."""
    return x * 2.0**shift if shift else x


def sums(
    xp: Any, x: Any, ladder: Ladder, reduce: Callable[[Any], Any], upscale: Upscale = plain_upscale
) -> tuple[list[Any], Any]:
    """``([A_j], n_inf)``: each rung's sum of squares and the count of infinities per slice.

    ``x`` is in the accumulator dtype; ``reduce`` sums over the normalized axes (kept).
    Written as independent reductions over the same input: XLA and Inductor fuse them
    into one pass.
    """
    rung_sums = []
    for s in ladder.shifts:
        xs = upscale(x, s) if s else x
        rung_sums.append(reduce(xs * xs))
    infinite = xp.where(_infinite(xp, x), xp.ones_like(x), xp.zeros_like(x))
    return rung_sums, reduce(infinite)


def _infinite(xp: Any, x: Any) -> Any:
    # Not xp.isinf: Inductor's CPU code generator does not vectorize isinf.
    return xp.abs(x) == math.inf


class Chosen(NamedTuple):
    """Each slice's rung (slice-shaped, in the accumulator dtype): its sum of squares (a
    :class:`~l2norm.core.pairs.Pair` after :func:`l2norm.core.faithful.refined_pair`), eps
    in its units, ``2**s`` split in ``pre`` / ``post``, ``2**s``, and 1 on the top rung."""

    sumsq: Any
    eps: Any
    pre: Any
    post: Any
    unit: Any
    top: Any


def choose_rung(xp: Any, ladder: Ladder, rung_sums: list[Any]) -> Chosen:
    """The first rung, by decreasing shift, whose sum and ``d`` are finite (the bottom one
    serves every finite slice). Slice-sized work only."""
    mode = ladder.mode
    bottom = rung_sums[-1]
    # Constants through full_like, never a Python number next to a tensor: the TorchScript
    # tracer (torch.jit.trace, the ONNX exporter) can record such a number as a constant
    # of an earlier, freed one.
    ones, zeros = xp.ones_like(bottom), xp.zeros_like(bottom)
    chosen = None
    for j in reversed(range(len(ladder.shifts))):
        s = ladder.shifts[j]
        raw = rung_sums[j]
        fields = Chosen(
            raw,
            xp.full_like(bottom, ladder.eps[j]),
            xp.full_like(bottom, 2.0 ** max(s, 0)),
            xp.full_like(bottom, 2.0 ** min(s, 0)),
            xp.full_like(bottom, 2.0**s),
            ones if j == 0 else zeros,
        )
        if chosen is None:
            chosen = fields
            continue
        finite = xp.isfinite(raw)  # False where it overflowed (and for NaN)
        a = xp.where(finite, raw, ones)
        d = mode.denominator(xp, a, xp.sqrt(a), fields.eps, ladder.count)
        usable = finite & xp.isfinite(d)
        chosen = Chosen(
            *(xp.where(usable, new, old) for new, old in zip(fields, chosen, strict=True))
        )
    return chosen


def factors(xp: Any, ladder: Ladder, chosen: Chosen, bottom: Any, n_inf: Any) -> SliceFactors:
    """The factors of the full-size passes from each slice's rung; ``bottom`` is the
    bottom rung's plain sum (NaN exactly in NaN slices). With a pair sum
    (:func:`l2norm.core.faithful.refined_pair`) they are computed in double-word arithmetic
    and carry the low word of ``1 / d``."""
    mode = ladder.mode
    ones, zeros = xp.ones_like(bottom), xp.zeros_like(bottom)
    sumsq, eps, pre, post, unit, top = chosen
    if isinstance(sumsq, Pair):
        inv_d, inv_n, r, ratio, inv_d_lo = pair_slice_terms(xp, mode, sumsq, eps, ladder.count)
    else:
        a = xp.where(xp.isfinite(sumsq), sumsq, ones)  # NaN and Inf slices: see below
        positive = a > zeros
        n = xp.where(positive, xp.sqrt(xp.where(positive, a, ones)), zeros)
        d = mode.denominator(xp, a, n, eps, ladder.count)
        r, _ = mode.ratio(xp, a, n, d, eps, ladder.count)
        inv_d = ones / d
        inv_n = xp.where(positive, ones / xp.where(positive, n, ones), zeros)
        ratio = n / d
        inv_d_lo = None
    # NaN slices: NaN throughout (``bottom`` is NaN exactly there). Inf slices (every rung
    # overflowed, and infinities counted): the reference's limit, direction sign(x) on
    # the infinite entries over sqrt(their count) (times the mode's inf_limit), 0
    # elsewhere, input gradient 0.
    nan_slice = bottom != bottom
    inf_slice = (n_inf > zeros) & ~nan_slice
    nan = xp.where(nan_slice, bottom, zeros)
    inv_d = xp.where(nan_slice, nan, xp.where(inf_slice, zeros, inv_d))
    inv_n = xp.where(nan_slice, nan, xp.where(inf_slice, zeros, inv_n))
    r = xp.where(inf_slice, zeros, r)
    count = xp.where(inf_slice, n_inf, ones)
    # rinf is already the whole limit of u = x n / (n d) at an infinite entry (the mode's
    # inf_limit shared by the k infinities), so ratio is 1 there: xhat * ratio = rinf.
    if ladder.count == 1:
        rinf = ones / xp.sqrt(count)
    else:  # sqrt(N / k) rounded once, not sqrt(N) / sqrt(k)
        rinf = xp.sqrt(xp.full_like(bottom, float(ladder.count)) / count)
    ratio = xp.where(nan_slice, nan, xp.where(inf_slice, ones, ratio))
    rinf = xp.where(nan_slice, nan, xp.where(inf_slice, rinf, zeros))
    if inv_d_lo is not None:
        inv_d_lo = xp.where(nan_slice | inf_slice, zeros, inv_d_lo)
    if ladder.single:
        return SliceFactors(inv_d, inv_n, r, ratio, rinf, None, None, None, None, inv_d_lo)
    top = top > zeros if ladder.exact_top else None
    return SliceFactors(inv_d, inv_n, r, ratio, rinf, pre, post, unit, top, inv_d_lo)


def rung_input(
    xp: Any,
    x: Any,
    pre: Any,
    top: Any,
    ladder: Ladder,
    upscale: Upscale,
    infinite: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
    """``(x 2**s for s > 0, where infinite)``: ``x`` read into its slice's rung, ``pre``
    applied (from the bits on the top rung where ``top``, None if the ladder needs no
    exact scaling), 0 at the infinities (no ``Inf * 0`` for autodiff to meet);
    ``infinite``: the lowering's own test for +-Inf, if any."""
    infinite = _infinite(xp, x) if infinite is None else infinite(x)
    xin = xp.where(infinite, xp.zeros_like(x), x)
    if ladder.single:
        return xin, infinite
    finite_x = xin
    xin = finite_x * pre
    if top is not None:
        xin = xp.where(top, upscale(finite_x, ladder.shifts[0]), xin)
    return xin, infinite


def direction(
    xp: Any, x: Any, f: SliceFactors, ladder: Ladder, upscale: Upscale = plain_upscale
) -> Any:
    """``xhat = x / n`` elementwise (0 in zero slices), with the power of two on the side
    that keeps it in range, Inf slices at their limit direction (NaN slices NaN through
    ``rinf``): what the backward reads."""
    xin, infinite = rung_input(xp, x, f.pre, f.top, ladder, upscale)
    v = xin * f.inv_n if ladder.single else (xin * f.inv_n) * f.post
    return xp.where(infinite, xp.sign(x) * f.rinf, v)


def input_grad(sigma: Any, xhat: Any, inner: Any, f: SliceFactors) -> Any:
    """``dx = (sigma - r <sigma, xhat> xhat) / d`` from ``inner = <sigma, xhat>`` per
    slice; every factor is bounded (``|xhat| <= 1``, ``0 <= r <= 1``)."""
    dx = (sigma - (f.r * inner) * xhat) * f.inv_d
    return dx if f.unit is None else dx * f.unit
