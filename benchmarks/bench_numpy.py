"""NumPy: the reference against the naive NumPy idiom and np.copyto.

The reference is the oracle, not a fast path: it promotes to float64 and pre-scales
every slice, so expect it to be several times the naive idiom. It is timed so that the
cost of exactness is on record.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from benchmarks.harness import Suite
from l2norm import l2_normalize, l2_normalize_vjp


def suites(
    shape: tuple[int, ...], dtype: str, quick: bool = False, device: str = "cpu"
) -> list[Suite]:
    """Forward and forward+backward on an NCHW ``shape`` (channel axis 1), on the CPU."""
    if device != "cpu":
        raise ValueError(f"NumPy runs on the CPU only, not {device!r}")
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np_dtype)
    w = np.full(shape[1], 20.0, dtype=np_dtype)
    w_view = w.reshape(1, -1, *([1] * (len(shape) - 2)))
    g = np.ones_like(x)
    out = np.empty_like(x)

    def naive():
        return x / np.sqrt((x * x).sum(axis=1, keepdims=True)) * w_view

    def naive_fwd_bwd():
        n = np.sqrt((x * x).sum(axis=1, keepdims=True))
        u = x / n
        sg = g * w_view
        dx = (sg - u * (sg * u).sum(axis=1, keepdims=True)) / n
        dw = (g * u).sum(axis=(0, *range(2, x.ndim)))
        return dx, dw

    copy = {"copy": lambda: np.copyto(out, x)}
    return [
        Suite(
            "numpy",
            "forward",
            False,
            shape,
            dtype,
            {"l2norm": lambda: l2_normalize(x, w, axis=1), "naive_numpy": naive, **copy},
        ),
        Suite(
            "numpy",
            "forward+backward",
            False,
            shape,
            dtype,
            {
                "l2norm": lambda: l2_normalize_vjp(x, w, g, axis=1),
                "naive_numpy": naive_fwd_bwd,
                **copy,
            },
        ),
    ]
