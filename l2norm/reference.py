r"""The reference: the maths of l2norm in NumPy, forward and exact backward.

Every adapter is tested against this module, so it favours exactness over speed.

Forward, with ``n = ||x||`` over the normalized axes, ``d(n)`` the denominator of the
chosen ``eps_mode`` and ``s`` the scale broadcast along the channel axis:

.. math::

    y = s \cdot \frac{x}{d(n)}

Backward (vector-Jacobian product) for a cotangent ``g``. Write ``\hat x = x / n``
(zero where ``n = 0``), ``\sigma = s g`` and ``r = n\,d'(n) / d(n) \in [0, 1]``:

.. math::

    \frac{\partial L}{\partial x} = \frac{\sigma - r\,\hat x\,\langle\sigma, \hat x\rangle}{d(n)},
    \qquad
    \frac{\partial L}{\partial s_c} = \sum_{\text{all but } c} g \cdot \frac{x}{d(n)}

which is ``(s g)/d - x <s g, x> d'(n) / (n d**2)`` rearranged so that every factor is
bounded: ``\hat x`` is a unit vector and ``r`` lies in ``[0, 1]``:

The placements come from the table in :mod:`l2norm.core.modes` (``d**power = n**power + eps``
or ``max(n**power, eps)``):

=============== ================== ===============================
eps_mode        ``d(n)``           ``r``
=============== ================== ===============================
``add_sumsq``   ``sqrt(n² + eps)`` ``n² / d²``
``add_norm``    ``n + eps``        ``n / (n + eps)``
``clamp_sumsq`` ``max(n, √eps)``   ``1`` if ``n >= √eps`` else ``0``
``clamp_norm``  ``max(n, eps)``    ``1`` if ``n >= eps`` else ``0``
=============== ================== ===============================

At ``n = 0`` the gradient is ``s g / d(0)``: ``s g / eps`` in ``add_norm`` mode, where
autodiff of ``x / (sqrt(sum(x**2)) + eps)`` gives NaN.

Numerics:

* The input is promoted to a working precision of float64 (or, for float64 input,
  ``np.longdouble`` where it is wider) and the result is rounded once to the input dtype.
* Each slice is first divided by the power of two just below its largest magnitude,
  so the sum of squares can neither overflow nor underflow whatever the input's range;
  eps is divided by the same power, so it keeps its meaning on the true norm.
* An input gradient whose exact value exceeds its dtype (float16 at an all-zero slice:
  ``scale * g / eps``) is returned as the dtype's largest finite value (:func:`saturate`),
  not Inf.
* A slice holding a NaN is NaN throughout (forward and gradient).
* A slice holding ±Inf (and no NaN) takes the limit direction: its infinite entries map
  to ``±s / sqrt(k)`` (``k`` the number of infinite entries), its finite entries to 0,
  and its input gradient is 0 (the limit of ``1 / d(n)`` as ``n`` grows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # registers bfloat16 with NumPy
import numpy as np

from l2norm.core.modes import get_mode
from l2norm.core.spec import (
    Axes,
    Spec,
    check_float_dtype,
    check_scale_shape,
    is_python_number,
    scale_compute_dtype,
)

__all__ = ["l2_normalize", "l2_normalize_vjp", "forward", "vjp"]

_LONGDOUBLE_IS_WIDER = np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


def _working_dtype(dtype: np.dtype) -> type:
    if dtype == np.float64 and _LONGDOUBLE_IS_WIDER:
        return np.longdouble
    return np.float64


@dataclass
class _Parts:
    """Per-slice quantities in working precision, in units of the slice's power of two."""

    xhat: np.ndarray  # x / n, zero where n == 0; the limit direction in Inf slices
    d_scaled: np.ndarray  # d(n) / p
    p: np.ndarray  # the power of two each slice was divided by
    ratio: np.ndarray  # n / d(n)
    r: np.ndarray  # n d'(n) / d(n)
    one_minus_r: np.ndarray  # 1 - r, computed without cancellation
    inf_slice: np.ndarray  # the slice holds ±Inf and no NaN


def _parts(xw: np.ndarray, spec: Spec, axes: Axes) -> _Parts:
    keep = {"axis": axes.norm, "keepdims": True}
    is_inf = np.isinf(xw)
    inf_slice = is_inf.any(**keep) & ~np.isnan(xw).any(**keep)
    # Inf slices: keep only the signs of the infinite entries; their direction is the limit.
    xw = np.where(inf_slice, np.where(is_inf, np.sign(xw), 0), xw)
    largest = np.max(np.abs(xw), initial=0, **keep)  # initial: a slice may be empty
    _, exponent = np.frexp(largest)
    p = np.ldexp(np.ones_like(largest), exponent - 1)  # p <= largest < 2p; 0.5 for zero slices
    xs = xw / p  # exact: p is a power of two
    sumsq = np.sum(xs * xs, **keep)
    ns = np.sqrt(sumsq)
    positive = ns > 0
    xhat = np.divide(xs, ns, out=np.zeros_like(xs), where=positive)

    mode = get_mode(spec.eps_mode)
    count = math.prod(xw.shape[a] for a in axes.norm)
    eps_s = mode.scaled_eps(spec.eps, p)
    d_s = mode.denominator(np, sumsq, ns, eps_s, xw.dtype.type(count))
    ratio = ns / d_s
    r, one_minus_r = mode.ratio(np, sumsq, ns, d_s, eps_s, xw.dtype.type(count))
    # In the Inf limit n / d(n) tends to the mode's limit (1, or sqrt(N) for a mean).
    limit = np.sqrt(xw.dtype.type(count)) if mode.mean else 1
    ratio = np.where(inf_slice, limit, ratio).astype(xw.dtype)
    return _Parts(
        xhat=xhat,
        d_scaled=d_s,
        p=p,
        ratio=ratio,
        r=r,
        one_minus_r=one_minus_r,
        inf_slice=inf_slice,
    )


def _check_input(x: Any, name: str = "x") -> np.ndarray:
    arr = np.asarray(x)
    check_float_dtype(arr.dtype.name, what=name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d array")
    return arr


def _scale_array(scale: Any, x: np.ndarray, axes: Axes) -> np.ndarray | None:
    """The scale as an array after the scale rule (:func:`~l2norm.core.spec.scale_compute_dtype`):
    a Python number in the compute precision, a float array no wider than it as given (the
    working precision widens it exactly)."""
    if scale is None:
        return None
    if is_python_number(scale) or (  # weakly typed: taken at the compute precision
        isinstance(scale, (list, tuple)) and all(is_python_number(v) for v in scale)
    ):
        arr = np.asarray(scale, dtype=scale_compute_dtype(x.dtype.name, None))
        check_scale_shape(arr.shape, x.shape[axes.channel], axes)
        return arr
    arr = np.asarray(scale)
    scale_compute_dtype(x.dtype.name, arr.dtype.name)
    check_scale_shape(arr.shape, x.shape[axes.channel], axes)
    return arr


def _broadcast_scale(scale: np.ndarray | None, axes: Axes, dtype: type) -> np.ndarray | Any:
    if scale is None:
        return dtype(1)
    values = scale.astype(dtype).reshape(-1)
    if values.shape[0] == 1:
        return values.reshape(())
    shape = [1] * axes.ndim
    shape[axes.channel] = values.shape[0]
    return values.reshape(shape)


def saturate(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` rounded to ``dtype``, at most its largest finite magnitude (NaN kept).

    The input gradient is returned this way: where its exact value exceeds the dtype (an
    all-zero float16 pixel, ``scale * g / eps`` with eps = 1e-12), the largest finite value
    keeps training finite, where Inf would make a loss scaler skip every step.
    """
    dtype = np.dtype(dtype)
    info = ml_dtypes.finfo(dtype) if dtype.name == "bfloat16" else np.finfo(dtype)
    top = float(info.max)
    with np.errstate(invalid="ignore"):
        return np.clip(np.asarray(values, np.float64), -top, top).astype(dtype)


def denominator(x: np.ndarray, spec: Spec) -> np.ndarray:
    """``d(n)`` of every slice in float64 (keepdims), Inf for Inf slices, NaN for NaN ones.

    Used to put gradient errors on the scale of ``scale * cotangent / d``.
    """
    x = _check_input(x)
    parts = _parts(x.astype(_working_dtype(x.dtype)), spec, spec.resolve(x.ndim))
    d = np.asarray(parts.d_scaled * parts.p, dtype=np.float64)
    return np.where(parts.inf_slice, np.inf, d)


def forward(x: np.ndarray, scale: np.ndarray | None, spec: Spec) -> np.ndarray:
    """Forward pass from a validated :class:`~l2norm.core.spec.Spec` (see :func:`l2_normalize`)."""
    x = _check_input(x)
    axes = spec.resolve(x.ndim)
    scale = _scale_array(scale, x, axes)
    work = _working_dtype(x.dtype)
    parts = _parts(x.astype(work), spec, axes)
    y = _broadcast_scale(scale, axes, work) * (parts.xhat * parts.ratio)
    return np.asarray(y).astype(x.dtype)


def vjp(
    x: np.ndarray, scale: np.ndarray | None, cotangent: np.ndarray, spec: Spec
) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact vector-Jacobian product from a validated spec (see :func:`l2_normalize_vjp`)."""
    x = _check_input(x)
    g = _check_input(cotangent, "cotangent")
    if g.shape != x.shape:
        raise ValueError(f"cotangent has shape {g.shape}, expected the input's shape {x.shape}")
    axes = spec.resolve(x.ndim)
    scale = _scale_array(scale, x, axes)
    work = _working_dtype(x.dtype)
    parts = _parts(x.astype(work), spec, axes)
    gw = g.astype(work)
    sigma = _broadcast_scale(scale, axes, work) * gw
    inner = np.sum(sigma * parts.xhat, axis=axes.norm, keepdims=True)
    # sigma - r xhat <sigma, xhat>, split so that 1 - r (tiny near eps) cancels nothing.
    projected = sigma - parts.xhat * inner
    dx = (projected + parts.one_minus_r * parts.xhat * inner) / parts.d_scaled / parts.p
    dx = np.where(parts.inf_slice, 0, dx)
    dx = saturate(dx, x.dtype)
    if scale is None:
        return dx, None
    u = parts.xhat * parts.ratio
    if scale.size == 1:
        dscale = np.sum(gw * u).reshape(scale.shape)
    else:
        dscale = np.sum(gw * u, axis=axes.reduced)
    return dx, dscale.astype(scale.dtype)


def l2_normalize(
    x: Any,
    scale: Any = None,
    *,
    axis: int | tuple[int, ...] = -1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> np.ndarray:
    """L2-normalize ``x`` along ``axis`` and multiply by ``scale`` (ParseNet / SSD).

    Args:
        x: float16, bfloat16 (``ml_dtypes``), float32 or float64 array, rank >= 1.
        scale: None; a Python number, a scalar or shape ``(1,)`` array (one shared value,
            Caffe's ``channel_shared``); or one value per channel of the channel axis. An
            array has a float dtype no wider than the compute precision (float32, or
            float64 for float64 ``x``), see the scale dtype rule in the guarantees.
        axis: the normalized axis, or a tuple of axes whose first entry is the channel
            axis the scale runs along.
        across_spatial: normalize over every axis but the first (one norm per sample,
            Caffe's ``across_spatial``); ``axis`` then names the channel axis only.
        eps: positive finite epsilon; default ``1e-12`` (or the preset's).
        eps_mode: ``"add_sumsq"``, ``"add_norm"``, ``"clamp_sumsq"`` or
            ``"clamp_norm"`` (default: ``"clamp_norm"``, as ``torch.nn.functional.normalize``).
        preset: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``, ``"torchvision"``,
            ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``: that peer's eps and eps_mode.

    Returns:
        An array of ``x``'s shape and dtype.

    Examples:
        >>> import numpy as np
        >>> from l2norm import l2_normalize
        >>> x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
        >>> l2_normalize(x, np.array([20.0, 10.0], dtype=np.float32))
        array([[12.,  8.],
               [ 0.,  0.]], dtype=float32)
    """
    spec = Spec.create(
        axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    return forward(x, scale, spec)


def l2_normalize_vjp(
    x: Any,
    scale: Any,
    cotangent: Any,
    *,
    axis: int | tuple[int, ...] = -1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact vector-Jacobian product of :func:`l2_normalize`.

    Returns:
        The pair ``(dx, dscale)``, ``dx`` in ``x``'s dtype; ``dscale`` in the scale's shape
        and dtype (the compute precision for a Python number), or None when ``scale`` is
        None.

    Examples:
        >>> import numpy as np
        >>> from l2norm import l2_normalize_vjp
        >>> x = np.zeros((1, 3))
        >>> dx, ds = l2_normalize_vjp(x, 2.0, np.ones((1, 3)), eps_mode="add_norm", eps=0.5)
        >>> dx  # finite at zero: scale * cotangent / eps
        array([[4., 4., 4.]])
    """
    spec = Spec.create(
        axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    return vjp(x, scale, cotangent, spec)
