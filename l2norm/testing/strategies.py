"""Hypothesis strategies for hostile L2-normalization inputs.

Requires ``hypothesis`` (the ``test`` extra). Every strategy draws NumPy arrays in one
of l2norm's dtypes, with the slices that break naive layers mixed into ordinary data:
all-zero slices, subnormals, values whose squares overflow or underflow the dtype, and
optionally NaN and Inf.

Example::

    from hypothesis import given
    from l2norm.testing import assert_matches_reference
    from l2norm.testing.strategies import hostile_arrays

    @given(hostile_arrays("float32", axis=1))
    def test_my_layer(x):
        assert_matches_reference(my_layer, x, None, axis=1)
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from l2norm.conformance import HOSTILE, numpy_dtype
from l2norm.core.spec import EPS_MODES, FLOAT_DTYPES, PRESETS

__all__ = ["dtypes", "hostile_arrays", "options", "shapes"]


def dtypes() -> st.SearchStrategy[str]:
    """One of ``float16``, ``bfloat16``, ``float32``, ``float64``."""
    return st.sampled_from(FLOAT_DTYPES)


def shapes(min_dims: int = 2, max_dims: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """Small shapes (sides 1 to 6)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=6)


def options() -> st.SearchStrategy[dict]:
    """Keyword options for :func:`l2norm.l2_normalize`: an eps placement or a preset."""
    by_mode = st.fixed_dictionaries(
        {"eps_mode": st.sampled_from(EPS_MODES)},
        optional={"eps": st.sampled_from([1e-12, 1e-10, 1e-6, 0.5])},
    )
    return st.one_of(
        st.just({}), by_mode, st.builds(lambda p: {"preset": p}, st.sampled_from(sorted(PRESETS)))
    )


@st.composite
def hostile_arrays(
    draw,
    dtype: str | None = None,
    shape: tuple[int, ...] | None = None,
    axis: int = -1,
    allow_nan: bool = False,
    allow_infinity: bool = False,
) -> np.ndarray:
    """An array whose slices along ``axis`` are ordinary, zero, huge, tiny or subnormal.

    Args:
        dtype: a dtype name, or None to draw one.
        shape: the shape, or None to draw one (rank 2 to 4).
        axis: the normalized axis; each slice along it gets one kind of values.
        allow_nan: also plant NaN entries.
        allow_infinity: also plant ±Inf entries.
    """
    dtype = draw(dtypes()) if dtype is None else dtype
    shape = draw(shapes()) if shape is None else shape
    kinds = ["ordinary", "zero", "huge", "tiny", "subnormal"]
    moved_shape = list(shape)
    channels = moved_shape.pop(axis % len(shape))
    rows = []
    for _ in range(int(np.prod(moved_shape))):
        kind = draw(st.sampled_from(kinds))
        if kind == "zero":
            rows.append(np.zeros(channels))
            continue
        values = draw(hnp.arrays(np.float64, (channels,), elements=st.floats(-4, 4)))
        magnitude = 1.0 if kind == "ordinary" else HOSTILE[dtype][kind]
        rows.append(values * magnitude)
    x = (
        np.stack(rows).reshape([*moved_shape, channels])
        if rows
        else np.zeros(moved_shape + [channels])
    )
    x = np.moveaxis(x, -1, axis % len(shape))
    if allow_nan or allow_infinity:
        specials = ([np.nan] if allow_nan else []) + ([np.inf, -np.inf] if allow_infinity else [])
        flat = x.reshape(-1).copy()
        for _ in range(draw(st.integers(0, 2))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(specials))
        x = flat.reshape(x.shape)
    with np.errstate(over="ignore"):
        return x.astype(numpy_dtype(dtype))
