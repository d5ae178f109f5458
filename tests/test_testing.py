"""l2norm.testing: the public assertion helper and the hostile strategies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from l2norm import l2_normalize
from l2norm.conformance import numpy_dtype
from l2norm.core.spec import FLOAT_DTYPES
from l2norm.testing import assert_matches_reference
from l2norm.testing.strategies import hostile_arrays, options


@given(x=hostile_arrays(axis=1, allow_nan=True, allow_infinity=True), opts=options())
def test_reference_matches_itself_on_hostile_arrays(x, opts):
    assert_matches_reference(
        lambda a, s: l2_normalize(a, s, axis=1, **opts), x, None, axis=1, **opts
    )


@given(x=hostile_arrays("float32", shape=(3, 4), axis=-1))
def test_hostile_arrays_respect_dtype_shape_and_stay_finite(x):
    assert x.dtype == np.float32 and x.shape == (3, 4)
    assert np.isfinite(x).all()


def test_naive_layer_is_caught_with_index_and_values():
    def naive(x, scale):
        return (x / np.sqrt((x * x).sum(-1, keepdims=True)) * scale).astype(x.dtype)

    x = np.array([[3e20, 4e20], [3.0, 4.0]], np.float32)
    with pytest.raises(AssertionError, match=r"first at index \(0, 0\): got 0.0, reference 12.0"):
        assert_matches_reference(naive, x, np.float32(20.0))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda x, s: x[:1], "output shape"),
        (lambda x, s: x.astype(np.float64), "output dtype"),
        (lambda x, s: np.full_like(x, np.nan), "ULP"),
    ],
)
def test_shape_dtype_and_nan_mismatches_fail(bad, match):
    with pytest.raises(AssertionError, match=match):
        assert_matches_reference(bad, np.ones((2, 3), np.float32))


def test_bound_accepts_one_ulp_and_refuses_more():
    x = np.array([[3.0, 4.0]], np.float32)

    def one_ulp_up(a, s):
        return np.nextafter(l2_normalize(a), np.float32(np.inf))

    assert_matches_reference(one_ulp_up, x, forward_ulps=1)
    with pytest.raises(AssertionError, match="bound 0.5"):
        assert_matches_reference(one_ulp_up, x, forward_ulps=0.5)


def test_torch_converters_keep_every_bit_bfloat16_included():
    torch = pytest.importorskip("torch")
    from l2norm.testing.frameworks import numpy_to_torch, torch_kwargs, torch_to_numpy

    for dtype in FLOAT_DTYPES:
        a = np.array([1.5, -0.0, np.inf, 3e-39, np.nan], np.float64).astype(numpy_dtype(dtype))
        t = numpy_to_torch(a)
        assert str(t.dtype) == f"torch.{dtype}"
        back = torch_to_numpy(t)
        assert back.dtype == a.dtype and back.tobytes() == a.tobytes()
    a = np.ones(3, np.float32)
    numpy_to_torch(a).add_(1)  # a copy: the caller's array is left alone
    assert (a == 1).all() and torch_to_numpy(torch.ones(2, requires_grad=True)).sum() == 2
    assert torch_kwargs({"axis": 1, "eps": 1e-6}) == {"dim": 1, "eps": 1e-6}
