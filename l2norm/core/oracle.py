"""An exact oracle: the forward and the backward in 60-digit decimal arithmetic.

Independent of NumPy's floating point: every input value converts to ``Decimal``
exactly, sums and square roots are carried at 60 significant digits with an exponent
range no float can leave, and each result is rounded once to float64 (``float()`` of a
Decimal is correctly rounded). Slow (pure Python), so it is meant for the small arrays
of the conformance cases and the tests.
"""

from __future__ import annotations

from decimal import Context, Decimal, localcontext

import numpy as np

from l2norm.core.modes import get_mode
from l2norm.core.spec import Axes, Spec

_CTX = Context(prec=60, Emax=10**6, Emin=-(10**6))
_NAN = float("nan")


class _DecimalNamespace:
    """The array namespace of :mod:`l2norm.core.modes`, for one Decimal at a time."""

    sqrt = staticmethod(_CTX.sqrt)

    @staticmethod
    def where(condition: bool, a: Decimal, b: Decimal) -> Decimal:
        return a if condition else b

    @staticmethod
    def ones_like(_: Decimal) -> Decimal:
        return Decimal(1)

    @staticmethod
    def zeros_like(_: Decimal) -> Decimal:
        return Decimal(0)


def _rows(a: np.ndarray, axes: Axes) -> np.ndarray:
    """Move the normalized axes last and flatten: one row per normalized slice."""
    moved = np.moveaxis(a, axes.norm, tuple(range(a.ndim - len(axes.norm), a.ndim)))
    return moved.reshape(-1, int(np.prod([a.shape[i] for i in axes.norm])))


def _unrows(rows: np.ndarray, like: np.ndarray, axes: Axes) -> np.ndarray:
    kept = [like.shape[i] for i in range(like.ndim) if i not in axes.norm]
    normed = [like.shape[i] for i in axes.norm]
    moved = rows.reshape(kept + normed)
    return np.moveaxis(moved, tuple(range(like.ndim - len(axes.norm), like.ndim)), axes.norm)


def _scale_full(scale: np.ndarray | None, x: np.ndarray, axes: Axes) -> np.ndarray:
    if scale is None:
        return np.ones(x.shape, dtype=np.float64)
    values = np.asarray(scale).astype(np.float64).reshape(-1)
    if values.shape[0] == 1:
        return np.full(x.shape, values[0])
    shape = [1] * x.ndim
    shape[axes.channel] = values.shape[0]
    return np.broadcast_to(values.reshape(shape), x.shape)


def _slice_terms(values: list[float], spec: Spec):
    """(u, xhat, d, r) of one slice as Decimals; None when the slice holds a NaN."""
    c = _CTX
    if any(v != v for v in values):
        return None
    mode = get_mode(spec.eps_mode)
    count = Decimal(len(values))
    infinite = [v for v in values if v in (float("inf"), float("-inf"))]
    if infinite:
        k = c.sqrt(Decimal(len(infinite)))
        xhat = [
            Decimal(1 if v > 0 else -1) / k if v in (float("inf"), float("-inf")) else Decimal(0)
            for v in values
        ]
        # n / d(n) tends to 1, or to sqrt(N) where eps meets the mean of the squares
        limit = c.sqrt(count) if mode.mean else Decimal(1)
        return [c.multiply(limit, v) for v in xhat], xhat, None, None
    xs = [Decimal(v) for v in values]
    sumsq = sum((c.multiply(v, v) for v in xs), Decimal(0))
    n = c.sqrt(sumsq)
    eps = Decimal(spec.eps)
    with localcontext(c):  # the table's operators at the oracle's precision
        d = mode.denominator(_DecimalNamespace, sumsq, n, eps, count)
        r, _ = mode.ratio(_DecimalNamespace, sumsq, n, d, eps, count)
    xhat = [c.divide(v, n) for v in xs] if n > 0 else [Decimal(0)] * len(xs)
    u = [c.divide(v, d) for v in xs]
    return u, xhat, d, r


def forward(x: np.ndarray, scale: np.ndarray | None, spec: Spec) -> np.ndarray:
    """``scale * x / d(n)``, correctly rounded to float64."""
    axes = spec.resolve(x.ndim)
    xr = _rows(np.asarray(x).astype(np.float64), axes)
    sr = _rows(_scale_full(scale, x, axes), axes)
    out = np.empty_like(xr)
    for i, (row, srow) in enumerate(zip(xr, sr, strict=True)):
        terms = _slice_terms(row.tolist(), spec)
        if terms is None:
            out[i] = _NAN
            continue
        u = terms[0]
        out[i] = [float(_CTX.multiply(Decimal(s), ui)) for s, ui in zip(srow, u, strict=True)]
    return _unrows(out, x, axes)


def vjp(
    x: np.ndarray, scale: np.ndarray | None, cotangent: np.ndarray, spec: Spec
) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact ``(dx, dscale)``, each correctly rounded to float64."""
    c = _CTX
    axes = spec.resolve(x.ndim)
    xr = _rows(np.asarray(x).astype(np.float64), axes)
    sr = _rows(_scale_full(scale, x, axes), axes)
    gr = _rows(np.asarray(cotangent).astype(np.float64), axes)
    dx = np.empty_like(xr)
    gu_rows = np.empty_like(xr)  # g * u, summed into dscale afterwards
    for i, (row, srow, grow) in enumerate(zip(xr, sr, gr, strict=True)):
        terms = _slice_terms(row.tolist(), spec)
        if terms is None:
            dx[i] = _NAN
            gu_rows[i] = _NAN
            continue
        u, xhat, d, r = terms
        g = [Decimal(v) for v in grow]
        gu_rows[i] = [float(c.multiply(gi, ui)) for gi, ui in zip(g, u, strict=True)]
        if d is None:  # an Inf slice: the gradient's limit is zero
            dx[i] = 0.0
            continue
        sigma = [c.multiply(Decimal(s), gi) for s, gi in zip(srow, g, strict=True)]
        inner = sum((c.multiply(a, b) for a, b in zip(sigma, xhat, strict=True)), Decimal(0))
        dx[i] = [
            float(c.divide(sg - r * xh * inner, d)) for sg, xh in zip(sigma, xhat, strict=True)
        ]
    dx_full = _unrows(dx, x, axes)
    if scale is None:
        return dx_full, None
    # float64 sums of correctly rounded terms: the oracle's dscale is exact to ~1e-16.
    gu = _unrows(gu_rows, x, axes)
    scale_arr = np.asarray(scale)
    if scale_arr.size == 1:
        dscale = np.asarray(np.sum(gu)).reshape(scale_arr.shape)
    else:
        dscale = np.sum(gu, axis=axes.reduced)
    return dx_full, dscale
