r"""L2 normalization for plain JAX: :func:`l2_normalize` with an exact custom gradient.

The Flax layers (:mod:`l2norm.nnx`, :mod:`l2norm.linen`) are thin wrappers over this
module; optax or Equinox code can call :func:`l2_normalize` directly.

The maths is the reference's (:mod:`l2norm.reference`): ``y = scale * x / d(||x||)``
with ``d`` set by ``eps_mode``, and the backward pass is the formula in that module's
docstring. The op is a set of JAX primitives (:mod:`l2norm.jax._primitives`: forward, its
tangent and its VJP, with batching, transposition and sharding rules), lowered by the
native CPU kernel or by the ladder below.

How it is computed: :mod:`l2norm.jax._ops` (the ladder in ``jax.numpy``), the native
kernel and the Pallas kernels, chosen by :func:`l2norm.jax._primitives.choose`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2norm.core import ladder as _ladder
from l2norm.core.spec import (
    ArrayOps,
    RMSSpec,
    Spec,
    check_float_dtype,
    check_scale_shape,
    compute_dtype,
    is_python_number,
    scale_compute_dtype,
)
from l2norm.jax import _ops, _primitives
from l2norm.jax._primitives import LOWERINGS, use_lowering

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
        scale: None; a Python number, a scalar or shape ``(1,)`` array (one shared
            value); or one value per channel of the channel axis. No other shape is
            broadcast. A number (or a weakly typed array) is taken in the compute
            precision (float32, float64 for a float64 ``x``); an array has a float dtype
            no wider than it, to which it is widened exactly: a float16 or bfloat16 scale
            with float32 ``x`` is fine, an integer or a wider one raises TypeError (the
            scale dtype rule of the guarantees page). The rule reads the dtype JAX gives
            the array: with x64 off, a NumPy float64 array is float32.
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
    # A Python number stays one (weakly typed: the presets' promotions ignore it).
    if scale is not None and not is_python_number(scale):
        scale = jnp.asarray(scale)
    return RMSSpec.create(axis=axis, eps=eps, preset=preset).apply(x, scale, JAX_OPS)


#: jax.numpy's arrays for :meth:`l2norm.core.spec.RMSSpec.apply`.
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
    return _primitives.choose(dtype, axes, math.prod(jnp.shape(x)[a] for a in axes.norm))


def normalize(x: Any, scale: Any, spec: Spec) -> jax.Array:
    """:func:`l2_normalize` from an already validated :class:`~l2norm.core.spec.Spec`.

    The Flax layers build their spec once and call this.

    Example:
        >>> import jax.numpy as jnp
        >>> from l2norm.core.spec import Spec
        >>> normalize(jnp.array([[0.0, 1e-45]]), None, Spec.create(eps=1e-50))  # subnormals
        Array([[0., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype).name
    check_float_dtype(dtype, what="x")
    axes = spec.resolve(x.ndim)
    # The accumulator follows the data, never jax_enable_x64.
    acc = compute_dtype(dtype)
    if scale is None:
        kind, s = 0, jnp.ones((1,), acc)
    else:
        # A Python number, or a weakly typed array (a Python number under jit), is taken at
        # the compute precision; any other scale follows the one scale rule, on the dtype
        # JAX gave it (with x64 off, a float64 NumPy array is already float32 here).
        weak = is_python_number(scale) or getattr(scale, "weak_type", False)
        scale = jnp.asarray(scale)
        if weak and jnp.dtype(scale.dtype).kind in "iuf":  # not a weak bool or complex
            scale_compute_dtype(dtype, None)
        else:
            scale_compute_dtype(dtype, jnp.dtype(scale.dtype).name)
        check_scale_shape(scale.shape, x.shape[axes.channel], axes)
        # The widening is exact and differentiable: the gradient comes back in the scale's
        # own dtype.
        kind, s = (1 if scale.size == 1 else 2), scale.astype(acc).reshape(-1)
    if x.size == 0:  # nothing to normalize: an empty result (and a zero scale gradient)
        shape = [1] * x.ndim
        shape[axes.channel] = s.size if kind == 2 else 1
        return (x.astype(acc) * s.reshape(shape)).astype(x.dtype)
    size = int(np.prod([x.shape[a] for a in axes.norm]))
    ladder = _ladder.make_ladder(dtype, acc, size, spec.eps_mode, spec.eps)
    plan = _ops.plan(ladder, axes, size, spec.eps, acc)
    # The CPU: the native kernel, one pass; CUDA GPUs: the Pallas kernels; elsewhere the
    # ladder below.
    lowering = _primitives.choose(dtype, axes, size)
    op = _primitives.plan_for(x, kind, spec, axes, plan, lowering)
    return _primitives.normalize(op, x, s)
