r"""L2 normalization for plain JAX: :func:`l2_normalize` with an exact custom gradient.

The Flax layers (:mod:`l2norm.nnx`, :mod:`l2norm.linen`) are thin wrappers over this
module; optax or Equinox code can call :func:`l2_normalize` directly.

The maths is the reference's (:mod:`l2norm.reference`): ``y = scale * x / d(||x||)``
with ``d`` set by ``eps_mode``, and the backward pass is the formula in that module's
docstring. The op is a set of JAX primitives (:mod:`l2norm._jax_kernel`: forward, its
tangent and its VJP, with batching, transposition and sharding rules), lowered by the
native CPU kernel or by the ladder below.

How it is computed: one program with no branch, the ladder of :mod:`l2norm._ladder`.
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
:func:`l2norm._faithful.refined_pair`, two plain sums) and each output is rounded once from
pair factors (:func:`l2norm._faithful.faithful_output`): within 1 ULP of the exact result.

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
import numpy as np
from jax import lax

from l2norm import _driver, _jax_kernel, _ladder
from l2norm import _jax_bits as _bits
from l2norm._jax_kernel import LOWERINGS, use_lowering
from l2norm._ladder import FORMATS, Ladder
from l2norm._spec import (
    ArrayOps,
    Axes,
    RMSSpec,
    Spec,
    check_float_dtype,
    check_scale_shape,
)

__all__ = ["LOWERINGS", "l2_normalize", "lowering_for", "normalize", "rms_norm", "use_lowering"]


def l2_normalize(
    x: Any,
    scale: Any = None,
    *,
    axis: int | tuple[int, ...] = -1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> jax.Array:
    """L2-normalize ``x`` along ``axis`` and multiply by ``scale`` (ParseNet / SSD).

    Works under ``jit``, ``vmap`` (any ``in_axes``, nested), ``grad``, ``jvp``,
    ``jacfwd`` / ``jacrev`` / ``hessian`` (any order), ``jax.checkpoint``, ``scan`` and
    sharded ``jit`` (a sharded batch stays sharded); the gradient is exact and finite
    for every finite input. The program has no branch:
    each slice's result depends on that slice alone.

    Args:
        x: float16, bfloat16, float32 or float64 array, rank >= 1. float16 and bfloat16
            are computed in float32; the result has ``x``'s dtype.
        scale: None; a scalar or shape ``(1,)`` array (one shared value); or one value
            per channel of the channel axis. No other shape is broadcast.
        axis: the normalized axis, or a tuple of axes whose first entry is the channel
            axis the scale runs along.
        across_spatial: normalize over every axis but the first (one norm per sample,
            Caffe's ``across_spatial``); ``axis`` then names the channel axis only.
        eps: positive finite epsilon; default ``1e-12`` (or the preset's).
        eps_mode: ``"add_sumsq"``, ``"add_norm"``, ``"clamp_sumsq"`` or
            ``"clamp_norm"`` (default, as ``torch.nn.functional.normalize``).
        preset: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``, ``"torchvision"``,
            ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``: that peer's eps placement.

    Returns:
        An array of ``x``'s shape and dtype.

    Raises:
        TypeError / ValueError: at trace time, naming the value received (a non-float
            input, an axis out of range, a scale whose length is not the channel count).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from l2norm.jax import l2_normalize
        >>> x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
        >>> l2_normalize(x, jnp.array([20.0, 10.0]))
        Array([[12.,  8.],
               [ 0.,  0.]], dtype=float32)
        >>> jax.grad(lambda x: l2_normalize(x, eps_mode="add_norm").sum())(x)[1]
        Array([1.e+12, 1.e+12], dtype=float32)
    """
    spec = Spec.create(
        axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    return normalize(x, scale, spec)


def rms_norm(
    x: Any,
    scale: Any = None,
    *,
    axis: int | tuple[int, ...] = -1,
    eps: float | None = None,
    preset: str | None = None,
) -> jax.Array:
    """RMSNorm: ``y = scale * x / sqrt(mean(x**2) + eps)`` over ``axis``.

    :func:`l2_normalize` with ``eps_mode="add_meansq"``, so with its guarantees and
    transformations; the options and the presets are :func:`l2norm.rms_norm`'s (eps
    default 1e-6; ``preset`` one of ``"torch"``, ``"keras"``, ``"flax"``, ``"llama"``,
    ``"gemma"``, ``"t5"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from l2norm.jax import rms_norm
        >>> rms_norm(jnp.array([[1.0, -1.0], [0.0, 0.0]]), jnp.array([2.0, 3.0]), eps=1e-30)
        Array([[ 2., -3.],
               [ 0.,  0.]], dtype=float32)
    """
    x = jnp.asarray(x)
    scale = None if scale is None else jnp.asarray(scale)
    return RMSSpec.create(axis=axis, eps=eps, preset=preset).apply(x, scale, JAX_OPS)


#: jax.numpy's arrays for :meth:`l2norm._spec.RMSSpec.apply`.
JAX_OPS = ArrayOps(
    normalize=lambda x, scale, spec: normalize(x, scale, spec),
    cast=lambda t, name: t.astype(name),
    dtype=lambda t: jnp.dtype(t.dtype).name,
    multiply=jnp.multiply,
    reshape=jnp.reshape,
)


def lowering_for(x: Any, *, axis: int | tuple[int, ...] = -1, across_spatial: bool = False) -> str:
    """Which lowering :func:`l2_normalize` takes for ``x`` here and now: ``"cpu-kernel"``
    (the native kernel, as XLA custom calls), ``"pallas"`` (the Pallas kernels) or
    ``"ops"`` (the ladder in ``jax.numpy``).

    Example:
        >>> import jax.numpy as jnp
        >>> from l2norm.jax import lowering_for, use_lowering
        >>> with use_lowering("ops"):
        ...     lowering_for(jnp.ones((2, 8)))
        'ops'
    """
    spec = Spec.create(axis=axis, across_spatial=across_spatial)
    dtype = jnp.dtype(jnp.asarray(x).dtype).name
    axes = spec.resolve(jnp.ndim(x))
    return _jax_kernel.choose(dtype, axes, math.prod(jnp.shape(x)[a] for a in axes.norm))


def normalize(x: Any, scale: Any, spec: Spec) -> jax.Array:
    """:func:`l2_normalize` from an already validated :class:`~l2norm._spec.Spec`.

    The Flax layers build their spec once and call this.

    Example:
        >>> import jax.numpy as jnp
        >>> from l2norm._spec import Spec
        >>> normalize(jnp.array([[0.0, 1e-45]]), None, Spec.create(eps=1e-50))  # subnormals
        Array([[0., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype).name
    check_float_dtype(dtype, what="x")
    axes = spec.resolve(x.ndim)
    # The accumulator follows the data, never jax_enable_x64.
    acc = "float64" if dtype == "float64" else "float32"
    if scale is None:
        kind, s = 0, jnp.ones((1,), acc)
    else:
        scale = jnp.asarray(scale)
        if not jnp.issubdtype(scale.dtype, jnp.floating) and not jnp.issubdtype(
            scale.dtype, jnp.integer
        ):
            raise TypeError(f"scale must hold real numbers, got dtype {scale.dtype}")
        check_scale_shape(scale.shape, x.shape[axes.channel], axes)
        kind, s = (1 if scale.size == 1 else 2), scale.astype(acc).reshape(-1)
    if x.size == 0:  # nothing to normalize: an empty result (and a zero scale gradient)
        shape = [1] * x.ndim
        shape[axes.channel] = s.size if kind == 2 else 1
        return (x.astype(acc) * s.reshape(shape)).astype(x.dtype)
    size = int(np.prod([x.shape[a] for a in axes.norm]))
    ladder = _ladder.make_ladder(dtype, acc, size, spec.eps_mode, spec.eps)
    plan = _plan(ladder, axes, size, spec.eps, acc)
    # The CPU: the native kernel, one pass; CUDA GPUs: the Pallas kernels; elsewhere the
    # ladder below.
    lowering = _jax_kernel.choose(dtype, axes, size)
    op = _jax_kernel.plan_for(x, kind, spec, axes, plan, lowering)
    return _jax_kernel.normalize(op, x, s)


# --------------------------------------------------------------------------- the passes


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


class _Plan(NamedTuple):
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


def _plan(ladder: Ladder, axes: Axes, size: int, eps: float, acc: str) -> _Plan:
    fmt = FORMATS[acc]
    matters = math.sqrt(size) * 2.0 ** (fmt.min_exp + fmt.mant + 8)  # delta 2**m
    return _Plan(ladder, axes, ladder.exact_top and ladder.mode.threshold(eps, size) < matters)


def _sums(x: jax.Array, acc: Any, plan: _Plan) -> tuple[list, jax.Array]:
    """:func:`l2norm._ladder.sums`, written for XLA:CPU's reductions (YNNPACK), which fuse
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


def _hooks(plan: _Plan, x: jax.Array, acc: Any) -> _driver.Hooks:
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


def _forward(plan: _Plan, x: jax.Array, s: jax.Array):
    out = _driver.forward(_hooks(plan, x, s.dtype), _bits.exact(x, s.dtype), s, plan.ladder)
    return out.y, (x, s, out.factors)


def _reduce_like(v: jax.Array, s: jax.Array, axes: Axes) -> jax.Array:
    """Sum ``v`` down to the shape of the (broadcast-shaped) scale ``s``."""
    if s.ndim == 0:
        return jnp.sum(v)
    return jnp.sum(v, axis=axes.reduced, keepdims=True)


def _backward(plan: _Plan, residuals: tuple, g: jax.Array):
    r"""``dx = (sigma - r <sigma, xhat> xhat) / d`` (:func:`l2norm._ladder.input_grad`)
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
