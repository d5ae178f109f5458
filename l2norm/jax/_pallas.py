r"""Pallas kernels for JAX on GPUs (Pallas' Triton backend) and TPUs (Mosaic): one fused
kernel per pass, float32 arithmetic only, within the suite's bounds.

The op runs over *rows*: ``x`` seen as ``(rows, L)`` with the normalized axes last and
contiguous (``L = C`` for one normalized axis; at most :data:`MAX_WIDTH`). The wrappers
(:func:`forward`, :func:`vjp`) move the normalized axes last where they are not (an XLA
transpose each way: NCHW costs two extra passes over memory; a strided kernel for it is
future work). A program holds ``R`` whole rows (``R``, the padded width and the warps
from :func:`block_config`, a function of ``(L, platform)`` and the kernel only, never of
the number of rows).

Arithmetic (docs/maths.md's double-word scheme, with no float64 anywhere: TPUs have none,
and JAX's float64 would hang on the global ``jax_enable_x64`` flag):

* **Scale.** Each row is read into ``x' = x 2**s`` with ``max |x'|`` in ``[1/4, 1/2)``,
  ``s`` from the exponent of the row's largest magnitude (an integer max of the bits, so
  subnormals count on hardware that flushes them: TPUs, XLA:CPU). ``x'`` is built from
  the bits (an exponent add; a subnormal's integer significand converted and scaled), so
  a row of subnormals is normalized exactly wherever it runs.
* **Sums.** float32 data: each square is split exactly (``x' = h + l`` by the bits:
  ``h**2`` exact, ``l (x' + h)`` within ``2**-34`` of the rest, so that a fused
  multiply-add changes nothing), summed pairwise as double-floats (Knuth's TwoSum) down
  to 128 lanes, and the last lanes by error-free extraction (Rump, Ogita and Oishi: cut
  at a power of two ``sigma >= 2 sum |h|``, the cut parts summed exactly in any order,
  the remainders plainly): a relative error below ``2**-33``, whatever order the
  hardware reduces in. Half data: the squares are exact in float32 and extraction alone
  is far inside their precision.
* **Per row**, ``n``, ``d(n)``, ``1 / d`` and ``r`` are computed in double-word
  arithmetic by :mod:`l2norm.core.pairs` running the table of :mod:`l2norm.core.modes`
  (each placement written once; the mean placement divides ``n'**2`` by the row's size
  ``N = L`` as a pair), eps carried as a pair from its float64 value and scaled along;
  where eps would pass ``2**62`` in the units of ``x'`` (it then dominates what it meets
  by ``2**52`` or more: ``n' <= 32``, ``n'**2 <= 2**10``, a mean ``n'**2 / N <= 1/4``),
  ``d`` is computed at a smaller power of two.
  ``1 / d`` is kept as a pair ``G`` in ``[1, 2)`` times a power of two, so that every
  product with ``G`` keeps its error terms in the normal range.
* **Output**: ``y = w x' G 2**t``, ``x' G`` an exact pair multiplied by ``w`` exactly
  enough, one rounding (the power of two is exact but in the subnormal range): within
  about ``2**-44`` of the exact value before it, so within 1 ULP (faithful) in float32;
  half data in float32 with two roundings, within 1 ULP of bfloat16 and float16.
* **Backward**: ``dx = (w g - K' x') G 2**(t + s)`` with ``K' = r <w g, x'> / n'**2``;
  for float32 data ``w g``, ``<w g, x'>`` and ``K' x'`` are exact pairs and their
  difference error-free, one rounding: the input gradient is faithful too. The scale's
  gradient ``sum g u`` (``u = x / d``; float32 data: ``g u`` an exact pair) is summed
  by extraction over each program's rows into a pair of rows of partials, then over the
  programs and a channel's entries in a fixed order (no atomics).

NaN and Inf rows are handled by selects (no branch): a row holding NaN is NaN; a row
holding +-Inf is read as its limit direction (+-1 on its ``k`` infinities, 0 elsewhere,
norm ``sqrt(k)``, no eps), so the same arithmetic gives the reference's limit
``+-w / sqrt(k)`` (``+-w sqrt(N / k)`` for a mean: ``d = sqrt(k / N)``,
:meth:`l2norm.core.modes.EpsMode.inf_limit`); its gradient is 0. Input gradients beyond the
dtype saturate at its largest value (:func:`l2norm.reference.saturate`).

Batch invariance: a row's arithmetic depends on that row, ``L``, the dtype and the
platform only; the reductions inside a row are exact (extraction) or error-free (TwoSum)
up to terms of ``2**-33`` relative, in an order fixed by the block shape. Determinism: no
atomics. Bits: Triton, Mosaic and the interpreter may contract, order or flush
differently, so results on a GPU or TPU may differ from interpret mode (and from the CPU
kernel) in the last place; the 1 ULP bound is what holds everywhere.

Examples:
    >>> import jax.numpy as jnp
    >>> from l2norm.jax import _pallas
    >>> x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    >>> _pallas.forward(x, None, channel=1, eps_mode="clamp_norm", eps=1e-12, interpret=True)
    Array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from l2norm.core.modes import EpsMode, get_mode
from l2norm.core.pairs import Pair, PairNamespace, two_prod, two_sum

__all__ = ["DTYPES", "MAX_WIDTH", "BlockConfig", "applies", "block_config", "forward", "vjp"]

#: The data types the kernels take (float64 stays on the ladder: TPUs have no float64).
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: The widest row (normalized size) a program holds whole; wider rows take the ladder.
MAX_WIDTH = 4096
#: Platforms with a Pallas lowering: the Triton backend on GPUs, Mosaic on TPUs.
PLATFORMS: tuple[str, ...] = ("cuda", "rocm", "tpu")

_F32 = jnp.float32
_I32 = jnp.int32
_LANES = 128  # below this width rows are summed by extraction alone
_EPS_HEADROOM = 62  # the scaled eps stays below 2**62 (see the module docstring)


# --------------------------------------------------------------------------- configuration


class BlockConfig(NamedTuple):
    """How a row of width ``L`` is tiled on one platform.

    Attributes:
        rows: rows per program (a power of two; a multiple of 8 on TPUs).
        width: the padded row width a program holds (a power of two on GPUs, where
            Triton needs one; on TPUs ``L`` itself below 128 lanes, else the next power of
            two, so that rows halve into 128-lane groups).
        num_warps: Triton warps per program (GPU only).
    """

    rows: int
    width: int
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_config(width: int, platform: str, heavy: bool = False) -> BlockConfig:
    """The tile of rows of ``width`` entries on ``platform`` (``"cuda"``/``"rocm"`` or
    ``"tpu"``) for one kernel (``heavy``: the float32 backward): a function of these
    only, so a row computes the same way in any batch.

    GPU: at least 2048 entries per program, 8 per thread (4 in the float32 backward;
    16 warps at most, so 8 at width 4096): the per-row pair arithmetic, which every
    thread of a row repeats, is shared by several entries, and no kernel at widths 24 to
    4096 uses more than 128 registers or spills (sm_80 and sm_90, ptxas; wider rows
    would: they take the ladder). TPU: blocks of about 64K entries (256 KiB in float32:
    the double-buffered blocks and the kernel's temporaries stay well inside the 16 MiB
    of scoped VMEM).

    Examples:
        >>> block_config(512, "cuda")
        BlockConfig(rows=4, width=512, num_warps=8)
        >>> block_config(24, "tpu")
        BlockConfig(rows=256, width=24, num_warps=0)
    """
    if platform in ("cuda", "rocm"):
        padded = _next_pow2(width)
        rows = max(1, 2048 // padded)
        per_warp = 128 if heavy else 256  # 4 or 8 entries a thread
        return BlockConfig(rows, padded, min(16, max(1, rows * padded // per_warp)))
    padded = width if width <= _LANES else _next_pow2(width)
    lanes = max(padded, _LANES)  # a row occupies whole 128-lane vectors in VMEM
    return BlockConfig(max(8, min(256, _next_pow2(65536 // lanes + 1) // 2)), padded, 0)


def applies(dtype: str, axes: Any, platform: str) -> bool:
    """Whether the kernels take a call with data of ``dtype`` normalized over ``axes``
    (:class:`l2norm.core.spec.Axes`, or a sequence of axes with the channel axis first, then
    ``shape`` unknown) on ``platform``: a GPU or TPU, a dtype of :data:`DTYPES`.

    The row width is checked by :func:`fits` once the shape is known.

    Examples:
        >>> from l2norm.core.spec import Spec
        >>> applies("bfloat16", Spec.create(axis=1).resolve(4), "tpu")
        True
        >>> applies("float64", Spec.create(axis=-1).resolve(2), "cuda")
        False
    """
    del axes  # every layout is moved to rows by the wrappers
    return platform in PLATFORMS and dtype in DTYPES


def fits(width: int) -> bool:
    """Whether rows of ``width`` entries fit one program (:data:`MAX_WIDTH`)."""
    return 0 < width <= MAX_WIDTH


# --------------------------------------------------------------------------- bits


def _bits(v: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(v, _I32)


def _float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, _F32)


def _pow2(e: jax.Array) -> jax.Array:
    """``2**e`` for integers ``e`` in ``[-126, 127]`` (normal powers), from the bits."""
    return _float((e + 127) << 23)


def _ldexp(v: jax.Array, e: jax.Array) -> jax.Array:
    """``v 2**e`` (``e`` in ``[-252, 254]``, or beyond where ``v 2**e`` over- or
    underflows anyway) by two normal powers of two: exact unless the result leaves the
    normal range (overflow gives Inf, underflow the rounded or flushed value)."""
    for _ in range(2):
        step = jnp.clip(e, -126, 127)
        v, e = v * _pow2(step), e - step
    return v


def _split(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v = hi + lo`` exactly, ``hi`` the top 12 bits of the significand (by its bits)
    and ``lo`` the rest: products of halves are exact (:func:`l2norm.core.pairs.two_prod`)."""
    hi = _float(_bits(v) & jnp.int32(-4096))
    return hi, v - hi


def _read(v: jax.Array) -> jax.Array:
    """Entries in float32, exactly: bfloat16 by its bits (a conversion flushes its
    subnormals on hardware that flushes float32 ones)."""
    if v.dtype == jnp.bfloat16:
        return _float(lax.bitcast_convert_type(v, jnp.uint16).astype(_I32) << 16)
    return v.astype(_F32)


# --------------------------------------------------------------------------- rows


class _Rows(NamedTuple):
    """Per row (``(R, 1)``) and per entry (``(R, W)``) quantities of a tile of rows."""

    xs: jax.Array  # x 2**s; an Inf row's limit direction (+-1 at infinities, 0 elsewhere)
    shift: jax.Array  # s
    nan: jax.Array  # the row holds a NaN
    inf: jax.Array  # the row holds +-Inf and no NaN


def _scaled_rows(x: jax.Array, cap: int) -> _Rows:
    """Each row read as ``x 2**s`` from the bits, ``max |x 2**s|`` in ``[1/4, 1/2)`` (zero
    rows get ``s = cap``). An Inf row is read as its limit direction, whose norm is
    ``sqrt(k)`` for ``k`` infinities: the same arithmetic then gives the limit."""
    bits = _bits(x)
    magnitude = bits & 0x7FFFFFFF
    largest = jnp.max(magnitude, axis=-1, keepdims=True)
    top_exp = largest >> 23
    # The exponent of a subnormal largest entry: that of its significand, as a float.
    sub_exp = ((_bits((largest & 0x7FFFFF).astype(_F32)) >> 23) - 127) - 149
    exponent = jnp.where(top_exp > 0, top_exp - 127, sub_exp)
    special = top_exp == 255
    shift = jnp.where(special, 0, jnp.where(largest == 0, cap, -2 - exponent))
    entry_exp = magnitude >> 23
    sign = bits & jnp.int32(-(2**31))
    normal = _float(bits + (shift << 23))
    sub_scale = _pow2(jnp.maximum(shift - 149, -126))
    subnormal = _float(_bits((magnitude & 0x7FFFFF).astype(_F32) * sub_scale) | sign)
    # Entries that would leave the normal range are below 2**-126 next to a largest one
    # of at least 1/4: their squares do not count.
    xs = jnp.where(
        entry_exp == 0,
        jnp.where(shift >= 23, subnormal, 0.0),
        jnp.where(entry_exp + shift >= 1, normal, 0.0),
    )
    limit = _float(jnp.where(magnitude == 0x7F800000, sign | 0x3F800000, 0))  # +-1 at +-Inf
    nan = largest > 0x7F800000
    return _Rows(jnp.where(special, limit, xs), shift, nan, special & ~nan)


def _halves(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = jnp.split(v, 2, axis=-1)
    return a, b


def _pow2_floor(v: jax.Array) -> jax.Array:
    """The power of two at or below each positive normal ``v`` (its exponent bits)."""
    return _float(_bits(v) & jnp.int32(0x7F800000))


def _row_sum(hi: jax.Array, lo: jax.Array | None) -> Pair:
    """Each row's ``sum(hi + lo)`` (``lo`` None: 0) as a pair, whatever order the
    hardware reduces in: with ``lo``, TwoSum halving down to 128 lanes, then error-free
    extraction (to ``2**-33`` of ``sum |hi|`` for widths up to 4096); without, extraction
    alone (to ``W**2 2**-46``: half-precision data)."""
    if lo is not None:
        while hi.shape[-1] > _LANES and hi.shape[-1] % (2 * _LANES) == 0:
            (a, b), (c, d) = _halves(hi), _halves(lo)
            hi, err = two_sum(a, b)
            lo = err + (c + d)
    return _extract_sum(hi, lo, -1, 2.0**-10)


def _extract_sum(hi: jax.Array, lo: jax.Array | None, axis: int, slack: float) -> Pair:
    """``sum(hi + lo)`` along ``axis`` (kept) by error-free extraction (Rump, Ogita and
    Oishi): exact in any order but for the small remainders. ``slack`` bounds the plain
    sum's relative error (``n 2**-24`` for ``n`` terms)."""
    total = jnp.sum(jnp.abs(hi), axis=axis, keepdims=True)
    usable = (total > 0) & (total < 2.0**120)  # NaN sums stay NaN
    # 4 * (the power of two at or below total * (1 + slack)) >= 2 sum |hi|: every
    # |hi| <= sigma / 2, so each cut part is a multiple of 2**-24 sigma and their sum
    # (at most sigma) is exact in any order.
    sigma = jnp.where(usable, _pow2_floor(total * (1 + slack)) * 4, 1.0)
    cut = (sigma + hi) - sigma
    exact = jnp.sum(cut, axis=axis, keepdims=True)
    rest = hi - cut if lo is None else (hi - cut) + lo
    return Pair(*two_sum(exact, jnp.sum(rest, axis=axis, keepdims=True)), _split)


def _square_sum(xs: jax.Array, exact: bool) -> Pair:
    """Each row's ``sum xs**2``: float32 data's squares split exactly (``xs = h + l`` by
    the bits, ``xs**2 = h**2 + l (xs + h)``, the first exact and the second within
    ``2**-34`` of the square); half data's squares are exact in float32."""
    if not exact:
        return _row_sum(xs * xs, None)
    h, low = _split(xs)
    return _row_sum(h * h, low * (xs + h))


class _Eps(NamedTuple):
    """eps as ``mant 2**exp`` with ``mant`` a float32 pair in ``[1/2, 1)`` (exact enough:
    ``2**-48``), the largest row shift ``cap`` that keeps it below ``2**62``, and the
    slice size ``count`` (:class:`l2norm.core.modes.EpsMode`'s; only a mean reads it)."""

    hi: float
    lo: float
    exp: int
    cap: int
    count: int


def _eps_parts(mode: EpsMode, eps: float, count: int) -> _Eps:
    """eps for rows of ``count`` entries.

    The cap bounds eps, not what it meets: with a mean, eps meets ``n**2 / N``, which is
    at most ``1/4`` in the units of ``x'`` (``n'**2 <= N / 4``), so past the cap (eps at
    ``2**62`` or more) eps dominates it by ``2**64`` or more and the data brought down
    with ``d`` (exactly, or to where it no longer counts) changes nothing.

    Examples:
        >>> from l2norm.core.modes import get_mode
        >>> parts = _eps_parts(get_mode("add_meansq"), 1e-6, 4)
        >>> parts.exp, parts.cap  # at the largest shift eps is 2**(-19 + 2 * 40) or so
        (-19, 40)
        >>> abs((parts.hi + parts.lo) * 2.0**parts.exp - 1e-6) <= 1e-6 * 2.0**-48
        True
    """
    mant, exp = math.frexp(eps)
    hi = float(np.float32(mant))
    cap = (_EPS_HEADROOM - exp) // mode.power
    return _Eps(hi, float(np.float32(mant - hi)), exp, min(cap, 160), count)


class _Terms(NamedTuple):
    """Per row: ``1 / d`` as ``G 2**out`` (``G`` a pair in ``[1, 2)``, ``2**out`` the
    power of two that takes ``w x' G`` to ``y``; ``2**(out + s)`` takes ``t G`` to
    ``dx``), ``K' = r / n'**2`` as a pair (``n'`` the norm of ``x' = x 2**s``), and
    whether the row's sum is positive."""

    inv_hi: jax.Array
    inv_lo: jax.Array
    out: jax.Array
    r_over_n2: Pair
    positive: jax.Array


def _slice_terms(mode: EpsMode, eps: _Eps, sumsq: Pair, rows: _Rows) -> _Terms:
    """The table of :mod:`l2norm.core.modes` on pairs (:class:`l2norm.core.pairs.Pair`).

    ``d`` is computed at the shift ``min(s, cap)``, where eps (scaled along) stays below
    ``2**62``; the sum of squares ``sumsq`` (of ``x 2**s``) is brought down to it exactly
    (or to where it no longer matters next to eps). An Inf row has no eps (its limit)."""
    pxp = PairNamespace(jnp, _split)
    finite = jnp.isfinite(sumsq.hi) & jnp.isfinite(sumsq.lo)
    positive = finite & (sumsq.hi > 0)
    a = pxp.pair(jnp.where(finite, sumsq.hi, 1.0), jnp.where(finite, sumsq.lo, 0.0))
    low = jnp.minimum(rows.shift, eps.cap)
    down = 2 * (low - rows.shift)
    at_low = pxp.pair(_ldexp(a.hi, down), _ldexp(a.lo, down))
    scaled = jnp.where(rows.inf, 0.0, _ldexp(jnp.ones_like(a.hi), eps.exp + mode.power * low))
    e = pxp.pair(scaled * eps.hi, scaled * eps.lo)
    n = pxp.sqrt(at_low)
    # The slice size per row, exact in float32 (at most 4096); an array, which the pairs
    # split by its bits (the Triton lowering bitcasts arrays only, not constants).
    count = jnp.full_like(a.hi, eps.count)
    d = mode.denominator(pxp, at_low, n, e, count)
    r, _ = mode.ratio(pxp, at_low, n, d, e, count)
    inv = 1.0 / d
    # 1 / d = G 2**t with G in [1, 2): products with G keep their error terms normal.
    t = ((_bits(inv.hi) >> 23) & 0xFF) - 127
    unit = _pow2(-t)
    safe = pxp.where(positive, a, pxp.ones_like(a))
    return _Terms(inv.hi * unit, inv.lo * unit, t + low - rows.shift, r / safe, positive)


def _forward_rows(
    x: jax.Array, w: jax.Array | None, mode: EpsMode, eps: _Eps, exact: bool
) -> jax.Array:
    """``y = w x / d`` of a tile of rows (float32 in, float32 out; ``w`` ``(1, W)`` or
    None). ``exact`` (float32 data): ``x' G`` formed as an exact pair, then times ``w``,
    one rounding; half data: two float32 roundings, far below half a ULP of the output."""
    rows = _scaled_rows(x, eps.cap)
    terms = _slice_terms(mode, eps, _square_sum(rows.xs, exact), rows)
    xs = rows.xs
    if not exact:
        y = xs * terms.inv_hi if w is None else (xs * terms.inv_hi) * w
    else:
        p, e = two_prod(xs, terms.inv_hi, _split)
        lo = e + xs * terms.inv_lo
        if w is None:
            y = p + lo
        else:
            q, f = two_prod(p, w, _split)
            y = q + (f + lo * w)
    # The power of two: exact but in the subnormal range.
    return jnp.where(rows.nan, jnp.nan, _ldexp(y, terms.out))


def _saturate(v: jax.Array, top: float) -> jax.Array:
    return jnp.where(v > top, top, jnp.where(v < -top, -top, v))


def _backward_rows(
    x: jax.Array,
    g: jax.Array,
    w: jax.Array | None,
    mode: EpsMode,
    eps: _Eps,
    top: float,
    exact: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(dx, g u)`` of a tile of rows: the input gradient (saturated at ``top``) and
    each entry's share of the scale's gradient ``g u``, ``u = x / d``, as two float32
    arrays (an exact pair for float32 data; the second None for half data). ``exact``
    (float32 data): ``w g``, ``<w g, x'>`` and ``K' x'`` as exact pairs, the difference
    error-free, one rounding; half data: in float32, within a few ``2**-24`` of the
    slice's ``max |w g| / d``."""
    rows = _scaled_rows(x, eps.cap)
    xs = rows.xs
    terms = _slice_terms(mode, eps, _square_sum(xs, exact), rows)
    if not exact:
        sigma = g if w is None else w * g
        k = (terms.r_over_n2 * _row_sum(sigma * xs, None)).hi
        dx = (sigma - jnp.where(terms.positive, k, 0.0) * xs) * terms.inv_hi
    else:
        s_hi, s_lo = (g, None) if w is None else two_prod(w, g, _split)
        p, e = two_prod(s_hi, xs, _split)
        k = terms.r_over_n2 * _row_sum(p, e if s_lo is None else e + s_lo * xs)
        k_hi = jnp.where(terms.positive, k.hi, 0.0)
        k_lo = jnp.where(terms.positive, k.lo, 0.0)
        # t = w g - K' x' with every product exact and the difference error-free.
        p, e = two_prod(k_hi, xs, _split)
        t, err = two_sum(s_hi, -p)
        t_lo = err - e - k_lo * xs if s_lo is None else err + ((s_lo - e) - k_lo * xs)
        q, f = two_prod(t, terms.inv_hi, _split)
        dx = q + (f + (t * terms.inv_lo + t_lo * terms.inv_hi))
    dx = jnp.where(rows.inf, 0.0, _saturate(_ldexp(dx, terms.out + rows.shift), top))
    dx = jnp.where(rows.nan, jnp.nan, dx)
    if not exact:
        u = _ldexp(xs * terms.inv_hi, terms.out)
        return dx, jnp.where(rows.nan, jnp.nan, g * u), None
    # g u = g x' G 2**out as a pair: x' G exact, g times it exact to 2**-44.
    p, e = two_prod(xs, terms.inv_hi, _split)
    u_hi, u_lo = _ldexp(p, terms.out), _ldexp(e + xs * terms.inv_lo, terms.out)
    q, f = two_prod(g, u_hi, _split)
    return dx, jnp.where(rows.nan, jnp.nan, q), f + g * u_lo


# --------------------------------------------------------------------------- kernels


class _Static(NamedTuple):
    """What a kernel is specialised on (hashable: kernels are cached by it)."""

    rows: int  # the array's rows
    length: int  # the row width
    dtype: str
    has_scale: bool
    mode: str
    eps: float
    platform: str  # "cuda", "rocm" or "tpu": which kernel shape
    interpret: bool


def _top(dtype: str) -> float:
    info = ml_dtypes.finfo(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.finfo(dtype)
    return float(info.max)


def _triton_io(static: _Static, cfg: BlockConfig) -> tuple[Callable, Callable]:
    """Masked loads and stores of a program's ``(R, W)`` tile on a whole-array ref
    (Pallas' Triton backend: every tensor a power of two, no bounds checks)."""
    from jax.experimental.pallas import triton as pltriton

    def indices() -> tuple[Any, Any, jax.Array]:
        start = pl.program_id(0) * cfg.rows
        row = start + lax.broadcasted_iota(_I32, (cfg.rows, cfg.width), 0)
        col = lax.broadcasted_iota(_I32, (cfg.rows, cfg.width), 1)
        mask = (row < static.rows) & (col < static.length)
        return pl.ds(start, cfg.rows), pl.ds(0, cfg.width), mask

    def load(ref: Any) -> tuple[jax.Array, jax.Array]:
        rows, cols, mask = indices()
        v = pltriton.load(ref.at[rows, cols], mask=mask, other=0)
        return _read(v), mask

    def store(ref: Any, v: jax.Array) -> None:
        rows, cols, mask = indices()
        pltriton.store(ref.at[rows, cols], v.astype(ref.dtype), mask=mask)

    return load, store


def _tpu_io(static: _Static, cfg: BlockConfig) -> tuple[Callable, Callable]:
    """Loads and stores of a program's block (Mosaic: BlockSpecs, the last block padded;
    the padding is masked to 0 before any arithmetic)."""

    def load(ref: Any) -> tuple[jax.Array, jax.Array]:
        shape = (cfg.rows, cfg.width)
        row = pl.program_id(0) * cfg.rows + lax.broadcasted_iota(_I32, shape, 0)
        col = lax.broadcasted_iota(_I32, shape, 1)
        mask = (row < static.rows) & (col < static.length)
        return jnp.where(mask, _read(ref[...]), 0.0), mask

    def store(ref: Any, v: jax.Array) -> None:
        ref[...] = v.astype(ref.dtype)

    return load, store


def _io(static: _Static, cfg: BlockConfig) -> tuple[Callable, Callable]:
    if static.platform == "tpu":
        return _tpu_io(static, cfg)
    return _triton_io(static, cfg)


def _call(
    static: _Static,
    body: Callable,
    operands: Sequence[jax.Array],
    out_shape: Any,
    row_blocked: Sequence[bool],
    out_row_blocked: Sequence[bool],
    heavy: bool = False,
) -> Any:
    """``pallas_call`` of ``body`` over ``cdiv(rows, R)`` programs, with the platform's
    block specs and compiler parameters (``heavy``: :func:`block_config`'s)."""
    cfg = block_config(static.length, static.platform, heavy)
    grid = (pl.cdiv(static.rows, cfg.rows),)
    if static.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        def spec(blocked: bool, ndim: int) -> pl.BlockSpec:
            if blocked:
                return pl.BlockSpec((cfg.rows, cfg.width), lambda i: (i, 0))
            if ndim == 3:  # a pair of rows of partials per program
                return pl.BlockSpec((None, 2, cfg.width), lambda i: (i, 0, 0))
            return pl.BlockSpec((1, cfg.width), lambda i: (0, 0))

        outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
        out_specs = tuple(spec(b, len(o.shape)) for b, o in zip(out_row_blocked, outs, strict=True))
        return pl.pallas_call(
            body,
            out_shape=out_shape,
            grid=grid,
            in_specs=[spec(b, 2) for b in row_blocked],
            out_specs=out_specs if isinstance(out_shape, tuple) else out_specs[0],
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
            interpret=static.interpret,
            name="l2norm",
        )(*operands)
    from jax.experimental.pallas import triton as pltriton

    return pl.pallas_call(
        body,
        out_shape=out_shape,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=static.interpret,
        name="l2norm",
    )(*operands)


def _scale_row(static: _Static, w_ref: Any, cfg: BlockConfig) -> jax.Array:
    """The scale along the row, ``(1, W)`` float32 (padded with zeros by the wrapper)."""
    if static.platform == "tpu":
        return w_ref[...]
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(w_ref.at[pl.ds(0, 1), pl.ds(0, cfg.width)])


def _kernel_setup(static: _Static) -> tuple[BlockConfig, EpsMode, _Eps, Callable, Callable]:
    """What both kernels take from ``static``: the tile, the placement and its eps for
    rows of ``L`` entries (a mean's ``N``), the loads and the stores."""
    cfg = block_config(static.length, static.platform)
    mode = get_mode(static.mode)
    return cfg, mode, _eps_parts(mode, static.eps, static.length), *_io(static, cfg)


def _forward_kernel(static: _Static) -> Callable:
    cfg, mode, eps, load, store = _kernel_setup(static)

    def body(*refs: Any) -> None:
        x_ref, *w_refs, y_ref = refs
        x, _ = load(x_ref)
        w = _scale_row(static, w_refs[0], cfg) if w_refs else None
        store(y_ref, _forward_rows(x, w, mode, eps, static.dtype == "float32"))

    return body


def _backward_kernel(static: _Static) -> Callable:
    cfg, mode, eps, load, store = _kernel_setup(static)
    top = _top(static.dtype)

    def body(*refs: Any) -> None:
        x_ref, g_ref, *w_refs, dx_ref, dw_ref = refs
        x, mask = load(x_ref)
        g, _ = load(g_ref)
        w = _scale_row(static, w_refs[0], cfg) if w_refs else None
        dx, gu_hi, gu_lo = _backward_rows(x, g, w, mode, eps, top, static.dtype == "float32")
        store(dx_ref, dx)
        # The program's rows of the scale's gradient as a pair of rows: summed by
        # extraction (float32 data) or plainly (half data: far inside its 2 eps); the
        # padding rows (garbage beyond the array on TPUs) must not reach the sums.
        if w is None:
            hi = lo = jnp.zeros((1, cfg.width), _F32)
        elif gu_lo is None:
            hi = jnp.sum(jnp.where(mask, gu_hi, 0.0), axis=0, keepdims=True)
            lo = jnp.zeros_like(hi)
        else:
            zero = jnp.zeros_like(gu_hi)
            total = _extract_sum(
                jnp.where(mask, gu_hi, zero), jnp.where(mask, gu_lo, zero), 0, 2.0**-10
            )
            hi, lo = total.hi, total.lo
        if static.platform == "tpu":
            dw_ref[0:1, :] = hi
            dw_ref[1:2, :] = lo
        else:
            from jax.experimental.pallas import triton as pltriton

            for half, v in enumerate((hi, lo)):
                pltriton.store(dw_ref.at[pl.program_id(0), pl.ds(half, 1), pl.ds(0, cfg.width)], v)

    return body


def _rows_forward(static: _Static, x: jax.Array, w: jax.Array | None) -> jax.Array:
    """The forward kernel on ``x`` of shape ``(rows, L)``; ``w`` a ``(1, W)`` row or None."""
    operands = [x] if w is None else [x, w]
    return _call(
        static,
        _forward_kernel(static),
        operands,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        [True] + [False] * (w is not None),
        [True],
    )


def _rows_vjp(
    static: _Static, x: jax.Array, g: jax.Array, w: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """``(dx, partials)`` on ``(rows, L)``: ``partials`` ``(programs, 2, W)`` float32,
    each program's share of the scale's gradient as a pair of rows."""
    cfg = block_config(static.length, static.platform)
    programs = pl.cdiv(static.rows, cfg.rows)
    operands = [x, g] if w is None else [x, g, w]
    return _call(
        static,
        _backward_kernel(static),
        operands,
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((programs, 2, cfg.width), _F32),
        ),
        [True, True] + [False] * (w is not None),
        [True, False],
        heavy=static.dtype == "float32",
    )


# --------------------------------------------------------------------------- wrappers


class _Layout(NamedTuple):
    """How an array is viewed as rows: its normalized axes moved last (the channel axis
    first among them) and flattened."""

    order: tuple[int, ...]  # the transpose to rows
    rows: int
    length: int
    channels: int
    inner: int  # entries per channel within a row (1 for one normalized axis)


def _layout(shape: tuple[int, ...], channel: int, norm_axes: Sequence[int] | None) -> _Layout:
    ndim = len(shape)
    channel %= ndim
    norm = [channel] + sorted({a % ndim for a in (norm_axes or (channel,))} - {channel})
    order = tuple(a for a in range(ndim) if a not in norm) + tuple(norm)
    length = math.prod(shape[a] for a in norm)
    rows = math.prod(shape) // max(length, 1)
    return _Layout(order, rows, length, shape[channel], length // max(shape[channel], 1))


def _platforms(platform: str | None, interpret: bool) -> str | None:
    if platform is None:
        return "tpu" if interpret else None
    if platform not in PLATFORMS:
        raise ValueError(f"no Pallas kernel for platform {platform!r}; expected one of {PLATFORMS}")
    return platform


def _scale_row_array(s: Any, lay: _Layout, width: int) -> jax.Array | None:
    """The scale along a row, ``(1, width)`` float32 zero-padded, or None (no scale)."""
    if s is None:
        return None
    s = jnp.asarray(s, _F32).reshape(-1)
    per_entry = jnp.broadcast_to(s[:, None], (lay.channels, lay.inner)) if s.size > 1 else None
    row = (
        per_entry.reshape(-1)
        if per_entry is not None
        else jnp.broadcast_to(s.reshape(()), (lay.length,))
    )
    return jnp.pad(row, (0, width - lay.length)).reshape(1, width)


def _dispatch(run: Callable, platform: str | None, interpret: bool, *args: Any) -> Any:
    """``run(platform, ...)`` for the platform given, or chosen while lowering: the
    Triton kernel on GPUs, Mosaic on TPUs, the TPU kernel interpreted elsewhere."""
    chosen = _platforms(platform, interpret)
    if chosen is not None:
        return run(chosen, interpret, *args)
    return lax.platform_dependent(
        *args,
        cuda=functools.partial(run, "cuda", False),
        rocm=functools.partial(run, "rocm", False),
        tpu=functools.partial(run, "tpu", False),
        default=functools.partial(run, "tpu", True),
    )


def _check(x: jax.Array, lay: _Layout) -> None:
    dtype = jnp.dtype(x.dtype).name
    if dtype not in DTYPES:
        raise TypeError(f"the Pallas kernels take {DTYPES}, got {dtype}")
    if not fits(lay.length):
        raise ValueError(
            f"rows of {lay.length} entries: the Pallas kernels take 1 to {MAX_WIDTH} "
            "(wider slices take the ladder lowering)"
        )


def _to_rows(a: jax.Array, lay: _Layout) -> jax.Array:
    return jnp.transpose(a, lay.order).reshape(lay.rows, lay.length)


def _from_rows(v: jax.Array, like: jax.Array, lay: _Layout) -> jax.Array:
    """``v`` (rows) back in the layout of ``like``."""
    shape = [like.shape[a] for a in lay.order]
    return jnp.transpose(v.reshape(shape), np.argsort(lay.order))


def _prepare(
    lay: _Layout, x: jax.Array, scale: tuple, options: tuple
) -> tuple[_Static, jax.Array | None]:
    """The kernel's static parameters (``options``: eps_mode, eps, platform, interpret)
    and the scale along a row (None without one)."""
    eps_mode, eps, platform, interpret = options
    static = _Static(
        lay.rows,
        lay.length,
        jnp.dtype(x.dtype).name,
        bool(scale),
        eps_mode,
        eps,
        platform,
        interpret,
    )
    width = block_config(lay.length, platform).width
    return static, (_scale_row_array(scale[0], lay, width) if scale else None)


def forward(
    x: jax.Array,
    s: Any,
    *,
    channel: int,
    eps_mode: str,
    eps: float,
    interpret: bool = False,
    platform: str | None = None,
    norm_axes: Sequence[int] | None = None,
) -> jax.Array:
    """``y = s x / d(||x||)`` over ``channel`` (and ``norm_axes``, if given) by the Pallas
    forward kernel; ``y`` has ``x``'s dtype.

    Args:
        x: float32, bfloat16 or float16, normalized size at most :data:`MAX_WIDTH`.
        s: None, a one-element scale, or one value per channel (any float dtype; used in
            float32).
        channel: the axis a per-channel scale runs along (normalized).
        eps_mode, eps: the placement (:mod:`l2norm.core.modes`) and its epsilon.
        interpret: run in Pallas' interpret mode (any platform; the CPU tests).
        platform: ``"cuda"``, ``"rocm"`` or ``"tpu"``: that platform's kernel; None:
            chosen while lowering (``lax.platform_dependent``), the TPU kernel interpreted
            on other platforms (or with ``interpret``).
        norm_axes: all normalized axes (the channel axis among them), default
            ``(channel,)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[3.0, 4.0]], jnp.bfloat16)
        >>> forward(x, jnp.array([20.0, 10.0]), channel=-1, eps_mode="add_norm", eps=1e-10,
        ...         interpret=True)
        Array([[12, 8]], dtype=bfloat16)
    """
    x = jnp.asarray(x)
    lay = _layout(x.shape, channel, norm_axes)
    _check(x, lay)
    if x.size == 0:
        return x

    def run(plat: str, interp: bool, x: jax.Array, *scale: jax.Array) -> jax.Array:
        static, w = _prepare(lay, x, scale, (eps_mode, eps, plat, interp))
        return _from_rows(_rows_forward(static, _to_rows(x, lay), w), x, lay)

    args = (x,) if s is None else (x, jnp.asarray(s, _F32))
    return _dispatch(run, platform, interpret, *args)


def vjp(
    x: jax.Array,
    s: Any,
    g: jax.Array,
    *,
    channel: int,
    eps_mode: str,
    eps: float,
    interpret: bool = False,
    platform: str | None = None,
    norm_axes: Sequence[int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(dx, ds)`` of :func:`forward` for the cotangent ``g``: ``dx`` in ``x``'s dtype,
    ``ds`` the scale's gradient *per channel* in float32 (``sum g x / d`` over all but
    the channel axis, summed in a fixed order: a shared scale's gradient is its sum;
    zeros when ``s`` is None). Arguments as :func:`forward`.

    The JAX primitives' tangent ``s J tx + ts u`` follows from it (``J`` is symmetric):
    ``J tx`` is ``vjp(x, None, tx)[0]`` and ``u`` is ``forward(x, None)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> dx, ds = vjp(jnp.zeros((1, 3)), 2.0, jnp.ones((1, 3)), channel=1,
        ...              eps_mode="add_norm", eps=0.5, interpret=True)
        >>> dx  # finite at zero: scale * cotangent / eps
        Array([[4., 4., 4.]], dtype=float32)
    """
    x, g = jnp.asarray(x), jnp.asarray(g)
    lay = _layout(x.shape, channel, norm_axes)
    _check(x, lay)
    if x.size == 0:
        return jnp.zeros_like(x), jnp.zeros((lay.channels,), _F32)

    def run(plat: str, interp: bool, x: jax.Array, g: jax.Array, *scale: jax.Array):
        static, w = _prepare(lay, x, scale, (eps_mode, eps, plat, interp))
        rows, g_rows = _to_rows(x, lay), _to_rows(g.astype(x.dtype), lay)
        dx, partials = _rows_vjp(static, rows, g_rows, w)
        dx = _from_rows(dx, x, lay)
        # Over the programs, then over the entries of a channel within a row, as pairs.
        per_entry = _extract_sum(
            partials[:, 0, : lay.length], partials[:, 1, : lay.length], 0, 2.0**-4
        )
        hi = per_entry.hi.reshape(lay.channels, lay.inner)
        per_channel = _extract_sum(hi, per_entry.lo.reshape(hi.shape), 1, 2.0**-4)
        return dx, (per_channel.hi + per_channel.lo).reshape(-1)

    args = (x, g) if s is None else (x, g, jnp.asarray(s, _F32))
    return _dispatch(run, platform, interpret, *args)
