"""The ladder in ``jax.numpy``: the JAX plug-in's hooks for :mod:`l2norm.core.driver`.

How it is computed: one program with no branch, the ladder of :mod:`l2norm.core.ladder`.
Each slice's squares are summed at a few fixed power-of-two scales (float32 data: three,
e.g. ``2**106``, ``1`` and ``2**-70`` for 512 channels; float16 data: one, the plain
sum) and its infinities counted; per slice the most finely scaled sum that stayed finite
gives ``d``; one elementwise pass writes ``y``. Zero, tiny, subnormal, huge, NaN and Inf
slices are all handled by selects, so every slice is treated alike and nothing is read
back to the host: a sample's result is bitwise the same whatever its neighbours and the
batch size (under ``jit``; XLA:CPU would sum arrays under 4096 elements in another order
than larger ones, so those are padded, see :func:`_sum`). The backward keeps ``x``, the
scale and the slice-sized factors: one elementwise pass, then reductions that XLA fuses
with the input gradient.

XLA:CPU runs reductions through YNNPACK, which fuses arithmetic producers only: the sums
are written with multiplications, ``abs``, ``min`` and ``max`` (:func:`_sums`), and a
few ``lax.optimization_barrier`` calls keep CSE from sharing a value between two of
them, which would make XLA write it out in full.

float16, bfloat16 and float32 are computed in float32 and float64 in float64, whatever
``jax_enable_x64`` says. float32 and float64 data, summed in their own dtype, have the
chosen rung summed again as a double-word pair (a second pass:
:func:`l2norm.core.faithful.refined_pair`, two plain sums) and each output is rounded once from
pair factors (:func:`l2norm.core.faithful.faithful_output`): within 1 ULP of the exact result.

XLA on CPU runs with flush-to-zero and denormals-are-zero: every float operation reads
a subnormal input as 0. The elementwise passes read the top rung's slices from the bits
(:func:`_subnormal_upscaled`), and so does its sum where eps is small enough for it to
matter (:class:`_Plan`), so a slice made only of subnormals is normalized exactly; a
subnormal *entry* of a slice whose sum of squares is an ordinary number is read as 0, as
by any other JAX operation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from l2norm.core import driver as _driver
from l2norm.core import ladder as _ladder
from l2norm.core.ladder import FORMATS, Ladder
from l2norm.core.spec import Axes
from l2norm.jax import _bits

__all__ = ["Plan", "backward", "forward", "plan"]

#: XLA:CPU hands a reduction with at least this many elements to YNNPACK and a smaller
#: one to its own loops, which add in another order. Smaller operands are padded with
#: zeros up to it, so that a sample sums the same way alone as in a large batch.
_FEW = 4096


def _sum(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``sum(v)`` over ``axes`` (kept), in the same order whatever the other axes' sizes."""
    if v.size >= _FEW:
        return jnp.sum(v, axis=axes, keepdims=True)
    kept = [a for a in range(v.ndim) if a not in axes]
    if not kept:  # a single slice: pad along a new leading axis
        return _sum(v[None], tuple(a + 1 for a in axes))[0]
    a = kept[0]
    rows = -(-_FEW * v.shape[a] // max(v.size, 1))
    padded = jnp.pad(v, [(0, rows - v.shape[a] if i == a else 0) for i in range(v.ndim)])
    return lax.slice_in_dim(jnp.sum(padded, axis=axes, keepdims=True), 0, v.shape[a], axis=a)


def _compensated(acc: Any, x: jax.Array) -> bool:
    """Whether the data is as wide as the accumulator: then pairs (float32, float64)."""
    return jnp.dtype(x.dtype) == jnp.dtype(acc)


class Plan(NamedTuple):
    """Everything static about one call of the ladder (part of the primitives' plan).

    ``bits_in_sums``: whether the top rung's *sum* must read subnormal entries from their
    bits. A flushing read drops less than ``delta**2 = size 2**(2 min_exp)`` of ``n**2``;
    when eps's threshold (``eps`` or ``sqrt(eps)``) is at least ``delta 2**m`` (``m`` the
    ladder's precision margin), every slice for which that matters has ``d`` set by eps
    to within ``2**-m``, and the sum may flush (the passes still read the bits).
    """

    ladder: Ladder
    axes: Axes
    bits_in_sums: bool


def plan(ladder: Ladder, axes: Axes, size: int, eps: float, acc: str) -> Plan:
    fmt = FORMATS[acc]
    matters = math.sqrt(size) * 2.0 ** (fmt.min_exp + fmt.mant + 8)  # delta 2**m
    return Plan(ladder, axes, ladder.exact_top and ladder.mode.threshold(eps, size) < matters)


def _sums(x: jax.Array, acc: Any, plan: Plan) -> tuple[list, jax.Array]:
    """:func:`l2norm.core.ladder.sums`, written for XLA:CPU's reductions (YNNPACK), which fuse
    arithmetic producers only: the rungs read ``x`` through a float conversion (which
    may flush subnormals) and multiplications, the top one clipped to ``c`` with
    ``(c 2**s)**2 = Inf`` (it overflows where it should, and autodiff of its square
    meets no ``0 * Inf``), or from the bits where ``plan.bits_in_sums``. Infinities are
    counted with no compare or select: ``min(max(|x| / 2 - big / 2, 0), 1)`` (``big``
    the largest finite number) is 0 at finite entries and 1 at +-Inf. (Not
    ``big / max(|x|, big)``: where ``x`` is a broadcast, XLA moves the division before it
    and rewrites it as ``big * (1 / max(...))``, whose subnormal reciprocal flushes to 0,
    and every slice looked infinite.)
    """
    ladder, axes = plan.ladder, plan.axes
    fmt = FORMATS[jnp.dtype(acc).name]

    plain = x.astype(acc)
    rung_sums = []
    for j, shift in enumerate(ladder.shifts):
        if j == 0 and plan.bits_in_sums:
            exact = _bits.exact(x, acc)
            top = 2.0 ** (fmt.max_exp - 1)
            scaled = jnp.clip(exact * 2.0**shift, -top, top)
            xs = jnp.where(_bits.subnormal(exact), _bits.subnormal_upscaled(exact, shift), scaled)
        elif j == 0 and shift > 0:
            clip = 2.0 ** (fmt.max_exp - 1 - shift)
            # The barrier keeps this |x| from being shared with the count's: XLA would
            # write it out in full.
            xs = jnp.minimum(jnp.abs(lax.optimization_barrier(plain)), clip) * 2.0**shift
        else:
            xs = plain * 2.0**shift if shift else plain
        rung_sums.append(_sum(xs * xs, axes.norm))
    # Halved: -big is the input gradient's saturation bound, and a constant shared with
    # that pass makes XLA write its broadcast out in full.
    half = float(jnp.finfo(acc).max) / 2
    infinite = jnp.minimum(jnp.maximum(jnp.abs(plain) * 0.5 - half, 0.0), 1.0)
    return rung_sums, _sum(infinite, axes.norm)


# --------------------------------------------------------------------------- forward, VJP


def _hooks(plan: Plan, x: jax.Array, acc: Any) -> _driver.Hooks:
    """The driver's hooks: the sums above, the bits for Inf and subnormals, the pairs
    where the data is as wide as the accumulator (differentiated as the plain sum), the
    scale before ``1 / d`` (a flushing CPU)."""
    return _driver.Hooks(
        jnp,
        jnp.dtype(acc).name,
        lambda v: _sum(v, plan.axes.norm),
        _bits.sum_two(plan.axes.norm),
        upscale=_bits.upscaled,
        pairs=_bits.PAIRS if _compensated(acc, x) else None,
        sums=lambda xw, ladder: _sums(x, acc, plan),
        stop_gradient=lax.stop_gradient,
        infinite=_bits.infinite,
        scale_order="first",
    )


def forward(plan: Plan, x: jax.Array, s: jax.Array):
    out = _driver.forward(_hooks(plan, x, s.dtype), _bits.exact(x, s.dtype), s, plan.ladder)
    return out.y, (x, s, out.factors)


def _reduce_like(v: jax.Array, s: jax.Array, axes: Axes) -> jax.Array:
    """Sum ``v`` down to the shape of the (broadcast-shaped) scale ``s``."""
    if s.ndim == 0:
        return jnp.sum(v)
    return jnp.sum(v, axis=axes.reduced, keepdims=True)


def backward(plan: Plan, residuals: tuple, g: jax.Array):
    r"""``dx = (sigma - r <sigma, xhat> xhat) / d`` (:func:`l2norm.core.ladder.input_grad`)
    with ``sigma = scale * g`` and ``xhat = x / n``; ``dscale = sum g u``, ``u = x / d``.

    One elementwise pass writes ``v``, ``x`` in its slice's rung read from the bits (the
    reductions cannot fuse that read), ``+-1/sqrt(k)`` at the infinities of Inf slices
    and 0 at their finite entries; ``xhat = (v a) p`` and ``u = (v b) p`` follow by
    multiplications, with ``(a, b, p) = (1 / n, 1 / d, 2**s)`` and 1 in Inf slices.
    (``u`` is not ``xhat n / d``: where the sum flushed a slice of subnormals to
    ``n = 0``, ``d`` is eps's and ``x / d`` is still exact.)
    """
    ladder, axes = plan.ladder, plan.axes
    x, s, f = residuals
    inf_slice = f.rinf > 0
    keep = None if ladder.single else jnp.where(inf_slice, 0.0, f.pre)
    xw = _bits.exact(x, s.dtype)
    xin, infinite = _ladder.rung_input(jnp, xw, keep, f.top, ladder, _bits.upscaled, _bits.infinite)
    if ladder.single:
        xin = jnp.where(inf_slice, 0.0, xin)
    v = jnp.where(infinite, jnp.sign(x) * f.rinf, xin)

    def through(factor: jax.Array, post: Any) -> jax.Array:
        out = v * jnp.where(inf_slice, 1.0, factor)
        return out if ladder.single else out * jnp.where(inf_slice, 1.0, post)

    xhat = through(f.inv_n, f.post)
    # The barrier keeps CSE from sharing the scale's broadcast with the forward's output
    # pass under jit: shared, XLA:CPU writes it out in full for the reduction below.
    sigma = lax.optimization_barrier(s) * g
    dx = _ladder.input_grad(sigma, xhat, _sum(sigma * xhat, axes.norm), f)
    dx = _driver.saturate(jnp, dx, jnp.dtype(x.dtype).name)
    # The barrier again: one broadcast of 2**s shared by the two reductions is written out.
    ds = _reduce_like(g * through(f.inv_d, lax.optimization_barrier(f.post)), s, axes)
    return dx.astype(x.dtype), ds.reshape(s.shape)
