"""Double-word arithmetic (:mod:`l2norm.core.pairs`) and the lowerings' exact splits.

The error-free transformations are checked exactly (in float64 or with Python's exact
fractions), the pair operations against 60-digit mpmath, and each framework's split for
the two properties Dekker's product needs: ``hi + lo == v`` and both halves short enough
that their products are exact.
"""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from l2norm.core.modes import MODES
from l2norm.core.pairs import Pair, PairNamespace, two_prod, two_sum

mpmath.mp.dps = 60


def _split32(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.asarray(v, np.float32).view(np.int32)
    hi = ((bits + np.int32(1 << 11)) & np.int32(~((1 << 12) - 1))).view(np.float32)
    return hi, np.float32(v) - hi


# Products and sums in range: no overflow, no error term below the normal range.
finite32 = st.floats(
    min_value=-(2.0**50), max_value=2.0**50, allow_nan=False, allow_infinity=False, width=32
).filter(lambda v: v == 0 or abs(v) > 2.0**-50)


def _exact(*values) -> Fraction:
    return sum((Fraction(float(v)) for v in values), Fraction(0))


@given(finite32, finite32)
def test_two_sum_is_exact(a, b):
    s, e = two_sum(np.float32(a), np.float32(b))
    assert s == np.float32(np.float32(a) + np.float32(b))
    assert _exact(s, e) == _exact(a, b)


@given(finite32, finite32)
def test_two_prod_carries_the_product_to_thrice_the_precision(a, b):
    # Built from exact products of halves (so that a fused multiply-add cannot change
    # it): p is the rounded product up to 1 ULP, p + e the exact one up to ~u**3.
    p, e = two_prod(np.float32(a), np.float32(b), _split32)
    exact = Fraction(float(a)) * Fraction(float(b))
    assert abs(Fraction(float(p)) - exact) <= abs(Fraction(float(np.spacing(np.float32(p)))))
    assert abs(_exact(p, e) - exact) <= abs(exact) * Fraction(2) ** -66


def _value(p: Pair) -> mpmath.mpf:
    return mpmath.mpf(float(p.hi)) + mpmath.mpf(float(p.lo))


@given(
    st.floats(2.0**-20, 2.0**20, width=32),
    st.floats(2.0**-20, 2.0**20, width=32),
)
def test_pair_operations_carry_twice_the_precision(a, b):
    ns = PairNamespace(np, _split32)
    pa, pb = ns.pair(np.float32(a)), ns.pair(np.float32(b))
    ma, mb = mpmath.mpf(float(np.float32(a))), mpmath.mpf(float(np.float32(b)))
    u2 = mpmath.mpf(2) ** -44  # (2**-24)**2 * 16: the double-word bounds' order
    for got, want in (
        (pa + pb, ma + mb),
        (pa - pb, ma - mb),
        (pa * pb, ma * mb),
        (pa / pb, ma / mb),
        (ns.sqrt(pa), mpmath.sqrt(ma)),
    ):
        if want != 0:
            assert abs(_value(got) - want) <= u2 * abs(want)


class _MP:
    """The table's namespace on mpmath scalars."""

    sqrt = staticmethod(mpmath.sqrt)
    where = staticmethod(lambda cond, a, b: a if cond else b)


def test_the_mode_table_runs_on_pairs():
    # Each placement's d(n), written once in l2norm.core.modes, gives on pairs what it gives
    # in 60 digits: the table needs no double-word copy.
    ns = PairNamespace(np, _split32)
    rng = np.random.default_rng(0)
    n2 = (rng.uniform(0, 4, 64) ** 2).astype(np.float32)
    eps = np.full(64, 1.5, np.float32)
    for mode in MODES.values():
        a = ns.pair(n2)
        d = mode.denominator(ns, a, ns.sqrt(a), ns.pair(eps))
        for i in range(64):
            m = mpmath.mpf(float(n2[i]))
            want = mode.denominator(_MP, m, mpmath.sqrt(m), mpmath.mpf(1.5))
            got = mpmath.mpf(float(d.hi[i])) + mpmath.mpf(float(d.lo[i]))
            assert abs(got - want) <= mpmath.mpf(2) ** -44 * want, (mode.name, n2[i])


# --------------------------------------------------------------------------- the splits

SPLIT_VALUES = [0.0, -0.0, 1.0, -1.0, 3.0, 1 / 3, -2 / 3, 1e300, -1e-300, 5e-324, 2.2e-308]


def _significant_bits(v: float) -> int:
    if v == 0:
        return 0
    num, den = Fraction(v).as_integer_ratio()
    num = abs(num)
    while num % 2 == 0:
        num //= 2
    return num.bit_length()


def _check_split(values: np.ndarray, hi: np.ndarray, lo: np.ndarray, half: int) -> None:
    for v, h, low in zip(values.tolist(), hi.tolist(), lo.tolist(), strict=True):
        assert Fraction(h) + Fraction(low) == Fraction(v), (v, h, low)
        assert _significant_bits(h) <= half and _significant_bits(low) <= half, (v, h, low)


def _values(dtype) -> np.ndarray:
    rng = np.random.default_rng(1)
    finfo = np.finfo(dtype)
    extra = rng.standard_normal(200) * np.exp2(rng.integers(-60, 60, 200))
    values = np.concatenate([np.array(SPLIT_VALUES), extra, [finfo.max / 4, finfo.tiny]])
    with np.errstate(over="ignore", under="ignore"):
        values = values.astype(dtype)
    return values[np.isfinite(values)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_split_is_exact_and_halves_are_short(dtype):
    import torch

    from l2norm.torch._ops import _split

    values = _values(dtype)
    hi, lo = _split(torch.from_numpy(values))
    _check_split(values, hi.numpy(), lo.numpy(), 12 if dtype == "float32" else 26)


def test_jax_split_is_exact_and_halves_are_short():
    # float32 (float64 arrays need jax_enable_x64; l2norm check's float64 rows cover it).
    import jax.numpy as jnp

    from l2norm.jax._bits import PAIRS

    values = _values("float32")
    hi, lo = PAIRS.split(jnp.asarray(values))
    # XLA on the CPU flushes subnormal results: the split is exact for normal values.
    normal = np.abs(values) >= np.finfo(np.float32).tiny * 2**13
    _check_split(values[normal], np.asarray(hi)[normal], np.asarray(lo)[normal], 12)


def test_tensorflow_split_is_exact_and_halves_are_short():
    import tensorflow as tf

    from l2norm.tensorflow._ops import _split

    values = _values("float64")
    hi, lo = _split(tf.constant(values))
    # TensorFlow's CPU kernels flush subnormal results: exact where the low half is normal.
    normal = np.abs(values) >= np.finfo(np.float64).tiny * 2**27
    _check_split(values[normal], hi.numpy()[normal], lo.numpy()[normal], 26)
