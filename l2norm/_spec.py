"""The options of an L2 normalization, validated once.

Every adapter turns its user-facing arguments into one frozen :class:`Spec` in its
constructor; the reference and every framework's ops then read the spec and never
re-validate. Shape-dependent checks (rank, channel count, scale length) need the
input, so they live here too, as small functions each adapter calls with plain
Python values (:meth:`Spec.resolve`, :func:`check_scale_shape`, :func:`check_float_dtype`).

``y = scale * x / d(n)`` with ``n = ||x||`` over the normalized axes and ``d`` the
denominator chosen by ``eps_mode``: the table of placements is :mod:`l2norm._modes`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from l2norm._modes import MODES

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EPS_MODE",
    "EPS_MODES",
    "PRESETS",
    "FLOAT_DTYPES",
    "Spec",
    "Axes",
    "check_float_dtype",
    "check_scale_shape",
    "scale_init_values",
]

#: The eps placements, from the table in :mod:`l2norm._modes` (the one place they live).
EPS_MODES: tuple[str, ...] = tuple(MODES)

# clamp_norm with eps=1e-12 is what torch.nn.functional.normalize and Keras 3 compute:
# for every norm above 1e-12 the output is exactly x / ||x|| (eps never perturbs an
# ordinary activation, unlike the "add" modes), and an all-zero slice maps to zero with
# a finite gradient (scale * cotangent / eps).
DEFAULT_EPS_MODE: str = "clamp_norm"
DEFAULT_EPS: float = 1e-12

#: preset name -> (eps_mode, eps): the placement and value each peer uses (../shared/peers.md).
PRESETS: dict[str, tuple[str, float]] = {
    "caffe": ("add_sumsq", 1e-10),
    "ssd.pytorch": ("add_norm", 1e-10),
    "mmdet": ("add_norm", 1e-10),
    "torchvision": ("clamp_norm", 1e-12),
    "tensorflow": ("clamp_sumsq", 1e-12),
    "ssd_keras": ("clamp_sumsq", 1e-12),
    "keras": ("clamp_norm", 1e-12),
}

FLOAT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Axes:
    """The axes of one call, resolved against the input's rank.

    Attributes:
        norm: the normalized axes, non-negative and sorted.
        channel: the axis a per-channel scale runs along.
        ndim: the rank they were resolved for.
    """

    norm: tuple[int, ...]
    channel: int
    ndim: int

    @property
    def reduced(self) -> tuple[int, ...]:
        """Axes a per-channel scale gradient sums over: every axis but the channel."""
        return tuple(a for a in range(self.ndim) if a != self.channel)


@dataclass(frozen=True)
class Spec:
    """Validated options of an L2 normalization. Build it with :meth:`Spec.create`.

    Attributes:
        axis: the axis (int) or axes (tuple) as given, possibly negative. With a tuple,
            its first entry is the channel axis (the one a per-channel scale runs
            along); with ``across_spatial``, ``axis`` is the channel axis.
        across_spatial: normalize over every axis but the first (Caffe's
            ``across_spatial``: one norm per sample).
        eps: the positive, finite epsilon.
        eps_mode: where eps goes (see the module docstring).
        preset: the peer whose conventions were asked for, or None.
    """

    axis: int | tuple[int, ...] = -1
    across_spatial: bool = False
    eps: float = DEFAULT_EPS
    eps_mode: str = DEFAULT_EPS_MODE
    preset: str | None = None

    @classmethod
    def create(
        cls,
        *,
        axis: int | Sequence[int] = -1,
        across_spatial: bool = False,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
    ) -> Spec:
        """Validate user options and return the spec.

        Raises:
            ValueError / TypeError: naming the argument, the value received and what
                is accepted.
        """
        axis = _normalize_axis_arg(axis)
        if not isinstance(across_spatial, (bool, np.bool_)):
            raise TypeError(f"across_spatial must be a bool, got {across_spatial!r}")
        if across_spatial and isinstance(axis, tuple):
            raise ValueError(
                "across_spatial=True normalizes every axis but the first; axis then names "
                f"the channel axis and must be a single int, got axis={axis!r}"
            )
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
            preset_mode, preset_eps = PRESETS[preset]
            if eps_mode is not None and eps_mode != preset_mode:
                raise ValueError(
                    f"preset={preset!r} uses eps_mode={preset_mode!r}, which conflicts with "
                    f"eps_mode={eps_mode!r}; pass one or the other"
                )
            if eps is not None and _as_eps(eps) != preset_eps:
                raise ValueError(
                    f"preset={preset!r} uses eps={preset_eps!r}, which conflicts with "
                    f"eps={eps!r}; pass one or the other"
                )
            eps_mode, eps = preset_mode, preset_eps
        if eps_mode is None:
            eps_mode = DEFAULT_EPS_MODE
        if eps_mode not in EPS_MODES:
            raise ValueError(f"unknown eps_mode {eps_mode!r}; expected one of {list(EPS_MODES)}")
        eps = DEFAULT_EPS if eps is None else _as_eps(eps)
        return cls(
            axis=axis,
            across_spatial=bool(across_spatial),
            eps=eps,
            eps_mode=eps_mode,
            preset=preset,
        )

    @property
    def threshold(self) -> float:
        """The norm below which eps dominates: ``eps`` for the ``*_norm`` modes,
        ``sqrt(eps)`` for the ``*_sumsq`` modes (both written on the norm's scale)."""
        return MODES[self.eps_mode].threshold(self.eps)

    def resolve(self, ndim: int) -> Axes:
        """Resolve the axes for an input of rank ``ndim``.

        Raises:
            ValueError: rank 0, an axis out of range, or a repeated axis.
        """
        if ndim < 1:
            raise ValueError("input must have at least one dimension, got a 0-d array")
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        resolved = []
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"axis {a} is out of range for an input of rank {ndim} "
                    f"(accepted: {-ndim} to {ndim - 1})"
                )
            resolved.append(a % ndim)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"axis {self.axis!r} repeats an axis for an input of rank {ndim}")
        channel = resolved[0]
        if self.across_spatial:
            if ndim < 2:
                raise ValueError(
                    "across_spatial=True needs an input of rank >= 2 (batch first), "
                    f"got rank {ndim}"
                )
            if channel == 0:
                raise ValueError(
                    "across_spatial=True keeps axis 0 as the batch axis, so the channel "
                    f"axis cannot be 0 (got axis={self.axis!r})"
                )
            return Axes(norm=tuple(range(1, ndim)), channel=channel, ndim=ndim)
        return Axes(norm=tuple(sorted(resolved)), channel=channel, ndim=ndim)

    def options(self) -> dict:
        """The keyword arguments that rebuild this spec (for configs and repr)."""
        return {
            "axis": self.axis,
            "across_spatial": self.across_spatial,
            "eps": self.eps,
            "eps_mode": self.eps_mode,
            "preset": self.preset,
        }


def _normalize_axis_arg(axis: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")
    if isinstance(axis, numbers.Integral):
        return int(axis)
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        items = tuple(axis)
        if not items:
            raise ValueError("axis must name at least one axis, got an empty sequence")
        if not all(
            isinstance(a, numbers.Integral) and not isinstance(a, (bool, np.bool_)) for a in items
        ):
            raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")
        items = tuple(int(a) for a in items)
        return items[0] if len(items) == 1 else items
    raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}")


def _as_eps(eps: object) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive finite float, got {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return value


def check_float_dtype(dtype_name: str, what: str = "input") -> None:
    """Raise TypeError unless ``dtype_name`` is one of :data:`FLOAT_DTYPES`."""
    if str(dtype_name) not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must have a floating dtype ({', '.join(FLOAT_DTYPES)}), got {dtype_name}"
        )


def check_scale_shape(scale_shape: tuple[int, ...], channels: int, axes: Axes) -> None:
    """Raise ValueError unless a scale of ``scale_shape`` fits ``channels`` channels.

    Accepted: ``()`` or ``(1,)`` (one shared value) and ``(channels,)``. Anything else,
    a length that only broadcasts included, is refused: no silent broadcasting.
    """
    if tuple(scale_shape) in ((), (1,), (channels,)):
        return
    raise ValueError(
        f"scale has shape {tuple(scale_shape)}, but the channel axis {axes.channel} of the "
        f"input has {channels} channels; expected shape ({channels},), or () / (1,) for one "
        "shared value"
    )


def scale_init_values(
    scale_init: object, num_channels: int | None, channel_shared: bool
) -> np.ndarray:
    """The initial scale as a float64 array of shape ``(num_channels,)`` or ``(1,)``.

    ``scale_init`` is a number (every channel gets it) or a sequence / array with one
    value per channel (or one value when ``channel_shared``). Adapters call this once
    and cast the result to their parameter dtype.

    Raises:
        ValueError / TypeError: a non-numeric value, a non-finite value, or a length that
            is not the channel count.
    """
    if num_channels is not None and (
        not isinstance(num_channels, numbers.Integral)
        or isinstance(num_channels, (bool, np.bool_))
        or num_channels < 1
    ):
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    size = 1 if channel_shared else num_channels
    try:
        values = np.asarray(scale_init)
    except Exception as err:  # pragma: no cover - asarray of arbitrary objects
        raise TypeError(f"scale_init must be a number or a sequence, got {scale_init!r}") from err
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_:
        raise TypeError(
            f"scale_init must be a real number or a sequence of them, got {scale_init!r}"
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"scale_init must be finite, got {scale_init!r}")
    if values.ndim == 0:
        if size is None:
            raise ValueError("num_channels is needed to expand a scalar scale_init")
        return np.full((size,), float(values), dtype=np.float64)
    if values.ndim != 1 or (size is not None and values.shape[0] != size):
        expected = "(1,)" if channel_shared else f"({size},)"
        raise ValueError(
            f"scale_init has shape {values.shape}, expected a number or shape {expected}"
        )
    return values
