"""The bit-level helpers of :mod:`l2norm.jax`'s ladder lowering: reading subnormals and
bfloat16 exactly on a CPU that flushes them (XLA's), and the hooks of the double-word
pair sums (:mod:`l2norm.core.faithful`): an exact split, the power of two below a value, and
two sums in one reduction.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from l2norm.core import driver as _driver
from l2norm.core.ladder import FORMATS, FloatFormat

__all__ = [
    "PAIRS",
    "bf16_to_f32",
    "exact",
    "infinite",
    "magnitude_bits",
    "subnormal",
    "subnormal_upscaled",
    "sum_two",
    "upscaled",
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


def _ints(v: jax.Array) -> tuple[jax.Array, FloatFormat]:
    fmt = FORMATS[jnp.dtype(v.dtype).name]
    return lax.bitcast_convert_type(v, jnp.int64 if fmt.mant > 23 else jnp.int32), fmt


#: How JAX reads and writes a float's bits (:class:`l2norm.core.driver.Bits`).
BITS = _driver.Bits(
    _ints,
    lambda bits, like: lax.bitcast_convert_type(bits, like.dtype),
    lambda ints, like: ints.astype(like.dtype),
)

#: The pairs' split and floor from the bits (:func:`l2norm.core.driver.bit_pairs`).
PAIRS = _driver.bit_pairs(BITS)


def magnitude_bits(x: jax.Array) -> tuple[jax.Array, FloatFormat]:
    bits, fmt = _ints(x)
    return bits & jnp.iinfo(bits.dtype).max, fmt


def infinite(x: jax.Array) -> jax.Array:
    """Where ``x`` is +-Inf, from the bits: a float compare would be shared with the sums'
    ``|x|`` and make XLA write ``|x|`` out in full."""
    magnitude, fmt = magnitude_bits(x)
    return magnitude == ((2 * fmt.max_exp - 1) << fmt.mant)  # the bits of +Inf


def subnormal(x: jax.Array) -> jax.Array:
    """Where ``x`` is subnormal or zero, read from the bits (a flushing compare says 0)."""
    return _driver.subnormal(BITS, x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def subnormal_upscaled(x: jax.Array, shift: int) -> jax.Array:
    """:func:`l2norm.core.driver.upscaled_from_bits` with the derivative of a multiplication,
    ``2**shift``."""
    return _driver.upscaled_from_bits(jnp, BITS, x, shift)


@subnormal_upscaled.defjvp
def subnormal_upscaled_jvp(shift: int, primals: tuple, tangents: tuple) -> tuple:
    return subnormal_upscaled(primals[0], shift), tangents[0] * 2.0**shift


def upscaled(x: jax.Array, shift: int) -> jax.Array:
    """``x * 2**shift`` exactly (:func:`l2norm.core.driver.exact_upscale`)."""
    return _driver.exact_upscale(jnp, BITS, x, shift, subnormal_upscaled)


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
