"""Public helpers for checking an L2 normalization against the l2norm reference.

For users who keep their own layer, or port one: :func:`assert_matches_reference`
compares any callable with the reference under the same options, in ULPs of the
output dtype. Hypothesis strategies for hostile inputs are in
:mod:`l2norm.testing.strategies` (needs ``hypothesis``, in the ``test`` extra);
bit-exact NumPy <-> torch / Keras converters and a Keras VJP helper, as the conformance
suite uses them, in :mod:`l2norm.testing.frameworks`.

Example: checking a hand-written layer (ssd.pytorch's formula, in NumPy)::

    >>> import numpy as np
    >>> from l2norm.testing import assert_matches_reference
    >>> def my_l2norm(x, scale):
    ...     norm = np.sqrt((x * x).sum(axis=1, keepdims=True)) + 1e-10
    ...     return (x / norm * scale[None, :, None, None]).astype(x.dtype)
    >>> x = np.random.default_rng(0).standard_normal((2, 8, 3, 3)).astype(np.float32)
    >>> assert_matches_reference(my_l2norm, x, np.full(8, 20.0, np.float32),
    ...                          axis=1, preset="ssd.pytorch", forward_ulps=8)
    >>> x[0, :, 0, 0] = 1e25  # its squares overflow float32: the layer returns 0
    >>> assert_matches_reference(my_l2norm, x, np.full(8, 20.0, np.float32),
    ...                          axis=1, preset="ssd.pytorch", forward_ulps=8)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    AssertionError: ... ULP ... at index (0, 0, 0, 0): got 0.0, reference 7.07...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from l2norm import conformance, reference
from l2norm.core.spec import Spec

__all__ = ["assert_matches_reference"]


def assert_matches_reference(
    fn: Callable[[np.ndarray, Any], Any],
    x: np.ndarray,
    scale: Any = None,
    *,
    forward_ulps: float | None = None,
    **options: Any,
) -> None:
    """Assert ``fn(x, scale)`` equals :func:`l2norm.l2_normalize` within ``forward_ulps``.

    Args:
        fn: the implementation under test; it receives ``x`` and ``scale`` as given and
            returns something ``np.asarray`` accepts (a tensor on the CPU is fine).
        x: the input, a float16, bfloat16, float32 or float64 NumPy array.
        scale: None, one shared value, or one value per channel.
        forward_ulps: the bound in ULPs of ``x``'s dtype (default: the bound l2norm's
            own adapters are held to, 1 for float16/bfloat16, 4 for float32/float64).
        **options: the reference's keywords: ``axis``, ``across_spatial``, ``eps``,
            ``eps_mode``, ``preset``.

    Raises:
        AssertionError: with the max ULP error, the first failing index, the value
            received there and the reference value; also on a shape or dtype mismatch
            or a NaN/Inf where the reference has none (or the other way round).
    """
    x = np.asarray(x)
    spec = Spec.create(**options)
    want = reference.forward(x, scale, spec)
    got = np.asarray(fn(x, scale))
    if got.shape != want.shape:
        raise AssertionError(f"output shape {got.shape}, reference shape {want.shape}")
    if got.dtype != want.dtype:
        raise AssertionError(f"output dtype {got.dtype}, reference dtype {want.dtype}")
    bound = conformance.DEFAULT_FORWARD_ULPS[x.dtype.name] if forward_ulps is None else forward_ulps
    got64 = got.astype(np.float64)
    want64 = want.astype(np.float64)
    with np.errstate(all="ignore"):
        ulps = np.abs(got64 - want64) / conformance.ulp(want64, x.dtype, floor_normal=False)
    same_nonfinite = (np.isnan(got64) & np.isnan(want64)) | (np.isinf(want64) & (got64 == want64))
    ulps = np.where(same_nonfinite, 0.0, ulps)
    ulps = np.where(np.isnan(ulps), np.inf, ulps)  # NaN or Inf on one side only
    worst = float(ulps.max(initial=0.0))
    if worst <= bound:
        return
    index = tuple(int(i) for i in np.argwhere(ulps > bound)[0])
    raise AssertionError(
        f"max error {worst:.4g} ULP (bound {bound:g}) at {int((ulps > bound).sum())} element(s); "
        f"first at index {index}: got {float(got64[index])!r}, reference {float(want64[index])!r}"
    )
