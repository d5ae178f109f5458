"""The Triton kernels of the ``triton`` lowering (:mod:`l2norm.torch._triton` launches them).

One program holds a tile of ``BLOCK_C`` channels x ``BLOCK_S`` slices of a tensor seen as
``(outer, C, inner)``: NCHW pixels (``inner > 1``, the slices of one sample's block of
pixels, contiguous along the tile's second axis) or rows (``inner == 1``: channels-last
activations and ``(N, C)`` features, contiguous along the channels). The channel
reduction stays in registers; where ``C`` exceeds one tile the program walks the channels
twice, the second time from cache.

The arithmetic is the native CPU kernel's (``l2norm/_native/kernel.h``), so both lower
the core the same way: half and float32 inputs are widened to float64, where every square
is exact and no finite slice overflows or underflows (the one-rung ladder of
:mod:`l2norm._ladder`); the per-slice terms are the table of :mod:`l2norm._modes`, given
as ``IS_ADD`` / ``POWER`` (:attr:`~l2norm._modes.EpsMode.kernel_code`); each output is
rounded once to float32 (then to the half dtype, as the CPU kernel stores). NaN and Inf
take no branch: a NaN flows through the arithmetic, a slice holding +-Inf (its sum is Inf)
takes the reference's limit by selects. Each slice's sums depend on ``C`` alone (the tile
height and reduction order are fixed per ``C``), so a sample's result never depends on
the rest of the batch.

bfloat16 is read and written through its bits (the CPU kernel's conversions): Triton's
interpreter, which runs these kernels on CPU tensors in the tests, has no exact bfloat16
conversion of its own (it rounds half up and mishandles subnormals).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["backward_kernel", "forward_kernel"]


@triton.jit
def _offsets(pid_a, pid_b, C, stride_c, count, c, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """The tile's element offsets ``[BLOCK_C, BLOCK_S]`` (int64: tensors beyond 2**31
    entries) and which of its slices exist (``count`` of them along the tile's axis)."""
    if ROWS:  # channels innermost: slice r starts at r * C
        s = pid_a.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = s[None, :] * C + c[:, None]
    else:  # NCHW: sample pid_a, pixels pid_b * BLOCK_S + arange
        s = pid_b.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs = pid_a.to(tl.int64) * C * stride_c + c[:, None] * stride_c + s[None, :]
    return offs, s < count


@triton.jit
def _chunk(offs, s_ok, c, c0, C, stride_c):
    """The offsets, mask and channel validity of the chunk of channels from ``c0``."""
    c_ok = (c0 + c) < C
    return offs + c0 * stride_c, c_ok[:, None] & s_ok[None, :], c_ok


@triton.jit
def _load(ptr, offs, mask):
    """Entries in float64 (exact): bfloat16 through its bits, as the top half of a float32."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=0)
        wide = (bits.to(tl.int32) & 0xFFFF) << 16
        return wide.to(tl.float32, bitcast=True).to(tl.float64)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def _scale_of(w_ptr, c, c_ok, W_MODE: tl.constexpr):
    """The scale per channel in float64: 0 none, 1 one shared value, 2 one per channel."""
    if W_MODE == 0:
        return tl.full(c.shape, 1.0, tl.float64)
    if W_MODE == 1:
        return _load(w_ptr, c * 0, c_ok)
    return _load(w_ptr, c, c_ok)


@triton.jit
def _slice_terms(n2, count_inf, eps, IS_ADD: tl.constexpr, POWER: tl.constexpr):
    """``(1 / d, r / n**2, Inf slice, 1 / sqrt(number of infinities))`` per slice, with
    ``r = n d'(n) / d(n)``: :class:`l2norm._modes.EpsMode`'s ``denominator`` and
    ``ratio``."""
    n = tl.sqrt(n2)
    if IS_ADD:
        if POWER == 1:
            d = n + eps
            r = n / d
        else:
            d = tl.sqrt(n2 + eps)
            r = n2 / (d * d)
    else:
        if POWER == 1:
            np_ = n
        else:
            np_ = n2
        dp = tl.where(eps > np_, eps, np_)  # keeps a NaN np_
        if POWER == 1:
            d = dp
        else:
            d = tl.sqrt(dp)
        r = tl.where(np_ >= eps, 1.0, 0.0)
    infinite = n2 == float("inf")
    inv_d = tl.where(infinite, 0.0, 1.0 / d)
    r_over_n2 = tl.where(n2 > 0.0, r / tl.where(n2 > 0.0, n2, 1.0), 0.0)
    r_over_n2 = tl.where(infinite, 0.0, r_over_n2)
    share = 1.0 / tl.sqrt(tl.maximum(count_inf, 1.0))
    return inv_d, r_over_n2, infinite, share


@triton.jit
def _limit(x, share):
    """The limit direction of an Inf slice: +-share on its infinite entries, 0 elsewhere."""
    return tl.where(x == float("inf"), share, tl.where(x == -float("inf"), -share, 0.0))


@triton.jit
def _square_sums(v):
    """Per slice of the tile: the sum of squares and the number of infinities."""
    infinite = tl.where(tl.abs(v) == float("inf"), 1.0, 0.0)
    return tl.sum(v * v, axis=0), tl.sum(infinite, axis=0)


@triton.jit
def _unit(v, inv_d, infinite, share):
    """``u = x / d``, and the limit direction in Inf slices."""
    return tl.where(infinite[None, :], _limit(v, share[None, :]), v * inv_d[None, :])


@triton.jit
def _store(ptr, offs, mask, v, OUT_MAX: tl.constexpr):
    """Round ``v`` (float64) to float32, then to the output dtype, as the CPU kernel stores
    (bfloat16 to nearest even from the bits, NaN kept quiet); saturated at ``OUT_MAX``
    where that is not 0 (the input gradient), NaN kept."""
    if OUT_MAX != 0:
        v = tl.where(v > OUT_MAX, OUT_MAX, tl.where(v < -OUT_MAX, -OUT_MAX, v))
    f = v.to(tl.float32)
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = f.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        half = tl.where(nan, (bits >> 16) | 0x40, rounded)
        out = ptr.to(tl.pointer_type(tl.uint16))
        tl.store(out + offs, half.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, f.to(ptr.dtype.element_ty), mask=mask)


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
    W_MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``y = w * x / d(n)`` for one tile of slices."""
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    offs, s_ok = _offsets(pid_a, pid_b, C, stride_c, count, c, ROWS, BLOCK_S)
    n2 = tl.zeros([BLOCK_S], tl.float64)
    count_inf = tl.zeros([BLOCK_S], tl.float64)
    for c0 in range(0, C, BLOCK_C):
        at, mask, c_ok = _chunk(offs, s_ok, c, c0, C, stride_c)
        squares, infinities = _square_sums(_load(x_ptr, at, mask))
        n2 += squares
        count_inf += infinities
    inv_d, _, infinite, share = _slice_terms(n2, count_inf, tl.load(eps_ptr), IS_ADD, POWER)
    for c0 in range(0, C, BLOCK_C):
        at, mask, c_ok = _chunk(offs, s_ok, c, c0, C, stride_c)
        v = _load(x_ptr, at, mask)
        w = _scale_of(w_ptr, c0 + c, c_ok, W_MODE)
        _store(y_ptr, at, mask, _unit(v, inv_d, infinite, share) * w[:, None], 0.0)


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
    W_MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NEED_DW: tl.constexpr,
    OUT_MAX: tl.constexpr,
):
    """``dx = (w g - (r / n**2) <w g, x> x) / d`` for one tile of slices, and the tile's
    share of the scale's gradient per channel (``sum g u``) in its own row of ``dw_ptr``
    (summed in a fixed order afterwards: no atomics, deterministic)."""
    pid_a, pid_b = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    offs, s_ok = _offsets(pid_a, pid_b, C, stride_c, count, c, ROWS, BLOCK_S)
    n2 = tl.zeros([BLOCK_S], tl.float64)
    count_inf = tl.zeros([BLOCK_S], tl.float64)
    inner_product = tl.zeros([BLOCK_S], tl.float64)
    for c0 in range(0, C, BLOCK_C):
        at, mask, c_ok = _chunk(offs, s_ok, c, c0, C, stride_c)
        v = _load(x_ptr, at, mask)
        gv = _load(g_ptr, at, mask)
        w = _scale_of(w_ptr, c0 + c, c_ok, W_MODE)
        squares, infinities = _square_sums(v)
        n2 += squares
        count_inf += infinities
        inner_product += tl.sum(w[:, None] * gv * v, axis=0)
    inv_d, r_over_n2, infinite, share = _slice_terms(n2, count_inf, tl.load(eps_ptr), IS_ADD, POWER)
    k = tl.where(infinite, 0.0, r_over_n2 * inner_product)
    row = pid_a.to(tl.int64) * tl.num_programs(1) + pid_b
    for c0 in range(0, C, BLOCK_C):
        at, mask, c_ok = _chunk(offs, s_ok, c, c0, C, stride_c)
        v = _load(x_ptr, at, mask)
        gv = _load(g_ptr, at, mask)
        w = _scale_of(w_ptr, c0 + c, c_ok, W_MODE)
        finite_v = tl.where(infinite[None, :], 0.0, v)  # no Inf * 0 in an Inf slice
        dx = (w[:, None] * gv - k[None, :] * finite_v) * inv_d[None, :]
        _store(dx_ptr, at, mask, dx, OUT_MAX)
        if NEED_DW:
            u = _unit(v, inv_d, infinite, share)
            share_dw = tl.sum(tl.where(mask, gv * u, 0.0), axis=1)
            tl.store(dw_ptr + row * C + c0 + c, share_dw, mask=c_ok)
