"""The framework-free record of an L2Norm's parameters (:class:`L2NormParams`) and the
checks every converter shares; :mod:`l2norm.convert` is the public face."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from l2norm.core.spec import Spec

__all__ = ["L2NormParams"]

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_SCALE_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True, eq=False)
class L2NormParams:
    """An L2Norm layer's scale and options, independent of any framework.

    Attributes:
        scale: the scale values, shape ``(C,)`` or ``(1,)`` (channel-shared), in their
            original dtype (float16, bfloat16, float32 or float64), kept bit for bit.
        eps: the positive epsilon.
        eps_mode: where eps goes (``"add_sumsq"``, ``"add_norm"``, ``"clamp_sumsq"``,
            ``"clamp_norm"``; see :class:`l2norm.Spec`).
        preset: the peer whose (eps_mode, eps) these are, or None.
        across_spatial: one norm per sample over every axis but the batch axis.
        learnable: whether the scale is trained.

    Two params are equal when their options are equal and their scales have the same
    dtype, shape and bytes.

    Raises:
        ValueError / TypeError: a scale that is not a finite 1-D float array, or options
            :meth:`l2norm.Spec.create` refuses (e.g. a preset contradicting eps).
    """

    scale: np.ndarray
    eps: float
    eps_mode: str
    preset: str | None = None
    across_spatial: bool = False
    learnable: bool = True

    def __post_init__(self) -> None:
        scale = np.asarray(self.scale)
        if scale.dtype.name not in _SCALE_DTYPES:
            raise TypeError(
                f"scale must be a float array ({', '.join(_SCALE_DTYPES)}), got dtype {scale.dtype}"
            )
        if scale.ndim != 1 or scale.shape[0] < 1:
            raise ValueError(f"scale must have shape (C,) or (1,), got shape {scale.shape}")
        finite = np.isfinite(scale.astype(np.float64))
        if not finite.all():
            index = int(np.argmin(finite))
            raise ValueError(f"scale must be finite, got {scale[index]} at index {index}")
        for name in ("across_spatial", "learnable"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        # Validates eps, eps_mode and preset together, as every adapter would.
        spec = Spec.create(eps=self.eps, eps_mode=self.eps_mode, preset=self.preset)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "eps", spec.eps)
        object.__setattr__(self, "across_spatial", bool(self.across_spatial))
        object.__setattr__(self, "learnable", bool(self.learnable))

    @property
    def channel_shared(self) -> bool:
        """One scale value for every channel (Caffe's ``channel_shared``)."""
        return self.scale.shape == (1,)

    def options(self) -> dict:
        """Keyword options every adapter accepts (eps, eps_mode or preset, across_spatial)."""
        if self.preset is not None:
            return {"preset": self.preset, "across_spatial": self.across_spatial}
        return {"eps": self.eps, "eps_mode": self.eps_mode, "across_spatial": self.across_spatial}

    def spec(self, axis: int | tuple[int, ...] = -1) -> Spec:
        """The :class:`l2norm.Spec` of a layer with these options on ``axis``."""
        return Spec.create(axis=axis, **self.options())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, L2NormParams):
            return NotImplemented
        return (
            (self.eps, self.eps_mode, self.preset, self.across_spatial, self.learnable)
            == (other.eps, other.eps_mode, other.preset, other.across_spatial, other.learnable)
            and self.scale.dtype == other.scale.dtype
            and self.scale.shape == other.scale.shape
            and self.scale.tobytes() == other.scale.tobytes()
        )

    __hash__ = None  # mutable-content array inside: not hashable


def _from_spec(scale: np.ndarray, spec: Spec, learnable: bool) -> L2NormParams:
    return L2NormParams(
        scale=np.array(scale, copy=True).reshape(-1),
        eps=spec.eps,
        eps_mode=spec.eps_mode,
        preset=spec.preset,
        across_spatial=spec.across_spatial,
        learnable=bool(learnable),
    )


def _as_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor, Keras / TF variable, JAX array or array-like."""
    if type(value).__module__.startswith("torch"):
        import torch

        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            # NumPy has no bfloat16; the bits travel as int16.
            return tensor.view(torch.int16).numpy().view(_BFLOAT16).copy()
        return tensor.numpy().copy()
    if hasattr(value, "get_value"):  # nnx.Variable (``.value`` is deprecated there)
        value = value.get_value()
    elif hasattr(value, "value") and not isinstance(value, np.ndarray):
        # A Keras variable (a property) or a tf.Variable (a method).
        value = value.value() if callable(value.value) else value.value
    if type(value).__module__.startswith("torch"):  # a Keras variable on the torch backend
        return _as_numpy(value)
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # TF tensor
        value = value.numpy()
    return np.array(value, copy=True)


def _check_stored(params: L2NormParams, stored: Any, where: str, widen: bool = False) -> None:
    stored = _as_numpy(stored).reshape(-1)
    if widen and stored.dtype != params.scale.dtype:
        # A storage dtype the caller asked for: it must hold every value exactly.
        with np.errstate(over="ignore"):
            stored = stored.astype(params.scale.dtype)
    if stored.dtype != params.scale.dtype or stored.tobytes() != params.scale.tobytes():
        raise ValueError(
            f"{where} does not hold the scale bit for bit: asked for {params.scale.dtype} "
            f"{params.scale[:4]}..., it stores {stored.dtype} {stored[:4]}... "
            "(a float64 scale needs jax_enable_x64 on JAX)"
        )
