r"""The exported formula: l2norm in a dozen standard operations that every deployment
runtime has (ONNX, TFLite builtins), overflow-safe in every dtype, with a stated bound.

The fast lowerings (:mod:`l2norm.core.ladder`, the native and Triton kernels) rely on wide
accumulators, bit manipulation or XLA's own reductions, which a deployment runtime lacks.
An exported graph instead divides each slice by its largest magnitude before squaring,
the classic scaled norm (LAPACK's ``nrm2`` before 3.10), written without branches:

.. math::

    q = \max(\max_i |x_i|,\ \tau), \qquad t_i = x_i / q, \qquad
    S = \sum_i t_i^2, \qquad y = s \cdot \frac{t}{D(\sqrt S,\ \varepsilon / q^p)}

with ``tau`` the eps placement's threshold (:meth:`~l2norm.core.modes.EpsMode.threshold`,
at least the working dtype's smallest normal number), ``p`` the placement's power and
``D`` its denominator (:meth:`~l2norm.core.modes.EpsMode.denominator`) in the units of the
slice divided by ``q``. The result does not depend on ``q`` in exact arithmetic
(``q D(n / q, eps / q**p) = d(n)`` for every placement), so ``q`` is free to keep every
intermediate in range:

* ``|t| <= 1`` and ``S >= 1`` wherever the data exceed the threshold (the largest entry
  has ``t = ±1``): nothing overflows or underflows, whatever the slice's magnitude;
* below the threshold ``q = tau`` makes the scaled eps ``eps / q**p <= 1`` (it cannot
  overflow, also for a slice of subnormals), and an all-zero slice needs no select
  (``t = 0``, ``D = D(0, eps / tau**p) > 0``, ``y = 0``);
* a slice holding ±Inf has ``q = Inf``: its infinite entries are replaced by their signs
  by one select (``t = ±1``; every other entry is ``x / Inf = 0``), the scaled eps is 0
  and ``y = ±s / sqrt(k)`` for its ``k`` infinite entries, the reference's limit;
* a NaN anywhere in a slice reaches ``S`` and makes the whole slice NaN.

The square root reads ``S`` plus the smallest normal number: this changes no value
(``S >= 1`` above the threshold; below it the scaled eps, about 1, dominates ``D``), and
keeps autodiff's derivative of the square root finite at an all-zero slice, where the
gradient is then the exact ``s g / d(0)``.

Half-precision data (float16, bfloat16) are computed in float32, float32 in float32 and
float64 in float64: no operation a runtime may lack (float64 in TFLite or TensorRT).
:func:`forward_ulps` states the bound this gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from l2norm.core.ladder import FORMATS
from l2norm.core.modes import EpsMode

__all__ = ["FORMULA_ULPS", "forward_ulps", "normalized", "working_dtype"]

#: The rounding errors of the formula outside the sum of squares, in units of the
#: working precision, to first order: at most 6 in every placement (``x / q`` counted
#: twice through its square, the square, the square root, the eps term, ``t / D``, the
#: scale's product; the scaled eps, 2 or 3 roundings, where it is not smaller than ``S``).
FORMULA_ULPS = 6.0


def working_dtype(dtype: str) -> str:
    """The dtype the formula computes in for data of ``dtype``: float32 for half
    precision, else the dtype itself."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def forward_ulps(dtype: str, size: int) -> float:
    r"""The forward bound of an exported graph for slices of ``size`` entries, in ULPs of
    ``dtype`` against the reference rounded to ``dtype`` (the measure of
    :func:`l2norm.conformance._measures.forward_error`), for every input: finite, Inf and
    NaN slices alike.

    A sum of ``k`` squares in any order has a relative error of at most ``(k - 1) u``
    (``u`` the working precision's unit roundoff); the square root halves it and the
    rest of the formula adds :data:`FORMULA_ULPS` roundings, so the output's relative
    error is at most ``e = (k / 2 + 6) u``: ``k / 2 + 6`` ULPs where the working dtype is
    the data's (float32, float64), plus half an ULP for the reference's own rounding.
    Half-precision data are computed in float32 and rounded once at the end, half an ULP
    from the exact result plus ``e`` in half-precision ULPs (``(k / 2 + 6) 2**-13`` in
    float16): while that stays below one ULP the output is one of the two neighbours of
    the exact result (faithful), within 1 ULP of the rounded reference, which holds for
    slices of up to 8180 entries in float16 and 65000 in bfloat16.

    Example:
        >>> forward_ulps("float16", 512), forward_ulps("float32", 16)
        (1.0, 15.0)
    """
    work = working_dtype(dtype)
    relative = (size / 2 + FORMULA_ULPS) * 2.0 ** -(FORMATS[work].mant + 1)
    # |v| e / ulp(v) < e / u for a relative error e: ULPs of the output.
    error = relative / 2.0 ** -(FORMATS[dtype].mant + 1)
    if work == dtype:
        return float(math.ceil(error + 0.5))
    return 1.0 if 0.5 + error < 1.0 else float(math.ceil(1.0 + error))


def normalized(
    xp: Any,
    x: Any,
    scale: Any | None,
    mode: EpsMode,
    eps: float,
    reduce_max: Callable[[Any], Any],
    reduce_sum: Callable[[Any], Any],
    working: str,
    count: Any = 1,
) -> Any:
    """``scale * x / d(||x||)`` by the max-scaled formula, in ``x``'s (working) dtype.

    Args:
        xp: the array namespace (``abs``, ``maximum`` of an array and a Python float
            that keeps Inf, ``where``, ``sign``, ``sqrt``).
        x: the data in the working dtype (:func:`working_dtype`).
        scale: None or the scale in the working dtype, broadcastable to ``x``.
        mode: the eps placement; ``eps`` its epsilon.
        reduce_max, reduce_sum: reductions over the normalized axes that keep them.
        working: the name of ``x``'s dtype.
        count: the slice size (an int, or a symbolic size), read by a mean placement.

    Example:
        >>> import numpy as np
        >>> from l2norm.core.modes import get_mode
        >>> x = np.array([[1.5e38, 2e38], [0.0, 0.0]], dtype=np.float32)  # n**2 overflows
        >>> keep = lambda f: lambda v: f(v, axis=-1, keepdims=True)
        >>> normalized(np, x, None, get_mode("clamp_norm"), 1e-12,
        ...            keep(np.max), keep(np.sum), "float32")
        array([[0.6, 0.8],
               [0. , 0. ]], dtype=float32)
    """
    fmt = FORMATS[working]
    smallest, largest = 2.0**fmt.min_exp, (2.0 - 2.0**-fmt.mant) * 2.0 ** (fmt.max_exp - 1)
    magnitude = xp.abs(x)
    # (The mean's own threshold, sqrt(N eps), would do too: q >= sqrt(eps) already keeps
    # the scaled eps at most 1, and needs no square root of a symbolic size.)
    q = xp.maximum(reduce_max(magnitude), max(mode.threshold(eps), smallest))
    # Inf entries (only in a slice whose q is Inf) become their signs; x / Inf is 0.
    # (Compared with the largest finite value: the TFLite converter stores an Inf
    # constant as that value.)
    t = xp.where(magnitude > largest, xp.sign(x), x / q)
    sumsq = reduce_sum(t * t)
    # + smallest changes no value (S >= 1 above the threshold; below it the scaled eps,
    # about 1, dominates) and keeps the square root's derivative finite at S = 0. (Not a
    # clamp: ONNX's Clip also clamps Inf to the dtype's largest value.)
    norm = xp.sqrt(sumsq + smallest)
    u = t / mode.denominator(xp, sumsq, norm, mode.scaled_eps(eps, q), count)
    return u if scale is None else u * scale
