"""L2 normalization (ParseNet / SSD) and RMSNorm layers for Flax Linen, over :mod:`l2norm.jax`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from l2norm.linen import L2Norm
    >>> layer = L2Norm()  # SSD's conv4_3 norm: per-channel gamma initialised to 20
    >>> x = jnp.ones((2, 38, 38, 512))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> variables["params"]["scale"].shape
    (512,)
    >>> layer.apply(variables, x).shape
    (2, 38, 38, 512)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from l2norm.core.spec import RMSSpec, Spec
from l2norm.jax import _flax
from l2norm.nnx import rms_layer_apply

__all__ = ["L2Norm", "RMSNorm"]


class L2Norm(nn.Module):
    """``y = scale * x / ||x||`` along the channel axis, with a learnable per-channel scale.

    The fields are those of :class:`l2norm.nnx.L2Norm`; the number of channels is read
    from the input, as ``nn.LayerNorm`` does.

    Attributes:
        axis: the normalized (and channel) axis, or a tuple whose first entry is the
            channel axis. Default ``-1``.
        scale_init: a number (default 20, SSD's), one value per channel, or a Flax
            initializer ``init(key, shape, dtype)``.
        channel_shared: one scale for every channel.
        across_spatial: one norm per sample over every axis but the first.
        learnable: False puts the scale in the ``"constants"`` collection instead of
            ``"params"``: saved and restored with the variables, never trained.
        eps: epsilon; see :func:`l2norm.jax.l2_normalize`.
        eps_mode: where eps goes; see :func:`l2norm.jax.l2_normalize`.
        preset: a peer's (eps_mode, eps); see :func:`l2norm.jax.l2_normalize`.
        dtype: the compute and output dtype; None keeps the input's dtype.
        param_dtype: the storage dtype of the scale.
    """

    axis: int | Sequence[int] = -1
    scale_init: Any = 20.0
    channel_shared: bool = False
    across_spatial: bool = False
    learnable: bool = True
    eps: float | None = None
    eps_mode: str | None = None
    preset: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def spec(self) -> Spec:
        return Spec.create(
            axis=self.axis,
            across_spatial=self.across_spatial,
            eps=self.eps,
            eps_mode=self.eps_mode,
            preset=self.preset,
        )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x``; the result has ``x``'s shape and ``dtype`` (or ``x``'s)."""
        spec = self.spec
        _flax.layer_check_dtype(self.dtype)
        x = jnp.asarray(x)
        features = x.shape[spec.resolve(x.ndim).channel]

        def init(key: jax.Array | None) -> jax.Array:
            return _flax.layer_initial_scale(
                self.scale_init, features, self.channel_shared, self.param_dtype, key
            )

        if self.learnable and self.has_variable("params", "scale"):
            # Read, not self.param: Flax would first compare the stored shape with what the
            # initializer would make and raise its generic ScopeParamShapeError.
            scale = nn.meta.unbox(self.get_variable("params", "scale"))
        elif self.learnable:
            scale = self.param("scale", lambda key: init(key))
        else:
            scale = self.variable(
                "constants",
                "scale",
                lambda: init(self.make_rng("params") if callable(self.scale_init) else None),
            ).value
        expected = _flax.layer_scale_shape(features, self.channel_shared)
        if scale.shape != expected:
            raise ValueError(
                f"L2Norm: the input has {features} channels on axis {spec.axis}, but the "
                f"stored scale has shape {scale.shape} (made for {scale.shape[0]} channels"
                f"{', shared' if self.channel_shared else ''}); it needs {expected}"
            )
        return _flax.layer_apply(x, scale, spec, None, self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm, ``y = scale * x / sqrt(mean(x**2) + eps)`` over ``axis``, as
    :func:`l2norm.jax.rms_norm`; the fields are those of :class:`l2norm.nnx.RMSNorm`, the
    number of channels is read from the input, and the scale is ``params/scale`` (as in
    ``flax.linen.RMSNorm``).

    Attributes:
        axis: the normalized axis (default -1), or a tuple whose first entry is the
            channel axis.
        eps: epsilon; None takes the preset's (1e-6 without one).
        preset: a peer's convention (:data:`l2norm.RMS_PRESETS`).
        use_scale: whether there is a learnable scale.
        dtype: the compute and output dtype; None keeps the input's (or the preset's rule).
        param_dtype: the storage dtype of the scale.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from l2norm.linen import RMSNorm
        >>> x = jnp.array([[3.0, -3.0]])
        >>> variables = RMSNorm(eps=1e-30).init(jax.random.key(0), x)
        >>> RMSNorm(eps=1e-30).apply(variables, x)
        Array([[ 1., -1.]], dtype=float32)
    """

    axis: int | Sequence[int] = -1
    eps: float | None = None
    preset: str | None = None
    use_scale: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` (shape kept; dtype as ``dtype`` says)."""
        rms = RMSSpec.create(axis=self.axis, eps=self.eps, preset=self.preset)
        _flax.layer_check_dtype(self.dtype)
        x = jnp.asarray(x)
        features = x.shape[rms.spec("float32").resolve(x.ndim).channel]
        scale = None
        if self.use_scale:
            start = rms.convention.scale_init
            scale = self.param(
                "scale",
                lambda key: _flax.layer_initial_scale(
                    start, features, False, self.param_dtype, None
                ),
            )
        return rms_layer_apply(x, scale, rms, None, self.dtype)
