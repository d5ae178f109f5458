"""l2norm: one trustworthy L2Normalization layer, identical maths in every framework.

The root package is pure NumPy and imports no deep-learning framework; the adapters
live in ``l2norm.torch``, ``l2norm.keras``, ``l2norm.jax``, ``l2norm.nnx`` and
``l2norm.linen`` and import their framework at the top. RMSNorm is the same op with the
mean of the squares as the eps placement: :func:`rms_norm` here, ``rms_norm`` /
``RMSNorm`` in each adapter.

Examples:
    >>> import numpy as np
    >>> import l2norm
    >>> l2norm.l2_normalize(np.array([3.0, 4.0]))
    array([0.6, 0.8])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from l2norm import reference
from l2norm.core.spec import (
    DEFAULT_EPS,
    DEFAULT_EPS_MODE,
    DEFAULT_RMS_EPS,
    EPS_MODES,
    PRESETS,
    RMS_PRESETS,
    ArrayOps,
    RMSSpec,
    Spec,
    is_python_number,
)
from l2norm.reference import l2_normalize, l2_normalize_vjp

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EPS_MODE",
    "DEFAULT_RMS_EPS",
    "EPS_MODES",
    "PRESETS",
    "RMS_PRESETS",
    "RMSSpec",
    "Spec",
    "l2_normalize",
    "l2_normalize_vjp",
    "rms_norm",
]
__version__ = "0.1.0"


def _numpy_dtype(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


#: The reference's arrays for :meth:`RMSSpec.apply`.
NUMPY_OPS = ArrayOps(
    normalize=reference.forward,
    cast=lambda t, name: np.asarray(t).astype(_numpy_dtype(name)),
    dtype=lambda t: np.asarray(t).dtype.name,
    multiply=np.multiply,
    reshape=np.reshape,
)


def rms_norm(
    x: Any,
    scale: Any = None,
    *,
    axis: int | Sequence[int] = -1,
    eps: float | None = None,
    preset: str | None = None,
) -> np.ndarray:
    r"""RMSNorm: ``y = scale * x / sqrt(mean(x**2) + eps)`` over ``axis``, the reference.

    The L2 op with ``eps_mode="add_meansq"`` (``d = sqrt(n**2 / N + eps)``, ``N`` the
    slice size): computed exactly and rounded once to ``x``'s dtype, the NaN / Inf /
    extreme-magnitude rules of :func:`l2_normalize` included.

    Args:
        x: float16, bfloat16 (``ml_dtypes``), float32 or float64 array, rank >= 1.
        scale: None; a Python number, a scalar or shape ``(1,)`` float array; or one
            value per channel of the channel axis (the first of ``axis``). Its dtype
            follows the scale dtype rule of :func:`l2_normalize`.
        axis: the normalized axis, or a tuple of axes whose first entry is the channel
            axis.
        eps: positive finite epsilon; default ``1e-6``, or the preset's.
        preset: a peer's convention (:data:`RMS_PRESETS`): ``"torch"`` (eps None: the
            dtype's machine epsilon), ``"keras"``, ``"flax"``, ``"llama"`` (normalized in
            float32, cast to ``x``'s dtype, then multiplied by the weight), ``"gemma"``
            (scale ``1 + w``, all in float32) or ``"t5"``. See ``docs/rmsnorm.md``.

    Returns:
        An array of ``x``'s shape; its dtype is ``x``'s, or what the preset's peer returns.

    Examples:
        >>> import numpy as np
        >>> from l2norm import rms_norm
        >>> rms_norm(np.array([[3.0, 4.0], [0.0, 0.0]]), eps=1e-300) ** 2  # mean(y**2) = 1
        array([[0.72, 1.28],
               [0.  , 0.  ]])
        >>> w = np.float32([2.0, 3.0])
        >>> rms_norm(np.float32([[1.0, -1.0]]), w, eps=1e-30, preset="gemma")  # scale 1 + w
        array([[ 3., -4.]], dtype=float32)
    """
    x = np.asarray(x)
    if scale is not None and not is_python_number(scale):  # a number stays weakly typed
        scale = np.asarray(scale)
    return RMSSpec.create(axis=axis, eps=eps, preset=preset).apply(x, scale, NUMPY_OPS)
