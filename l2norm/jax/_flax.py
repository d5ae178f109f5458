"""What :mod:`l2norm.nnx` and :mod:`l2norm.linen` share, in one place so that the two
layers cannot drift apart: the initial scale, the dtype checks and the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2norm.core.spec import Spec, check_float_dtype, scale_init_values
from l2norm.jax import normalize

__all__ = ["layer_apply", "layer_check_dtype", "layer_initial_scale", "layer_scale_shape"]


def layer_scale_shape(num_features: int, channel_shared: bool) -> tuple[int, ...]:
    return (1,) if channel_shared else (num_features,)


def layer_initial_scale(
    scale_init: Any,
    num_features: int,
    channel_shared: bool,
    param_dtype: Any,
    key: jax.Array | None,
) -> jax.Array:
    """The initial scale: a number, one value per channel, or a Flax initializer."""
    check_float_dtype(jnp.dtype(param_dtype).name, what="param_dtype")
    shape = layer_scale_shape(num_features, channel_shared)
    if callable(scale_init):
        if key is None:
            raise ValueError(
                "scale_init is an initializer, which needs a random key: pass rngs=nnx.Rngs(...)"
            )
        value = jnp.asarray(scale_init(key, shape, param_dtype))
        if value.shape != shape:
            raise ValueError(
                f"scale_init returned shape {value.shape}, expected {shape} "
                f"(num_features={num_features}, channel_shared={channel_shared})"
            )
        return value.astype(param_dtype)
    values = scale_init_values(scale_init, num_features, channel_shared)
    return jnp.asarray(values.astype(np.float64), dtype=param_dtype)


def layer_check_dtype(dtype: Any) -> None:
    if dtype is not None:
        check_float_dtype(jnp.dtype(dtype).name, what="dtype")


def layer_apply(
    x: Any,
    scale: jax.Array | None,
    spec: Spec,
    num_features: int | None,
    dtype: Any,
    op: Callable[[jax.Array, jax.Array | None, Spec], jax.Array] = normalize,
) -> jax.Array:
    """Check ``x`` against the layer and normalize it by ``op`` (default the L2 op; the
    RMSNorm layers pass theirs); errors raise at trace time."""
    x = jnp.asarray(x)
    check_float_dtype(jnp.dtype(x.dtype).name, what="the input")
    axes = spec.resolve(x.ndim)
    channels = x.shape[axes.channel]
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"the input has {channels} features on its channel axis {axes.channel} "
            f"(shape {tuple(x.shape)}), but the layer was built with "
            f"num_features={num_features}"
        )
    if dtype is not None:
        x = x.astype(dtype)
        scale = None if scale is None else scale.astype(dtype)
    return op(x, scale, spec)
