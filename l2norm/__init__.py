"""l2norm: one trustworthy L2Normalization layer, identical maths in every framework.

The root package is pure NumPy and imports no deep-learning framework; the adapters
live in ``l2norm.torch``, ``l2norm.keras``, ``l2norm.jax``, ``l2norm.nnx`` and
``l2norm.linen`` and import their framework at the top.

Examples:
    >>> import numpy as np
    >>> import l2norm
    >>> l2norm.l2_normalize(np.array([3.0, 4.0]))
    array([0.6, 0.8])
"""

from l2norm._spec import DEFAULT_EPS, DEFAULT_EPS_MODE, EPS_MODES, PRESETS, Spec
from l2norm.reference import l2_normalize, l2_normalize_vjp

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EPS_MODE",
    "EPS_MODES",
    "PRESETS",
    "Spec",
    "l2_normalize",
    "l2_normalize_vjp",
]
__version__ = "0.1.0"
