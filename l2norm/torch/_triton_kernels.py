"""The Triton kernels of the ``triton`` lowering (:mod:`l2norm.torch._triton` launches them).

One program holds a tile of ``BLOCK_C`` channels x ``BLOCK_S`` slices of a tensor seen as
``(outer, C, inner)``: NCHW pixels (``inner > 1``, the slices of one sample's block of
pixels, contiguous along the tile's second axis) or rows (``inner == 1``: channels-last
activations and ``(N, C)`` features, contiguous along the channels). Where ``C`` fits one
chunk (``SINGLE``) the tile is read once and stays in registers; wider slices are walked
in chunks of ``BLOCK_C`` channels, once per pass (largest magnitude, sums, outputs), the
later passes from cache, each pass adding entry by entry in registers and reducing
across threads once.

Every operation on an entry is a float32 operation; float64 appears once per slice (the
eps placement of :mod:`l2norm.core.modes`, given as ``IS_ADD`` / ``POWER`` / ``MEAN``, with
reciprocal square roots refined by a Newton step). A mean placement (``sqrt(n**2 / N +
eps)``, ``N`` the slice size C) is the sum's in other units, ``sqrt(n**2 + N eps) /
sqrt(N)``: the launcher stores ``N eps`` and ``sqrt(N)`` in float64 (``sqrt(N)`` is
``EpsMode.inf_limit``; an Inf slice's ``sqrt(N / k)`` is ``N / sqrt(N k)``), so ``1 / d``
takes one more float64 rounding and ``r / n**2 = 1 / (N d**2) = 1 / (n**2 + N eps)`` none;
the other placements compile without it.

Why each output stays within 1 ULP of the exact result ``y*`` (``u = 2**-24``; a float32
result ``RN(y~)`` with ``|y~ - y*| < u |y*|`` is within 1 ULP of ``RN(y*)``, and so is any
half result with ``|y~ - y*| < 2**-11 |y*|``):

* **Sum of squares.** Each slice is multiplied by ``2**s`` from its largest magnitude
  (``max |x 2**s|`` in ``[1/4, 1/2)``): exact, except entries below ``2**-126`` after
  scaling, whose squares are below ``2**-248`` of the sum. No square overflows. A
  float32 square is split exactly (``p = x*x``, ``e = fma(x, x, -p)``) and added to a
  double-float with TwoSum (error-free for the high parts; the low parts, errors of at
  most ``u`` of the running sum, add plainly): compensated summation of nonnegative terms,
  relative error about ``(k u)**2`` for ``k`` additions in a row (``k`` at most
  ``C / 32`` plus the reduction tree's depth: ``2**-26`` at C = 65536), and the pair
  meets float64 exactly. A half square is exact in float32 and the plain float32 sum's
  ``k u`` (``2**-13`` at C = 65536) is inside float16's ``2**-11``.
* **Output.** ``1 / d`` (float64, relative error about half the sum's) is split into
  ``2**t`` and a double-float ``G`` in ``[2**-40, 2**22]``; ``w G`` is formed exactly as
  ``Mh + Ml`` (``Mh = w*Gh``, ``Ml = fma(w, Gh, -Mh) + w*Gl``: relative error ``2**-47``
  for ``|w| >= 2**-62``) and ``y = fma(x', Mh, x'*Ml)`` with ``x' = x 2**t`` exact:
  one rounding of a value within ``2**-26`` (C = 65536) to ``2**-44`` of ``y*`` (mostly
  the correctly rounded result). Where ``t < 0`` (slices whose norm passes ``2**40``) an
  entry whose ``x'`` falls below ``2**-126`` has ``|y*| < 2**-165 |w|``: it rounds to the
  same subnormal step for ``|w| < 2**23``. Half outputs take ``RN(x' RN(w Gh))`` (three
  float32 roundings). Subnormal outputs carry an absolute error below half their step.
* **Backward.** ``dx = (w g - K' x') I' 2**v`` with ``x' = x 2**s``, ``K' = r <w g, x'> /
  n'**2`` (scale-free: ``K' x' = k x``; the inner product summed as a double-float for
  float32) and ``1 / d = I' 2**v`` (``I'`` near 1, ``2**v`` subnormal where it must be):
  a few float32 roundings, relative to the slice's ``max |w g| / d`` (the suite's
  gradient measure, bound 2 machine epsilons of the dtype). The scale's gradient sums
  ``g u`` (``u = x' (2**-s / d)``) in float32 within a program, in float64 across programs.

Nothing depends on the batch: the tile shape and every reduction order are fixed by
``(C, layout, dtype)``. FP contraction is off at launch (``enable_fp_fusion=False``): the
only fused multiply-adds are the ``tl.fma`` written here, so a GPU computes the same
operations as Triton's interpreter; reductions may associate differently on a GPU, so GPU
bits can differ from the interpreter's (and the CPU kernel's) in the last place, within
the same bound.

NaN and Inf take no branch in the common path: a NaN flows through the arithmetic, a
slice holding +-Inf (its scaled sum is Inf) takes the reference's limit in a branch taken
only by tiles that hold one. bfloat16 is read through its bits (exact); it is written by
the GPU's round-to-nearest-even conversion, or from the bits where ``BF16_BITS`` (Triton's
interpreter rounds bfloat16 half up).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["backward_kernel", "forward_kernel"]


@triton.jit
def _program_base(pid_a, pid_b, C, stride_c, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The offset of the program's first entry (int64, once a program): the offsets within
    the program are 32-bit (the launcher takes samples of fewer than 2**31 entries)."""
    if ROWS:
        return pid_a.to(tl.int64) * BLOCK_S * C
    return pid_a.to(tl.int64) * C * stride_c + pid_b.to(tl.int64) * BLOCK_S


@triton.jit
def _offsets(
    pid_a,
    pid_b,
    C,
    stride_c,
    count,
    c,
    ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """The tile's element offsets ``[BLOCK_C, BLOCK_S]`` from the program's base (int32)
    and which of its slices exist (``count`` of them along the tile's axis). ``ALIGN``:
    how many entries each row of the tile starts a multiple of (16 bytes where the shape
    allows: vector loads)."""
    s = tl.arange(0, BLOCK_S)
    if ROWS:  # channels innermost: slice r starts at r * C
        offs = ((s * (C // ALIGN)) * ALIGN)[None, :] + c[:, None]
        first = pid_a * BLOCK_S
    else:  # NCHW: sample pid_a, pixels pid_b * BLOCK_S + arange
        offs = ((c * (stride_c // ALIGN)) * ALIGN)[:, None] + s[None, :]
        first = pid_b * BLOCK_S
    return offs, s < count - first


@triton.jit
def _chunk(tile, c0, ALIGN: tl.constexpr, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """The offsets, mask and channel validity of the chunk of channels from ``c0`` (the
    shift written as a multiple of ``ALIGN``, so that vector accesses stay provable;
    ``EVEN``: C is a multiple of the chunk, no channel mask). ``tile``: ``(offs, s_ok, c,
    C, stride_c)``, the tile's first-chunk offsets and existing slices (:func:`_offsets`),
    its channels ``arange(BLOCK_C)``, the channel count and stride."""
    offs, s_ok, c, C, stride_c = tile
    c_ok = (c0 + c) < C
    if EVEN:
        mask = s_ok[None, :] & (c >= 0)[:, None]
    else:
        mask = c_ok[:, None] & s_ok[None, :]
    if ROWS:  # channels contiguous: c0 is a multiple of the chunk
        return offs + c0, mask, c_ok
    return offs + (c0 * (stride_c // ALIGN)) * ALIGN, mask, c_ok


@triton.jit
def _load(ptr, offs, mask):
    """Entries in float32 (exact): bfloat16 through its bits, as the top half of a float32."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scale_of(w_ptr, c, c_ok, W_MODE: tl.constexpr):
    """The scale per channel in float32: 1 shared value or one per channel (``W_MODE``
    1 or 2; 0, no scale: ones, nothing read)."""
    if W_MODE == 0:
        return tl.full(c.shape, 1.0, tl.float32)
    if W_MODE == 1:
        return _load(w_ptr, c * 0, c_ok)
    return _load(w_ptr, c, c_ok)


@triton.jit
def _store(ptr, offs, mask, v, OUT_MAX: tl.constexpr, BF16_BITS: tl.constexpr):
    """Round ``v`` (float32) to the output dtype, to nearest even (bfloat16 from its bits
    where ``BF16_BITS``, NaN kept quiet), saturated at ``OUT_MAX`` where that is not 0 (the
    input gradient), NaN kept."""
    if OUT_MAX != 0:
        v = tl.where(v > OUT_MAX, OUT_MAX, tl.where(v < -OUT_MAX, -OUT_MAX, v))
    if ptr.dtype.element_ty == tl.bfloat16 and BF16_BITS:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        half = tl.where(nan, (bits >> 16) | 0x40, rounded)
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, half.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- powers of two


@triton.jit
def _pow2(e):
    """``2**e`` in float32 from its bits, for integers ``e`` in ``[-149, 127]`` (below -126
    a subnormal power of two: multiplying by it is exact wherever the product is)."""
    normal = (tl.maximum(e, -126) + 127) << 23
    subnormal = 1 << (tl.minimum(tl.maximum(e + 149, 0), 22))
    return tl.where(e >= -126, normal, subnormal).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_64(e):
    """``2**e`` in float64 from its bits, for integers ``e`` in ``[-1022, 1023]``."""
    return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _exponent_64(v):
    """``floor(log2 |v|)`` of a normal float64 (-1023 for 0, 1024 for Inf and NaN)."""
    return (((v.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023).to(tl.int32)


@triton.jit
def _sum_scale(largest):
    """The exponent ``s`` with ``largest * 2**s`` in ``[1/4, 1/2)`` (from ``largest``'s
    float32 exponent field; a subnormal or zero ``largest`` gets 125, Inf and NaN -130)."""
    biased = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return 125 - biased


@triton.jit
def _split(v):
    """A float64 as a double-float ``(hi, lo)`` of float32s."""
    hi = v.to(tl.float32)
    return hi, (v - hi.to(tl.float64)).to(tl.float32)


# --------------------------------------------------------------------------- sums


@triton.jit
def _two_sum(a_hi, a_lo, b_hi, b_lo):
    """Double-float addition: Knuth's TwoSum of the high parts (error-free) and the low
    parts added to the error. Additions only, so FP contraction cannot change it."""
    s = a_hi + b_hi
    bb = s - a_hi
    err = (a_hi - (s - bb)) + (b_hi - bb)
    return s, err + (a_lo + b_lo)


@triton.jit
def _add_products(acc_hi, acc_lo, a, b, EXACT: tl.constexpr):
    """``acc + a*b`` entry by entry: the exact product (``p = a*b``, ``e = fma(a, b, -p)``)
    added as a double-float where ``EXACT`` (float32 input), a plain fused multiply-add
    otherwise (a half square is exact in float32, its sum far inside 8 or 11 bits)."""
    if EXACT:
        p = a * b
        return _two_sum(acc_hi, acc_lo, p, tl.fma(a, b, -p))
    return tl.fma(a, b, acc_hi), acc_lo


@triton.jit
def _slice_sum(acc_hi, acc_lo, EXACT: tl.constexpr):
    """Per slice (the tile's columns), the sum of the entries' double-floats."""
    if EXACT:
        return tl.reduce((acc_hi, acc_lo), 0, _two_sum)
    return tl.sum(acc_hi, axis=0), tl.zeros([acc_hi.shape[1]], tl.float32)


@triton.jit
def _wide(hi, lo):
    """A double-float as one float64; an infinite high part stays infinite (TwoSum makes
    the low part of an Inf sum NaN, the sum of an Inf slice is Inf)."""
    wide = hi.to(tl.float64)
    return tl.where(hi == float("inf"), wide, wide + lo.to(tl.float64))


# --------------------------------------------------------------------------- per slice


@triton.jit
def _rsqrt(a):
    """``1 / sqrt(a)`` in float64 for a normal ``a > 0`` (NaN stays NaN): a float32 seed
    from the hardware's approximation of ``a 4**-k`` (in ``[1, 4)``, exact scaling) and two
    Newton steps in float64 (``2**-22`` -> ``2**-44`` -> float64's rounding). No
    division, no square root, no out-of-line slow path (nor the stack it would take)."""
    k = _exponent_64(a) >> 1
    seed = tl.math.rsqrt((a * _pow2_64(-2 * k)).to(tl.float32)).to(tl.float64)
    y = seed * _pow2_64(-k)
    y = tl.fma(y * 0.5, tl.fma(-(a * y), y, 1.0), y)
    return tl.fma(y * 0.5, tl.fma(-(a * y), y, 1.0), y)


@triton.jit
def _slice_terms(n2, eps, root, IS_ADD: tl.constexpr, POWER: tl.constexpr):
    """``(1 / d, r / n**2, Inf slice)`` per slice in float64, with ``r = n d'(n) / d(n)``:
    :class:`l2norm.core.modes.EpsMode`'s ``denominator`` and ``ratio`` (the CPU kernel's
    ``slice_terms``), written with reciprocal square roots only. ``eps`` and ``root`` as
    :func:`_placement` reads them (a mean: ``N eps`` and ``sqrt(N)``, ``1 / d`` times
    ``root``, ``r / n**2`` as for the sum)."""
    positive = n2 > 0.0
    rs = _rsqrt(tl.where(n2 == 0.0, 1.0, n2))  # 1 / n; NaN for a NaN slice
    n = tl.where(positive, n2 * rs, n2)  # keeps 0 and NaN
    if IS_ADD:
        if POWER == 1:
            d = n + eps
            inv_d = _rsqrt(d * d)
            r_over_n2 = inv_d * rs  # (n / d) / n**2
        else:
            inv_d = _rsqrt(n2 + eps)
            r_over_n2 = inv_d * inv_d  # (n**2 / d**2) / n**2
    else:
        if POWER == 1:
            below = eps > n  # False for a NaN n: the NaN flows on
            inv_d = tl.where(below, _rsqrt(eps * eps), rs)
        else:
            below = eps > n2
            inv_d = _rsqrt(tl.where(below, eps, n2))
        r_over_n2 = tl.where(below, 0.0, rs * rs)
    infinite = n2 == float("inf")
    r_over_n2 = tl.where(positive & ~infinite, r_over_n2, 0.0)
    return tl.where(infinite, 0.0, inv_d * root), r_over_n2, infinite


@triton.jit
def _output_factor(inv_d):
    """``(2**t, Gh, Gl)`` with ``1 / d = 2**t (Gh + Gl)`` and ``Gh + Gl`` near ``2**-40``
    (``t`` clamped to float32's normal powers: then ``G`` is at most ``2**22``)."""
    t = tl.minimum(tl.maximum(_exponent_64(inv_d) + 40, -126), 127)
    g_hi, g_lo = _split(inv_d * _pow2_64(-t))
    return _pow2(t), g_hi, g_lo


@triton.jit
def _scaled_output(xt, w, g_hi, g_lo, W_MODE: tl.constexpr, EXACT: tl.constexpr):
    """``xt * w * (Gh + Gl)`` rounded once to float32 (``xt = x 2**t`` or the limit
    direction): ``w G`` formed exactly as ``Mh + Ml`` where ``EXACT``."""
    if W_MODE == 0:
        m_hi = g_hi[None, :] + tl.zeros_like(xt)
        m_lo = g_lo[None, :] + tl.zeros_like(xt)
    else:
        m_hi = w[:, None] * g_hi[None, :]
        if EXACT:
            m_lo = tl.fma(w[:, None], g_lo[None, :], tl.fma(w[:, None], g_hi[None, :], -m_hi))
    if EXACT:
        return tl.fma(xt, m_hi, xt * m_lo)
    return xt * m_hi


# --------------------------------------------------------------------------- Inf slices


@triton.jit
def _limit(v):
    """The limit direction's sign pattern of an Inf slice: +-1 on its infinite entries,
    0 elsewhere."""
    return tl.where(v == float("inf"), 1.0, tl.where(v == -float("inf"), -1.0, 0.0))


@triton.jit
def _infinities(v):
    """Per slice, how many entries are +-Inf (float32: exact below 2**24)."""
    return tl.sum(tl.where(tl.abs(v) == float("inf"), 1.0, 0.0), axis=0)


@triton.jit
def _share(
    x_ptr,
    v,
    tile,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN: tl.constexpr,
    SINGLE: tl.constexpr,
    MEAN: tl.constexpr,
):
    """Per slice, ``EpsMode.inf_limit / sqrt(k)`` (``sqrt(N / k)`` for a ``MEAN``, N = C,
    else ``1 / sqrt(k)``) with ``k`` its number of infinities (counted in the kept tile
    ``v`` where ``SINGLE``, else over a walk of the chunks): an Inf slice's value on each
    of them, as a double-float (float64, once per slice). ``N`` comes from C here rather
    than from :func:`_placement`: a value held into this branch costs registers (sm_90,
    tests/test_triton_aot.py)."""
    if SINGLE:
        infinities = _infinities(v)
    else:
        infinities = tl.zeros([BLOCK_S], tl.float32)
        for c0 in range(0, tile[3], BLOCK_C):  # tile[3]: C
            at, mask, _ = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            infinities += _infinities(_load(x_ptr, at, mask))
    k = tl.maximum(infinities, 1.0).to(tl.float64)
    if MEAN:  # sqrt(N / k) = N / sqrt(N k) (N k exact), N = C
        size = tl.cast(tile[3], tl.float64)
        return _split(size * _rsqrt(k * size))
    return _split(_rsqrt(k))


@triton.jit
def _placement(eps_ptr, MEAN: tl.constexpr):
    """``(eps, root)`` in float64, as the launcher stores them: eps in the units of the sum
    of squares' placement (``N eps`` for a ``MEAN``) and ``n / d``'s limit for an infinite
    ``n`` (``sqrt(N)`` for a ``MEAN``, else 1: a product the compiler drops)."""
    root = 1.0
    if MEAN:
        root = tl.load(eps_ptr + 1)
    return tl.load(eps_ptr), root


# --------------------------------------------------------------------------- kernels


@triton.jit
def _first_pass(
    v,
    x_ptr,
    tile,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ALIGN: tl.constexpr,
    ROWS: tl.constexpr,
    EVEN: tl.constexpr,
    SINGLE: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Pass 1 of both kernels: ``(s, 2**s)`` per slice, the power of two of the slice's
    sum, from its largest magnitude: in the tile ``v`` read once where ``SINGLE``, else over
    a walk of the chunks (``s = 0`` unless ``SCALED``: a float16 square cannot overflow).
    NaN is ignored there: it flows through the sums anyway."""
    s = tl.zeros([BLOCK_S], tl.int32)
    if SINGLE:
        if SCALED:
            s = _sum_scale(tl.max(tl.abs(v), axis=0))
    elif SCALED:
        largest = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for c0 in range(0, tile[3], BLOCK_C):  # tile[3]: C
            at, mask, _ = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            largest = tl.maximum(largest, tl.abs(_load(x_ptr, at, mask)))
        s = _sum_scale(tl.max(largest, axis=0))
    return s, _pow2(s)[None, :]


@triton.jit
def forward_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    C,
    stride_c,
    count,
    eps_ptr,
    IS_ADD: tl.constexpr,
    POWER: tl.constexpr,
    MEAN: tl.constexpr,
    W_MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINGLE: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """``y = w * x / d(n)`` for one tile of slices: where the channels fit one chunk
    (``SINGLE``) the tile is read once and stays in registers; otherwise each pass walks
    the chunks, adding entry by entry, and reduces across threads once."""
    EXACT: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    SCALED: tl.constexpr = x_ptr.dtype.element_ty != tl.float16  # float16 squares fit
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    base = _program_base(pid_a, pid_b, C, stride_c, ROWS, BLOCK_S)
    x_ptr += base
    y_ptr += base
    c = tl.arange(0, BLOCK_C)
    offs, s_ok = _offsets(pid_a, pid_b, C, stride_c, count, c, ROWS, BLOCK_S, ALIGN)
    tile = (offs, s_ok, c, C, stride_c)
    v = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)  # the tile, where it is read once
    if SINGLE:
        at, mask, c_ok = _chunk(tile, 0, ALIGN, ROWS, EVEN)
        v = _load(x_ptr, at, mask)
    s, up = _first_pass(v, x_ptr, tile, BLOCK_C, BLOCK_S, ALIGN, ROWS, EVEN, SINGLE, SCALED)
    # Pass 2: the scaled sum of squares.
    zero = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    if SINGLE:
        xs = v * up
        hi, lo = _slice_sum(*_add_products(zero, zero, xs, xs, EXACT), EXACT)
    else:
        acc_hi, acc_lo = zero, zero
        for c0 in range(0, C, BLOCK_C):
            at, mask, c_ok = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            xs = _load(x_ptr, at, mask) * up
            acc_hi, acc_lo = _add_products(acc_hi, acc_lo, xs, xs, EXACT)
        hi, lo = _slice_sum(acc_hi, acc_lo, EXACT)
    n2 = _wide(hi, lo) * _pow2_64(-2 * s)
    eps, root = _placement(eps_ptr, MEAN)
    inv_d, _, infinite = _slice_terms(n2, eps, root, IS_ADD, POWER)
    scale_t, g_hi, g_lo = _output_factor(inv_d)
    any_inf = tl.max(infinite.to(tl.int32), axis=0) > 0
    if any_inf:  # Inf slices: the limit direction on their infinities
        share_hi, share_lo = _share(
            x_ptr, v, tile, BLOCK_C, BLOCK_S, ALIGN, ROWS, EVEN, SINGLE, MEAN
        )
        g_hi = tl.where(infinite, share_hi, g_hi)
        g_lo = tl.where(infinite, share_lo, g_lo)
    # Pass 3: the outputs.
    terms = (scale_t, g_hi, g_lo, infinite, any_inf)
    if SINGLE:
        _forward_chunk(v, w_ptr, y_ptr, at, mask, c, c_ok, terms, W_MODE, EXACT, BF16_BITS)
    else:
        for c0 in range(0, C, BLOCK_C):
            at, mask, c_ok = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            v = _load(x_ptr, at, mask)
            _forward_chunk(v, w_ptr, y_ptr, at, mask, c0 + c, c_ok, terms, W_MODE, EXACT, BF16_BITS)


@triton.jit
def _forward_chunk(
    v,
    w_ptr,
    y_ptr,
    at,
    mask,
    channel,
    c_ok,
    terms,
    W_MODE: tl.constexpr,
    EXACT: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """Store a chunk's outputs ``(x 2**t) (w G)`` (the limit direction in Inf slices)."""
    scale_t, g_hi, g_lo, infinite, any_inf = terms
    xt = v * scale_t[None, :]
    if any_inf:
        xt = tl.where(infinite[None, :], _limit(v), xt)
    w = _scale_of(w_ptr, channel, c_ok, W_MODE)
    _store(y_ptr, at, mask, _scaled_output(xt, w, g_hi, g_lo, W_MODE, EXACT), 0.0, BF16_BITS)


@triton.jit
def _backward_factors(n2, ip, s, eps, root, IS_ADD: tl.constexpr, POWER: tl.constexpr):
    """Per slice: ``K' = r <w g, x'> / n'**2`` (scale-free: ``K' x' = k x``), ``1 / d`` as
    ``I' 2**v`` (``I'`` near 1; ``2**v`` subnormal where it must be), ``F = 2**-s / d``
    (``u = x' F``) and the Inf flag."""
    inv_d, r_over_n2, infinite = _slice_terms(n2, eps, root, IS_ADD, POWER)
    k = (r_over_n2 * _pow2_64(-2 * s) * ip).to(tl.float32)
    v = tl.minimum(tl.maximum(_exponent_64(inv_d), -149), 127)
    inv_i = (inv_d * _pow2_64(-v)).to(tl.float32)
    f = (inv_d * _pow2_64(-s)).to(tl.float32)
    return k, inv_i, _pow2(v), f, infinite


@triton.jit
def _sigma(gv, w, W_MODE: tl.constexpr):
    """``w g`` (float32, rounded once)."""
    if W_MODE == 0:
        return gv
    return w[:, None] * gv


@triton.jit
def backward_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    dw_ptr,
    w_ptr,
    C,
    stride_c,
    count,
    eps_ptr,
    IS_ADD: tl.constexpr,
    POWER: tl.constexpr,
    MEAN: tl.constexpr,
    W_MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINGLE: tl.constexpr,
    ALIGN: tl.constexpr,
    EVEN: tl.constexpr,
    BF16_BITS: tl.constexpr,
    NEED_DW: tl.constexpr,
    OUT_MAX: tl.constexpr,
):
    """``dx = (w g - (r / n**2) <w g, x> x) / d`` for one tile of slices, and the tile's
    share of the scale's gradient per channel (``sum g u``, float32 within the tile) in its
    own row of ``dw_ptr`` (float64 rows, summed in a fixed order afterwards: no atomics,
    deterministic)."""
    EXACT: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    SCALED: tl.constexpr = x_ptr.dtype.element_ty != tl.float16
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    base = _program_base(pid_a, pid_b, C, stride_c, ROWS, BLOCK_S)
    x_ptr += base
    g_ptr += base
    dx_ptr += base
    c = tl.arange(0, BLOCK_C)
    offs, s_ok = _offsets(pid_a, pid_b, C, stride_c, count, c, ROWS, BLOCK_S, ALIGN)
    tile = (offs, s_ok, c, C, stride_c)
    v = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)  # the tile, where it is read once
    if SINGLE:
        at, mask, c_ok = _chunk(tile, 0, ALIGN, ROWS, EVEN)
        v = _load(x_ptr, at, mask)
        gv = _load(g_ptr, at, mask)
        w = _scale_of(w_ptr, c, c_ok, W_MODE)
    s, up = _first_pass(v, x_ptr, tile, BLOCK_C, BLOCK_S, ALIGN, ROWS, EVEN, SINGLE, SCALED)
    zero = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    if SINGLE:
        xs = v * up
        hi, lo = _slice_sum(*_add_products(zero, zero, xs, xs, EXACT), EXACT)
        ip_hi, ip_lo = _slice_sum(
            *_add_products(zero, zero, _sigma(gv, w, W_MODE), xs, EXACT), EXACT
        )
    else:
        acc_hi, acc_lo, ip_acc_hi, ip_acc_lo = zero, zero, zero, zero
        for c0 in range(0, C, BLOCK_C):
            at, mask, c_ok = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            xs = _load(x_ptr, at, mask) * up
            sigma = _sigma(_load(g_ptr, at, mask), _scale_of(w_ptr, c0 + c, c_ok, W_MODE), W_MODE)
            acc_hi, acc_lo = _add_products(acc_hi, acc_lo, xs, xs, EXACT)
            ip_acc_hi, ip_acc_lo = _add_products(ip_acc_hi, ip_acc_lo, sigma, xs, EXACT)
        hi, lo = _slice_sum(acc_hi, acc_lo, EXACT)
        ip_hi, ip_lo = _slice_sum(ip_acc_hi, ip_acc_lo, EXACT)
    n2 = _wide(hi, lo) * _pow2_64(-2 * s)
    eps, root = _placement(eps_ptr, MEAN)
    k, inv_i, scale_v, f, infinite = _backward_factors(
        n2, _wide(ip_hi, ip_lo), s, eps, root, IS_ADD, POWER
    )
    any_inf = tl.max(infinite.to(tl.int32), axis=0) > 0
    share_hi = tl.zeros([BLOCK_S], tl.float32)
    if any_inf:  # the scale's gradient of an Inf slice: g times its limit direction
        share_hi = _share(x_ptr, v, tile, BLOCK_C, BLOCK_S, ALIGN, ROWS, EVEN, SINGLE, MEAN)[0]
    row = pid_a.to(tl.int64) * tl.num_programs(1) + pid_b
    terms = (up, k, inv_i, scale_v, f, infinite, share_hi, any_inf)
    if SINGLE:
        _backward_chunk(
            v,
            gv,
            w,
            at,
            mask,
            c_ok,
            c,
            dx_ptr,
            dw_ptr,
            row,
            C,
            terms,
            W_MODE,
            NEED_DW,
            OUT_MAX,
            BF16_BITS,
        )
    else:
        for c0 in range(0, C, BLOCK_C):
            at, mask, c_ok = _chunk(tile, c0, ALIGN, ROWS, EVEN)
            v = _load(x_ptr, at, mask)
            gv = _load(g_ptr, at, mask)
            w = _scale_of(w_ptr, c0 + c, c_ok, W_MODE)
            _backward_chunk(
                v,
                gv,
                w,
                at,
                mask,
                c_ok,
                c0 + c,
                dx_ptr,
                dw_ptr,
                row,
                C,
                terms,
                W_MODE,
                NEED_DW,
                OUT_MAX,
                BF16_BITS,
            )


@triton.jit
def _backward_chunk(
    v,
    gv,
    w,
    at,
    mask,
    c_ok,
    channel,
    dx_ptr,
    dw_ptr,
    row,
    C,
    terms,
    W_MODE: tl.constexpr,
    NEED_DW: tl.constexpr,
    OUT_MAX: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """Store a chunk's ``dx = (w g - K' x') I' 2**v`` (0 in Inf slices) and its row of the
    scale's gradient (``sum g u`` over the tile's slices, ``u = x' F`` or the limit
    direction)."""
    up, k, inv_i, scale_v, f, infinite, share_hi, any_inf = terms
    xs = v * up
    t = tl.fma(-k[None, :], xs, _sigma(gv, w, W_MODE))
    dx = (t * inv_i[None, :]) * scale_v[None, :]
    if any_inf:
        dx = tl.where(infinite[None, :], 0.0, dx)
    _store(dx_ptr, at, mask, dx, OUT_MAX, BF16_BITS)
    if NEED_DW:
        u = xs * f[None, :]
        if any_inf:
            u = tl.where(infinite[None, :], _limit(v) * share_hi[None, :], u)
        share_dw = tl.sum(tl.where(mask, gv * u, 0.0), axis=1)
        tl.store(dw_ptr + row * C + channel, share_dw.to(tl.float64), mask=c_ok)
