"""L2 normalization (ParseNet / SSD) and RMSNorm layers for Flax NNX, over :mod:`l2norm.jax`.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from l2norm.nnx import L2Norm
    >>> layer = L2Norm(512, rngs=nnx.Rngs(0))  # SSD's conv4_3 norm, gamma = 20
    >>> layer(jnp.ones((2, 38, 38, 512))).shape
    (2, 38, 38, 512)
    >>> float(layer.scale[0])
    20.0
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from l2norm.core.spec import RMSSpec, Spec
from l2norm.jax import JAX_OPS, _flax

__all__ = ["L2Norm", "Constant", "RMSNorm"]


def _check_num_features(num_features: Any) -> None:
    if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool):
        raise TypeError(f"num_features must be an int, got {num_features!r}")
    if num_features < 1:
        raise ValueError(f"num_features must be positive, got {num_features}")


class Constant(nnx.Variable):
    """A non-learnable scale: saved with the state, left alone by ``nnx.Optimizer``
    (which updates ``nnx.Param`` only) and by ``nnx.grad`` over ``nnx.Param``."""


class L2Norm(nnx.Module):
    """``y = scale * x / ||x||`` along the channel axis, with a learnable per-channel scale.

    Args:
        num_features: the number of channels on the channel axis (checked at call).
        axis: the normalized (and channel) axis, or a tuple of axes whose first entry
            is the channel axis. Default ``-1`` (NHWC, Flax's layout).
        scale_init: a number (SSD uses 20, the default), one value per channel, or a
            Flax initializer ``init(key, shape, dtype)`` (which needs ``rngs``).
        channel_shared: one scale for every channel (Caffe's ``channel_shared``).
        across_spatial: one norm per sample over every axis but the first.
        learnable: False stores the scale as a :class:`Constant` variable, which is
            serialized with the state but not trained.
        eps: epsilon; see :func:`l2norm.jax.l2_normalize`.
        eps_mode: where eps goes; see :func:`l2norm.jax.l2_normalize`.
        preset: a peer's (eps_mode, eps); see :func:`l2norm.jax.l2_normalize`.
        dtype: the compute and output dtype; None keeps the input's dtype (float16 and
            bfloat16 are computed in float32 either way).
        param_dtype: the storage dtype of the scale.
        rngs: only needed when ``scale_init`` is an initializer.

    Raises:
        TypeError / ValueError: at construction for bad options, at trace time for an
            input whose dtype, rank or channel count does not fit.
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int | Sequence[int] = -1,
        scale_init: Any = 20.0,
        channel_shared: bool = False,
        across_spatial: bool = False,
        learnable: bool = True,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        _check_num_features(num_features)
        self.spec = Spec.create(
            axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
        )
        _flax.layer_check_dtype(dtype)
        key = rngs.params() if (rngs is not None and callable(scale_init)) else None
        value = _flax.layer_initial_scale(
            scale_init, num_features, channel_shared, param_dtype, key
        )
        self.scale = nnx.Param(value) if learnable else Constant(value)
        self.num_features = num_features
        self.channel_shared = channel_shared
        self.learnable = learnable
        self.dtype = dtype
        self.param_dtype = param_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x``; the result has ``x``'s shape and ``dtype`` (or ``x``'s)."""
        return _flax.layer_apply(x, self.scale[...], self.spec, self.num_features, self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm, ``y = scale * x / sqrt(mean(x**2) + eps)`` over ``axis``, as
    :func:`l2norm.jax.rms_norm` (the L2 op with the mean placement).

    The arguments follow ``flax.nnx.RMSNorm`` (``num_features``, ``use_scale``, ``dtype``,
    ``param_dtype``, ``rngs``); the scale is the ``scale`` parameter, as there.

    Args:
        num_features: the size of the channel axis (checked at call).
        axis: the normalized axis (default -1), or a tuple whose first entry is the
            channel axis.
        eps: epsilon; None takes the preset's (1e-6 without one).
        preset: a peer's convention (:data:`l2norm.RMS_PRESETS`); ``"gemma"`` starts the
            scale at 0 (it multiplies by ``1 + scale``), every other at 1.
        use_scale: whether there is a learnable scale.
        dtype: the compute and output dtype; None keeps the input's (or the preset's rule:
            ``"flax"`` promotes the input's and the scale's dtypes, as Flax does).
        param_dtype: the storage dtype of the scale.
        rngs: accepted for Flax's signature; the scale's start is a constant.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from l2norm.nnx import RMSNorm
        >>> layer = RMSNorm(4, eps=1e-30, rngs=nnx.Rngs(0))
        >>> layer(jnp.array([[1.0, -1.0, 1.0, -1.0]]))
        Array([[ 1., -1.,  1., -1.]], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        axis: int | Sequence[int] = -1,
        eps: float | None = None,
        preset: str | None = None,
        use_scale: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        _check_num_features(num_features)
        self.rms = RMSSpec.create(axis=axis, eps=eps, preset=preset)
        _flax.layer_check_dtype(dtype)
        start = self.rms.convention.scale_init
        value = _flax.layer_initial_scale(start, num_features, False, param_dtype, None)
        self.scale = nnx.Param(value) if use_scale else None
        self.num_features = num_features
        self.use_scale = use_scale
        self.dtype = dtype
        self.param_dtype = param_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` (shape kept; dtype as ``dtype`` says)."""
        scale = None if self.scale is None else self.scale[...]
        return rms_layer_apply(x, scale, self.rms, self.num_features, self.dtype)


def rms_layer_apply(
    x: Any, scale: jax.Array | None, rms: RMSSpec, num_features: int | None, dtype: Any
) -> jax.Array:
    """The NNX and Linen RMSNorm call: the layers' checks, then :meth:`RMSSpec.apply`."""
    # The axes do not depend on the dtype the spec is resolved for.
    spec = rms.spec("float32")
    return _flax.layer_apply(
        x, scale, spec, num_features, dtype, op=lambda x, s, _: rms.apply(x, s, JAX_OPS)
    )
