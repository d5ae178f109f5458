"""The bit-level helpers of :mod:`l2norm.jax`'s ladder lowering: reading subnormals and
bfloat16 exactly on a CPU that flushes them (XLA's), and the hooks of the double-word
pair sums (:mod:`l2norm._faithful`): an exact split, the power of two below a value, and
two sums in one reduction.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from l2norm import _faithful
from l2norm._ladder import FORMATS, FloatFormat

__all__ = [
    "PAIRS",
    "bf16_to_f32",
    "exact",
    "magnitude_bits",
    "subnormal",
    "subnormal_upscaled",
    "sum_two",
]


@jax.custom_jvp
def bf16_to_f32(x: jax.Array) -> jax.Array:
    # A float conversion flushes bfloat16 subnormals on CPU; moving the bits does not.
    bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)


bf16_to_f32.defjvp(
    lambda primals, tangents: (bf16_to_f32(*primals), tangents[0].astype(jnp.float32))
)


def exact(x: jax.Array, acc: Any) -> jax.Array:
    """``x`` in the accumulator dtype with its subnormals kept (bfloat16 by its bits)."""
    return bf16_to_f32(x) if x.dtype == jnp.bfloat16 else x.astype(acc)


def magnitude_bits(x: jax.Array) -> tuple[jax.Array, FloatFormat]:
    fmt = FORMATS[jnp.dtype(x.dtype).name]
    int_type = jnp.int64 if fmt.mant > 23 else jnp.int32
    return lax.bitcast_convert_type(x, int_type) & jnp.iinfo(int_type).max, fmt


def subnormal(x: jax.Array) -> jax.Array:
    """Where ``x`` is subnormal or zero, read from the bits (a flushing compare says 0)."""
    magnitude, fmt = magnitude_bits(x)
    return magnitude < (1 << fmt.mant)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def subnormal_upscaled(x: jax.Array, shift: int) -> jax.Array:
    """``x * 2**shift`` for a subnormal ``x`` (garbage elsewhere), built from its bits.

    A subnormal is ``mant * 2**sub`` (``sub`` = -149 for float32): the integer ``mant``
    converts exactly, and two normal power-of-two factors bring it up to a normal number.
    The derivative is ``2**shift``, as for a multiplication.
    """
    magnitude, fmt = magnitude_bits(x)
    low = fmt.subnormal_exp // 2
    value = magnitude.astype(x.dtype) * 2.0**low * 2.0 ** (fmt.subnormal_exp + shift - low)
    return jnp.copysign(value, x)


@subnormal_upscaled.defjvp
def subnormal_upscaled_jvp(shift: int, primals: tuple, tangents: tuple) -> tuple:
    return subnormal_upscaled(primals[0], shift), tangents[0] * 2.0**shift


_HALF_MANTISSA = {"float32": (8, 11), "float64": (11, 25)}


def _split(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v = hi + lo`` exactly, each with half the significand (rounded at the middle
    bit), so that products of halves are exact; no multiply-add for XLA to fuse."""
    exponent_bits, mantissa_bits = _HALF_MANTISSA[jnp.dtype(v.dtype).name]
    hi = lax.reduce_precision(v, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)
    return hi, v - hi


def _pow2_floor(v: jax.Array) -> jax.Array:
    """The power of two at or below each positive normal entry: its exponent bits."""
    fmt = FORMATS[jnp.dtype(v.dtype).name]
    int_type = jnp.int64 if fmt.mant > 23 else jnp.int32
    bits = lax.bitcast_convert_type(v, int_type)
    return lax.bitcast_convert_type(bits & ~((1 << fmt.mant) - 1), v.dtype)


PAIRS = _faithful.PairSums(_split, _pow2_floor)


def _add_two(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], a[1] + b[1]


def sum_two(axes: tuple[int, ...]) -> Any:
    """Two arrays summed over ``axes`` (kept) in one multi-output reduction: XLA:CPU runs
    two sibling reductions of shared producers several times slower."""

    def reduce2(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        zero = jnp.zeros((), a.dtype)
        sa, sb = lax.reduce((a, b), (zero, zero), _add_two, axes)
        shape = [1 if d in axes else a.shape[d] for d in range(a.ndim)]
        return sa.reshape(shape), sb.reshape(shape)

    return reduce2
