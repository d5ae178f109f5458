r"""L2 normalization with a learnable per-channel scale for Keras 3 (ParseNet / SSD).

One layer, :class:`L2Norm`, and one function, :func:`l2_normalize`, that run on the
TensorFlow, JAX and PyTorch Keras backends with the maths of :mod:`l2norm.reference`:
``y = scale * x / d(||x||)``, correct for every finite input (no overflow of the sum of
squares, a finite gradient at an all-zero slice), NaN / Inf slices as the reference, and
the exact backward formula of the reference as the gradient.

This module validates the options and the input, owns the Keras layer (weights,
mixed precision, masking, serialization) and hands the computation to the framework's
own lowering, each built on the branch-free ladder of :mod:`l2norm.core.ladder`, so that a
sample's result never depends on the rest of its batch:

* JAX backend: :func:`l2norm.jax.normalize` (a ``jax.custom_vjp``);
* torch backend: :func:`l2norm.torch.l2_normalize` (an autograd function);
* TensorFlow backend: :mod:`l2norm.tensorflow._ops` (XLA-compiled forward and backward
  attached with ``tf.custom_gradient``; eager, ``tf.function`` and ``model.fit``); in a
  graph traced to leave XLA (``model.export``, the TFLite converter) the exported formula
  of :mod:`l2norm.core.portable` in plain TensorFlow operations, TFLite builtins only.

float16 and bfloat16 inputs are computed in float32, float64 in float64; the output has
the input's dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from l2norm.tensorflow import _preload  # noqa: F401  (before Keras loads TensorFlow: see there)

# isort: split
import keras
import numpy as np
from keras import ops

from l2norm.core.spec import (
    ArrayOps,
    Axes,
    RMSSpec,
    Spec,
    check_float_dtype,
    check_scale_shape,
    is_python_number,
    scale_compute_dtype,
    scale_init_values,
)

__all__ = ["L2Norm", "RMSNorm", "l2_normalize", "rms_norm"]


# --------------------------------------------------------------------------- dispatch


def _normalize(x: Any, scale: Any | None, spec: Spec, axes: Axes) -> Any:
    """``scale * x / d(||x||)`` with the exact gradient, on the current Keras backend.

    ``x`` and ``scale`` are validated tensors of the backend. JAX and torch have adapters
    of their own, each with its exact custom gradient; TensorFlow's lowering is
    :mod:`l2norm.tensorflow._ops`. The imports are deferred so that only the backend in use
    is imported.
    """
    backend = keras.backend.backend()
    if scale is not None:
        # The one scale rule of every framework (a float scale no wider than the compute
        # precision); the lowerings below widen it exactly and differentiably.
        scale_compute_dtype(
            keras.backend.standardize_dtype(x.dtype), keras.backend.standardize_dtype(scale.dtype)
        )
    if backend == "tensorflow":
        from l2norm.tensorflow import _ops as _keras_tf

        return _keras_tf.normalize(x, scale, spec, axes)
    if backend == "jax":
        from l2norm import jax as l2jax

        return l2jax.normalize(x, scale, spec)
    if backend == "torch":
        from l2norm import torch as l2torch

        # eps and eps_mode as resolved by the spec: a preset has already been applied.
        return l2torch.l2_normalize(
            x,
            scale,
            dim=spec.axis,
            across_spatial=spec.across_spatial,
            eps=spec.eps,
            eps_mode=spec.eps_mode,
        )
    raise NotImplementedError(
        f"l2norm.keras supports the tensorflow, jax and torch Keras backends, not {backend!r}"
    )


def _check_input(x: Any, spec: Spec) -> Axes:
    dtype = keras.backend.standardize_dtype(x.dtype)
    check_float_dtype(dtype, what="L2Norm input")
    return spec.resolve(len(x.shape))


def l2_normalize(
    x: Any,
    scale: Any = None,
    *,
    axis: int | Sequence[int] = -1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> Any:
    """L2-normalize ``x`` along ``axis`` and multiply by ``scale``, on the current Keras
    backend.

    The functional form of :class:`L2Norm`, with the same maths and gradient; a tensor
    of the backend in, one out (JAX array, torch tensor, ``tf.Tensor``), differentiable
    by the backend's own autodiff (``jax.grad``, ``torch.autograd``,
    ``tf.GradientTape``).

    Args:
        x: a float16, bfloat16, float32 or float64 tensor of the current backend.
        scale: None, a Python number, one shared value (shape ``()`` or ``(1,)``), or
            one value per channel of the channel axis. A number is taken in the compute
            precision (float32, float64 for float64 ``x``); a tensor has a float dtype no
            wider than it and is widened to it exactly (the scale dtype rule of the
            guarantees page): a float64 scale with float32 ``x`` raises TypeError.
        axis: the normalized axis, or a list of axes whose first entry is the channel
            axis.
        across_spatial: one norm per sample over every axis but the first.
        eps: epsilon; see :class:`L2Norm`.
        eps_mode: where eps goes; see :class:`L2Norm`.
        preset: a peer's (eps_mode, eps); see :class:`L2Norm`.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> import numpy as np
        >>> from l2norm.keras import l2_normalize
        >>> x = np.array([[3.0, 4.0]], dtype="float32")
        >>> np.asarray(keras.ops.convert_to_numpy(l2_normalize(x, np.float32([10.0]))))
        array([[6., 8.]], dtype=float32)
    """
    spec = Spec.create(
        axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    x = ops.convert_to_tensor(x)
    if scale is not None and not is_python_number(scale):
        scale = ops.convert_to_tensor(scale)
    return _checked_normalize(x, scale, spec)


def _checked_normalize(x: Any, scale: Any | None, spec: Spec) -> Any:
    """:func:`_normalize` once ``x`` and ``scale`` (backend tensors, or a Python number)
    pass the checks."""
    axes = _check_input(x, spec)
    if is_python_number(scale):  # weakly typed: taken at the compute precision
        x_dtype = keras.backend.standardize_dtype(x.dtype)
        scale = ops.convert_to_tensor(scale, dtype=scale_compute_dtype(x_dtype, None))
    if scale is not None:
        check_scale_shape(tuple(scale.shape), x.shape[axes.channel], axes)
    return _normalize(x, scale, spec, axes)


# --------------------------------------------------------------------------- the layer


@keras.saving.register_keras_serializable(package="l2norm")
class L2Norm(keras.layers.Layer):
    r"""L2 normalization with a learnable scale (ParseNet, SSD's ``conv4_3_norm``).

    Each slice along the normalized axes is divided by its L2 norm and multiplied by a
    learnable per-channel scale ``gamma`` (initialised to 20 as in SSD):

    .. math::

        y = \gamma \cdot \frac{x}{d(\lVert x \rVert)}

    where ``d`` places ``eps`` as ``eps_mode`` says (default ``max(||x||, eps)``, as
    ``keras.ops.normalize``). The norm is computed without overflow or underflow for
    every finite input, a slice holding NaN is NaN, a slice holding ±Inf takes its
    limit direction, and the gradient is the exact one, finite for every finite input
    (also at an all-zero slice, where autodiff of ``x / (||x|| + eps)`` gives NaN).

    float16 and bfloat16 inputs are normalized in float32 and the output is rounded
    once; under the ``mixed_float16`` / ``mixed_bfloat16`` policies ``gamma`` stays
    float32 and is applied in float32 too.

    Example:

    >>> import numpy as np
    >>> x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype="float32")
    >>> layer = L2Norm(scale_init=10.0)
    >>> keras.ops.convert_to_numpy(layer(x))
    array([[6., 8.],
           [0., 0.]], dtype=float32)

    Args:
        axis: Integer or list of integers. The axis to normalize (and the channel
            axis ``gamma`` runs along); with a list, all of them are normalized and the
            first one is the channel axis. A channels_first model passes ``axis=1``.
            Defaults to ``-1``.
        scale_init: Initial ``gamma``: a float, a list with one value per channel, or
            any Keras initializer (name, instance or config dict). Defaults to ``20.0``.
        channel_shared: One scalar ``gamma`` (shape ``(1,)``) instead of one per
            channel, as Caffe's ``channel_shared``. Defaults to ``False``.
        across_spatial: One norm per sample over every axis but the first (Caffe's
            ``across_spatial``); ``axis`` then names only the channel axis.
            Defaults to ``False``.
        learnable: Whether ``gamma`` is trainable. Defaults to ``True``.
        eps: Positive epsilon. Defaults to ``1e-12`` (or the preset's).
        eps_mode: ``"clamp_norm"`` (``max(n, eps)``, the default), ``"clamp_sumsq"``
            (``sqrt(max(n**2, eps))``, ``tf.math.l2_normalize``), ``"add_norm"``
            (``n + eps``, ssd.pytorch) or ``"add_sumsq"`` (``sqrt(n**2 + eps)``, Caffe).
        preset: A peer's eps and eps_mode: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``,
            ``"torchvision"``, ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``.
        **kwargs: Base layer keyword arguments, e.g. ``name`` and ``dtype``.

    Input shape:
        Arbitrary, with rank high enough for ``axis``.

    Output shape:
        Same shape as the input.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        *,
        scale_init: Any = 20.0,
        channel_shared: bool = False,
        across_spatial: bool = False,
        learnable: bool = True,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = Spec.create(
            axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
        )
        for name, value in (("channel_shared", channel_shared), ("learnable", learnable)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.channel_shared = bool(channel_shared)
        self.across_spatial = bool(across_spatial)
        self.learnable = bool(learnable)
        self.eps = eps
        self.eps_mode = eps_mode
        self.preset = preset
        self.scale_init = self._check_scale_init(scale_init)
        self.supports_masking = True

    def _check_scale_init(self, scale_init: Any) -> Any:
        if isinstance(scale_init, (str, dict, keras.initializers.Initializer)):
            try:
                return keras.initializers.get(scale_init)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"scale_init={scale_init!r} is not a Keras initializer; pass a float, a "
                    "list with one value per channel, or an initializer name / instance"
                ) from err
        if isinstance(scale_init, numbers.Real) and not isinstance(scale_init, bool):
            scale_init_values(scale_init, 1, True)  # finiteness
            return float(scale_init)
        if callable(scale_init):
            return scale_init
        values = scale_init_values(scale_init, None, False)
        if self.channel_shared and values.shape != (1,):
            raise ValueError(
                f"scale_init has shape {values.shape} but channel_shared=True takes one "
                "value; pass a float or a list of length 1"
            )
        return [float(v) for v in values]

    def build(self, input_shape: Sequence[int | None]) -> None:
        axes = self.spec.resolve(len(input_shape))
        channels = input_shape[axes.channel]
        if channels is None:
            raise ValueError(
                f"L2Norm needs a known size on the channel axis {axes.channel}, got input "
                f"shape {tuple(input_shape)}"
            )
        size = 1 if self.channel_shared else int(channels)
        init = self.scale_init
        if isinstance(init, (float, list)):
            values = scale_init_values(init, int(channels), self.channel_shared)

            def init(shape, dtype=None, values=values):
                return ops.cast(values.reshape(shape), dtype)

        self._channels = int(channels)
        self.gamma = self.add_weight(
            name="gamma",
            shape=(size,),
            initializer=init,
            trainable=self.learnable,
            # Under mixed precision gamma stays float32 and is applied in float32.
            autocast=False,
        )

    def call(self, inputs: Any) -> Any:
        axes = _check_input(inputs, self.spec)
        channels = inputs.shape[axes.channel]
        if channels is not None and channels != self._channels:
            raise ValueError(
                f"L2Norm was built for {self._channels} channels on axis {axes.channel}, "
                f"got an input of shape {tuple(inputs.shape)} with {channels}"
            )
        gamma = self.gamma.value
        if hasattr(gamma, "read_value"):
            # A tf.Variable: tf.custom_gradient wants tensors in, not variables read inside.
            gamma = gamma.read_value()
        return _normalize(inputs, gamma, self.spec, axes)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        self.spec.resolve(len(input_shape))
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        init = self.scale_init
        if not isinstance(init, (float, list)):
            init = keras.initializers.serialize(init)
        config.update(
            {
                "axis": self.axis,
                "scale_init": init,
                "channel_shared": self.channel_shared,
                "across_spatial": self.across_spatial,
                "learnable": self.learnable,
                "eps": self.eps,
                "eps_mode": self.eps_mode,
                "preset": self.preset,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> L2Norm:
        try:
            return cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot rebuild L2Norm from config {config!r}: {err}") from err


# --------------------------------------------------------------------------- RMSNorm

#: The current backend's tensors for :meth:`l2norm.core.spec.RMSSpec.apply`.
KERAS_OPS = ArrayOps(
    normalize=_checked_normalize,
    cast=ops.cast,
    dtype=lambda t: keras.backend.standardize_dtype(t.dtype),
    multiply=ops.multiply,
    reshape=ops.reshape,
)


def rms_norm(
    x: Any,
    scale: Any = None,
    *,
    axis: int | Sequence[int] = -1,
    eps: float | None = None,
    preset: str | None = None,
) -> Any:
    """RMSNorm, ``y = scale * x / sqrt(mean(x**2) + eps)`` over ``axis``, on the current
    Keras backend: :func:`l2_normalize` with ``eps_mode="add_meansq"``; the options and
    presets are :func:`l2norm.rms_norm`'s (eps default 1e-6).

    Example:
        >>> import numpy as np
        >>> from l2norm.keras import rms_norm
        >>> y = rms_norm(np.float32([[1.0, -1.0]]), np.float32([2.0, 3.0]), eps=1e-30)
        >>> keras.ops.convert_to_numpy(y)
        array([[ 2., -3.]], dtype=float32)
    """
    x = ops.convert_to_tensor(x)
    # A Python number stays one (weakly typed: the presets' promotions ignore it).
    if scale is not None and not is_python_number(scale):
        scale = ops.convert_to_tensor(scale)
    return RMSSpec.create(axis=axis, eps=eps, preset=preset).apply(x, scale, KERAS_OPS)


@keras.saving.register_keras_serializable(package="l2norm")
class RMSNorm(keras.layers.Layer):
    r"""Root-mean-square normalization with a learnable per-channel ``scale``, as
    ``keras.layers.RMSNormalization`` (same ``axis`` and weight name) with l2norm's maths:

    .. math::

        y = \text{scale} \cdot \frac{x}{\sqrt{\frac{1}{N}\sum x^2 + \epsilon}}

    computed as :func:`rms_norm`: half inputs in float32, rounded once, an exact gradient.

    Example:

    >>> import numpy as np
    >>> layer = RMSNorm(eps=1e-30)
    >>> keras.ops.convert_to_numpy(layer(np.float32([[3.0, -3.0]])))
    array([[ 1., -1.]], dtype=float32)

    Args:
        axis: Integer or list of integers: the normalized axes; the first is the channel
            axis ``scale`` runs along. Defaults to ``-1``.
        eps: Positive epsilon; None takes the preset's (``1e-6`` without one).
        use_scale: Whether there is a learnable ``scale``. Defaults to ``True``.
        preset: A peer's convention (:data:`l2norm.RMS_PRESETS`); ``"gemma"`` starts
            ``scale`` at 0 (it multiplies by ``1 + scale``), every other at 1.
        **kwargs: Base layer keyword arguments, e.g. ``name`` and ``dtype``.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        *,
        eps: float | None = None,
        use_scale: bool = True,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rms = RMSSpec.create(axis=axis, eps=eps, preset=preset)
        if not isinstance(use_scale, (bool, np.bool_)):
            raise TypeError(f"use_scale must be a bool, got {use_scale!r}")
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.eps = eps
        self.use_scale = bool(use_scale)
        self.preset = preset
        self.supports_masking = True

    def build(self, input_shape: Sequence[int | None]) -> None:
        axes = self.rms.spec("float32").resolve(len(input_shape))
        channels = input_shape[axes.channel]
        if channels is None:
            raise ValueError(
                f"RMSNorm needs a known size on the channel axis {axes.channel}, got input "
                f"shape {tuple(input_shape)}"
            )
        self._channels = int(channels)
        self.scale = None
        if self.use_scale:
            self.scale = self.add_weight(
                name="scale",
                shape=(self._channels,),
                initializer=keras.initializers.Constant(self.rms.convention.scale_init),
                # Under mixed precision the scale stays float32, as L2Norm's gamma.
                autocast=False,
            )

    def call(self, inputs: Any) -> Any:
        axes = self.rms.spec("float32").resolve(len(inputs.shape))
        channels = inputs.shape[axes.channel]
        if channels is not None and channels != self._channels:
            raise ValueError(
                f"RMSNorm was built for {self._channels} channels on axis {axes.channel}, "
                f"got an input of shape {tuple(inputs.shape)} with {channels}"
            )
        scale = None
        if self.scale is not None:
            scale = self.scale.value
            if hasattr(scale, "read_value"):  # a tf.Variable: tensors for tf.custom_gradient
                scale = scale.read_value()
        return self.rms.apply(inputs, scale, KERAS_OPS)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        self.rms.spec("float32").resolve(len(input_shape))
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"axis": self.axis, "eps": self.eps, "use_scale": self.use_scale, "preset": self.preset}
        )
        return config
