"""The options of an L2 normalization, validated once.

Every adapter turns its user-facing arguments into one frozen :class:`Spec` in its
constructor; the reference and every framework's ops then read the spec and never
re-validate. Shape-dependent checks (rank, channel count, scale length) need the
input, so they live here too, as small functions each adapter calls with plain
Python values (:meth:`Spec.resolve`, :func:`check_scale_shape`, :func:`check_float_dtype`).

``y = scale * x / d(n)`` with ``n = ||x||`` over the normalized axes and ``d`` the
denominator chosen by ``eps_mode``: the table of placements is :mod:`l2norm.core.modes`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from l2norm.core.modes import MODES

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_EPS_MODE",
    "EPS_MODES",
    "PRESETS",
    "FLOAT_DTYPES",
    "Spec",
    "Axes",
    "check_float_dtype",
    "check_scale_float",
    "check_scale_shape",
    "compute_dtype",
    "is_python_number",
    "scale_init_values",
    "DEFAULT_RMS_EPS",
    "RMS_PRESETS",
    "ArrayOps",
    "RMSPreset",
    "RMSSpec",
    "machine_eps",
    "promote_float",
    "scale_compute_dtype",
]

#: The eps placements, from the table in :mod:`l2norm.core.modes` (the one place they live).
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


# --------------------------------------------------------------------------- scale dtypes
# One rule for every framework: a scale is a Python number (weakly typed, taken at the
# compute precision) or an array of a float dtype no wider than the compute precision, to
# which it is widened exactly. Anything else raises: an integer, bool or complex array has
# no float value to learn, and a wider scale would be rounded without a word.

_WIDTHS: dict[str, int] = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}


def is_python_number(value: object) -> bool:
    """Whether ``value`` is a Python ``int`` or ``float`` (a weakly typed scale).

    NumPy scalars carry a dtype and count as arrays; ``bool`` is no number here.

    Examples:
        >>> is_python_number(20), is_python_number(0.5), is_python_number(True)
        (True, True, False)
        >>> is_python_number(np.float64(0.5))  # a subclass of float, but it has a dtype
        False
    """
    return isinstance(value, (int, float)) and not isinstance(value, (bool, np.generic))


def compute_dtype(x_dtype_name: str) -> str:
    """The precision a scale is applied in: float64 for float64 input, float32 otherwise.

    Examples:
        >>> compute_dtype("bfloat16"), compute_dtype("float64")
        ('float32', 'float64')
    """
    return "float64" if x_dtype_name == "float64" else "float32"


def check_scale_float(x_dtype_name: str, scale_dtype_name: str) -> None:
    """Raise TypeError unless the scale's dtype is one of :data:`FLOAT_DTYPES`.

    The first half of :func:`scale_compute_dtype`, for the RMSNorm presets whose formula
    takes the scale in a dtype of its own (they promote or cast it explicitly).

    Examples:
        >>> check_scale_float("float32", "int32")
        Traceback (most recent call last):
        ...
        TypeError: scale has dtype int32 (input float32): ...
    """
    if str(scale_dtype_name) not in FLOAT_DTYPES:
        raise TypeError(
            f"scale has dtype {scale_dtype_name} (input {x_dtype_name}): a scale is a Python "
            f"number or an array of a float dtype ({', '.join(FLOAT_DTYPES)}), never integer, "
            f"bool or complex; cast it to a float dtype, e.g. {compute_dtype(x_dtype_name)}"
        )


def scale_compute_dtype(x_dtype_name: str, scale_dtype_name: str | None) -> str:
    """The dtype a scale is widened to before the op, or TypeError: the one scale rule.

    1. ``scale_dtype_name`` None stands for a Python number (or no scale): accepted, taken
       at the compute precision, as JAX weak types and torch scalars are. An array must
       have a float dtype (:data:`FLOAT_DTYPES`).
    2. The compute precision is float32 for float16 / bfloat16 / float32 input and float64
       for float64 input. A scale no wider than it is widened to it, which is exact: a
       bfloat16 weight with float32 input, a float32 weight with float64 input are fine.
    3. A scale wider than it (float64 with float32 or half input) is refused: it would be
       rounded. Cast it, or compute in float64.

    The output keeps ``x``'s dtype; the scale's gradient comes back in the scale's dtype
    (each framework's cast is differentiable).

    Args:
        x_dtype_name: the input's dtype (``"float32"``...), one of :data:`FLOAT_DTYPES`.
        scale_dtype_name: the scale array's dtype name, or None for a Python number.

    Returns:
        The compute precision, ``"float32"`` or ``"float64"``.

    Raises:
        TypeError: a non-float input, a non-float scale, a scale wider than the compute
            precision; the message names both dtypes.

    Examples:
        >>> scale_compute_dtype("bfloat16", "float32"), scale_compute_dtype("float64", None)
        ('float32', 'float64')
        >>> scale_compute_dtype("float32", "float64")
        Traceback (most recent call last):
        ...
        TypeError: scale has dtype float64, wider than the float32 a float32 input is ...
    """
    check_float_dtype(x_dtype_name, what="input")
    compute = compute_dtype(x_dtype_name)
    if scale_dtype_name is None:
        return compute
    check_scale_float(x_dtype_name, scale_dtype_name)
    if _WIDTHS[scale_dtype_name] > _WIDTHS[compute]:
        raise TypeError(
            f"scale has dtype {scale_dtype_name}, wider than the {compute} a {x_dtype_name} "
            f"input is computed in: it would be rounded. Cast the scale to {compute} "
            f"(torch: weight.float(); NumPy / JAX / Keras: astype / cast to {compute!r}), or "
            "compute in float64 (a float64 input)"
        )
    return compute


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


# --------------------------------------------------------------------------- RMSNorm
# RMSNorm is the same op with the mean placement (``eps_mode="add_meansq"``:
# ``d = sqrt(n**2 / N + eps)``); what follows are its options and its peers' conventions,
# which differ in eps, in the scale's parameterization and in where they round.

#: RMSNorm's eps when neither the caller nor a preset gives one (Keras, Flax, Llama, T5).
DEFAULT_RMS_EPS: float = 1e-6
RMS_EPS_MODE: str = "add_meansq"


@dataclass(frozen=True)
class RMSPreset:
    """One peer's RMSNorm convention (``x32`` is ``x`` cast to float32, ``ms(v)`` the mean
    of ``v**2`` over the normalized axes, ``w`` the weight).

    Attributes:
        name: the ``preset`` string users pass.
        peer: whose convention it is.
        formula: what the peer computes, in its own order of operations.
        eps: its default eps; None means the machine epsilon of the input's dtype,
            resolved at each call (``torch.nn.RMSNorm(eps=None)``).
        scale_init: the value a layer's weight starts at (0 where the scale is ``1 + w``).
        flow: how the peer's dtypes and roundings run: ``"fused"`` (``w x / d`` rounded
            once to ``x``'s dtype), ``"promote"`` (the same in the promoted dtype of ``x``
            and ``w``), ``"gemma"``, ``"llama"`` or ``"t5"`` (see :meth:`RMSSpec.apply`).
    """

    name: str
    peer: str
    formula: str
    eps: float | None = DEFAULT_RMS_EPS
    scale_init: float = 1.0
    flow: Literal["fused", "promote", "gemma", "llama", "t5"] = "fused"


#: preset name -> its convention. Each formula is the peer's; ``l2norm``'s version of it
#: rounds where the peer rounds to a stored dtype, and computes every rounding faithfully.
RMS_PRESETS: dict[str, RMSPreset] = {
    p.name: p
    for p in (
        RMSPreset(
            "torch",
            "torch.nn.RMSNorm, torch.nn.functional.rms_norm",
            "x / sqrt(ms(x) + eps) * w in x's dtype; eps=None: torch.finfo(x.dtype).eps",
            eps=None,
        ),
        RMSPreset(
            "keras",
            "keras.layers.RMSNormalization",
            "x * rsqrt(ms(x) + eps) * w in at least float32, cast to x's dtype; eps 1e-6",
        ),
        RMSPreset(
            "flax",
            "flax nnx.RMSNorm, linen RMSNorm",
            "x * (rsqrt(ms(x) + eps) * w) in at least float32, cast to the promoted dtype "
            "of x and w (or the layer's dtype); epsilon 1e-6",
            flow="promote",
        ),
        RMSPreset(
            "llama",
            "transformers LlamaRMSNorm",
            "w * (x32 * rsqrt(ms(x32) + eps)).to(x.dtype); eps 1e-6",
            flow="llama",
        ),
        RMSPreset(
            "gemma",
            "transformers GemmaRMSNorm",
            "(x32 * rsqrt(ms(x32) + eps) * (1 + w.float())).to(x.dtype), w starts at 0; eps 1e-6",
            scale_init=0.0,
            flow="gemma",
        ),
        RMSPreset(
            "t5",
            "transformers T5LayerNorm",
            "u = x * rsqrt(ms(x32) + eps); u = u.to(w.dtype) if w is half; w * u; eps 1e-6",
            flow="t5",
        ),
    )
}

_DEFAULT_RMS = RMSPreset("l2norm", "l2norm", "w * x / sqrt(ms(x) + eps) rounded once; eps 1e-6")


class ArrayOps(NamedTuple):
    """What :meth:`RMSSpec.apply` needs of a framework: its L2 op and four array functions.

    Attributes:
        normalize: ``normalize(x, scale, spec)``, the framework's ``scale * x / d`` for a
            :class:`Spec`, in ``x``'s dtype, with its exact gradient; it checks ``x`` and
            ``scale`` as the L2 op does, and takes a Python number as ``scale``.
        cast: ``cast(t, dtype_name)``.
        dtype: ``dtype(t)``, the dtype's name (``"bfloat16"``, ``"float32"``, ...).
        multiply: ``multiply(a, b)`` with the framework's type promotion (``a`` may be a
            Python number).
        reshape: ``reshape(t, shape)``.
    """

    normalize: Callable[[Any, Any, Spec], Any]
    cast: Callable[[Any, str], Any]
    dtype: Callable[[Any], str]
    multiply: Callable[[Any, Any], Any]
    reshape: Callable[[Any, tuple[int, ...]], Any]


def promote_float(a: str, b: str) -> str:
    """The dtype torch, JAX and NumPy promote two float dtypes to (float16 with bfloat16
    gives float32).

    Examples:
        >>> promote_float("bfloat16", "float32"), promote_float("float16", "bfloat16")
        ('float32', 'float32')
    """
    if a == b:
        return a
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return max(a, b, key=FLOAT_DTYPES.index)


def machine_eps(dtype_name: str) -> float:
    """``finfo(dtype).eps``: 2**-10 (float16), 2**-7 (bfloat16), 2**-23, 2**-52."""
    bits = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}[dtype_name]
    return 2.0**-bits


@functools.lru_cache(maxsize=256)
def _rms_l2_spec(axis: int | tuple[int, ...], eps: float) -> Spec:
    return Spec.create(axis=axis, eps=eps, eps_mode=RMS_EPS_MODE)


@dataclass(frozen=True)
class RMSSpec:
    """Validated options of an RMSNorm: ``y = w * x / sqrt(mean(x**2) + eps)`` over the
    normalized axes. Build it with :meth:`RMSSpec.create`.

    Attributes:
        axis: the normalized axis, or a tuple of axes whose first entry is the channel
            axis the weight runs along.
        eps: the positive finite eps, or None for the input dtype's machine epsilon
            (the ``"torch"`` preset without an eps).
        preset: the peer whose convention was asked for (:data:`RMS_PRESETS`), or None.
    """

    axis: int | tuple[int, ...] = -1
    eps: float | None = DEFAULT_RMS_EPS
    preset: str | None = None

    @classmethod
    def create(
        cls,
        *,
        axis: int | Sequence[int] = -1,
        eps: float | None = None,
        preset: str | None = None,
    ) -> RMSSpec:
        """Validate user options. ``eps=None`` takes the preset's (1e-6 without one).

        Unlike an L2 preset, an RMS preset does not fix eps: every peer's layer takes it
        as an argument (``LlamaRMSNorm(hidden, eps=1e-5)``), so a given eps overrides.

        Examples:
            >>> RMSSpec.create(preset="torch").spec("bfloat16").eps  # torch.finfo's eps
            0.0078125

        Raises:
            ValueError / TypeError: an unknown preset, a bad axis or eps.
        """
        if preset is not None and preset not in RMS_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {list(RMS_PRESETS)}")
        axis = _normalize_axis_arg(axis)
        if eps is not None:
            eps = _as_eps(eps)
        elif preset is not None:
            eps = RMS_PRESETS[preset].eps
        else:
            eps = DEFAULT_RMS_EPS
        return cls(axis=axis, eps=eps, preset=preset)

    @property
    def convention(self) -> RMSPreset:
        """The preset's :class:`RMSPreset`, or l2norm's own (fused, rounded once)."""
        return _DEFAULT_RMS if self.preset is None else RMS_PRESETS[self.preset]

    def spec(self, dtype_name: str) -> Spec:
        """The L2 op's :class:`Spec` for an input of ``dtype_name`` (which only the
        machine-epsilon default reads)."""
        return _rms_l2_spec(self.axis, machine_eps(dtype_name) if self.eps is None else self.eps)

    def apply(self, x: Any, scale: Any, ops: ArrayOps) -> Any:
        """The RMSNorm of ``x`` by the convention, on a framework's arrays.

        * ``fused``: ``normalize(x, w)``, rounded once to ``x``'s dtype;
        * ``promote``: the same on ``x`` and ``w`` cast to their promoted dtype (Flax);
        * ``gemma``: ``normalize(x32, 1 + w32)`` in float32, cast to ``x``'s dtype;
        * ``llama``: ``u = normalize(x32)`` cast to ``x``'s dtype, then ``w * u``;
        * ``t5``: ``u = normalize(x)`` in at least float32, cast to ``w``'s dtype if it is
          half, then ``w * u``.

        The roundings of ``u`` to a stored dtype before the multiplication are the peer's
        (llama, t5): part of its convention, kept. ``normalize`` is faithful, so each
        rounding a flow has is within 1 ULP.

        The weight is None, a Python number or an array; the fused flow applies the whole
        scale rule (:func:`scale_compute_dtype`), the others its first half (a float dtype).

        Raises:
            TypeError / ValueError: a non-float input or weight, a weight whose shape is
                neither ``()``, ``(1,)`` nor the channel count.
        """
        x_dtype = ops.dtype(x)
        check_float_dtype(x_dtype, what="x")
        spec = self.spec(x_dtype)
        flow = self.convention.flow
        if flow == "fused":  # normalize checks the scale as the L2 op does
            return ops.normalize(x, scale, spec)
        axes = spec.resolve(len(x.shape))
        # These flows take the weight in a dtype of their own (promoted, cast to float32 or
        # multiplied with the framework's promotion, as the peer's formula says), so only
        # the first half of the scale rule applies: a float array, or a Python number
        # (weakly typed: it promotes nothing, w_dtype stays None).
        w_dtype = None
        if scale is not None and not is_python_number(scale):
            w_dtype = ops.dtype(scale)
            check_scale_float(x_dtype, w_dtype)
            # here, before a multiplication would broadcast it
            check_scale_shape(tuple(int(n) for n in scale.shape), int(x.shape[axes.channel]), axes)
        if flow == "promote":
            out = x_dtype if w_dtype is None else promote_float(x_dtype, w_dtype)
            scale = scale if w_dtype is None else ops.cast(scale, out)
            return ops.normalize(ops.cast(x, out), scale, spec)
        if flow == "gemma":  # (1 + w.float()): the formula rounds a float64 weight itself
            if scale is not None:
                scale = 1.0 + (scale if w_dtype is None else ops.cast(scale, "float32"))
            return ops.cast(ops.normalize(ops.cast(x, "float32"), scale, spec), x_dtype)
        if flow == "llama":
            u = ops.cast(ops.normalize(ops.cast(x, "float32"), None, spec), x_dtype)
        else:  # t5
            u = ops.normalize(ops.cast(x, promote_float(x_dtype, "float32")), None, spec)
            if w_dtype in ("float16", "bfloat16"):
                u = ops.cast(u, w_dtype)
        if scale is None:
            return u
        if w_dtype is None:  # a number keeps u's dtype (NumPy would widen bfloat16 to float32)
            return ops.cast(ops.multiply(scale, u), ops.dtype(u))
        if len(scale.shape) == 1 and scale.shape[0] > 1:  # one value per channel
            shape = [1] * axes.ndim
            shape[axes.channel] = int(scale.shape[0])
            scale = ops.reshape(scale, tuple(shape))
        return ops.multiply(scale, u)
