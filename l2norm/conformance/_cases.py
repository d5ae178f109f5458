"""The conformance cases: layouts x option sets x scales x dtypes x random / hostile data.

Every case makes its arrays deterministically from its id, so a failure printed by
``l2norm check`` reproduces anywhere with ``Case.from_id(id).inputs()``.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from l2norm.core import oracle as _oracle
from l2norm.core.modes import get_mode
from l2norm.core.spec import EPS_MODES, FLOAT_DTYPES, PRESETS, Axes, Spec

#: (shape, axis, across_spatial): the layouts every option set is run on.
LAYOUTS: tuple[tuple[tuple[int, ...], Any, bool], ...] = (
    ((6, 8), -1, False),  # a plain batch of vectors
    ((2, 16, 3, 3), 1, False),  # NCHW, per pixel over C (SSD)
    ((2, 3, 3, 16), -1, False),  # NHWC
    ((3, 6, 7), 1, False),  # rank 3, channel axis in the middle
    ((2, 4, 3, 3), (1, 2), False),  # a tuple of axes; the first one is the channel axis
    ((6, 4, 3, 2), 1, True),  # Caffe across_spatial: one norm per sample
    # Many channels on a strided axis: kernels that add along it term after term lose
    # accuracy with its length. Run with a few option sets only (see cases()).
    ((2, 2048, 2, 2), 1, False),
)
#: The layouts every option set runs on; the others (the wide one) run WIDE_OPTION_SETS.
FULL_LAYOUTS = range(6)
WIDE_OPTION_SETS = ("default", "mode=add_sumsq")

#: Named option sets: the default, each eps placement, each preset, and a tiny eps that
#: leaves float32's underflowing squares outside the eps regime.
OPTION_SETS: dict[str, dict] = {
    "default": {},
    **{f"mode={m}": {"eps_mode": m} for m in EPS_MODES},
    **{f"preset={p}": {"preset": p} for p in PRESETS},
    "tiny-eps": {"eps_mode": "clamp_norm", "eps": 1e-30},
    "large-eps": {"eps_mode": "add_norm", "eps": 0.5},
}

SCALES: tuple[str, ...] = ("per_channel", "shared", "none")

#: Hostile magnitudes per dtype: squares that overflow, squares that underflow, subnormals.
HOSTILE = {
    "float16": {"huge": 700.0, "tiny": 2e-4, "subnormal": 3e-6},
    "bfloat16": {"huge": 3e19, "tiny": 1e-24, "subnormal": 5e-39},
    "float32": {"huge": 3e19, "tiny": 1e-24, "subnormal": 5e-41},
    "float64": {"huge": 3e160, "tiny": 1e-170, "subnormal": 1e-310},
}

#: What ``l2norm check`` runs by default: a fixed subset of :func:`cases`, one hostile and
#: one random case per dtype (and one more of each: RMSNorm's hostile one, add_norm's
#: random one), that meets every eps placement on hostile data and again on random data,
#: every layout (the 2048-channel one included), every scale kind, a preset and a tiny
#: eps. Fixed rather than sampled so that two runs compare; each case costs a compilation
#: in the frameworks that compile per shape and option set, so it is small. The whole
#: matrix is ``l2norm check --full`` and the test suite.
DEFAULT_CASE_IDS: tuple[str, ...] = (
    "1:preset=ssd.pytorch:per_channel:float16:hostile",  # add_norm, eps 1e-10
    "2:mode=add_sumsq:per_channel:bfloat16:hostile",
    "4:tiny-eps:per_channel:float32:hostile",  # clamp_norm, eps 1e-30
    "5:mode=clamp_sumsq:per_channel:float64:hostile",
    "1:mode=clamp_sumsq:none:float16:random",
    "3:mode=add_meansq:shared:bfloat16:random",  # RMSNorm, channel axis in the middle
    "6:mode=add_sumsq:per_channel:float32:random",
    "0:default:none:float64:random",  # clamp_norm, eps 1e-12
    "2:mode=add_meansq:per_channel:float32:hostile",  # RMSNorm over the channels, NHWC
    "0:mode=add_norm:per_channel:float16:random",  # a batch of rows
)

#: The op a mean placement makes of the L2 op: RMSNorm (``d = sqrt(mean(x**2) + eps)``).
RMS_NORM = "RMSNorm"
L2_NORM = "L2Norm"


def op_of(options: dict) -> str:
    """The op ``options`` (keyword arguments of :func:`l2norm.l2_normalize`) compute:
    :data:`RMS_NORM` for a mean placement, :data:`L2_NORM` otherwise.

    Example:
        >>> op_of({"eps_mode": "add_meansq"}), op_of({"preset": "caffe"})
        ('RMSNorm', 'L2Norm')
    """
    return RMS_NORM if get_mode(Spec.create(**options).eps_mode).mean else L2_NORM


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def scale_values(kind: str, channels: int, rng: np.random.Generator) -> np.ndarray | None:
    """A float64 scale of one of :data:`SCALES`: per channel in [0.5, 20), shared 20, or
    None."""
    if kind == "per_channel":
        return rng.uniform(0.5, 20.0, size=(channels,))
    return {"shared": np.array([20.0]), "none": None}[kind]


@dataclass(frozen=True)
class Case:
    """One conformance case; :meth:`inputs` makes its arrays deterministically."""

    layout: int
    option_set: str
    scale_kind: str
    dtype: str
    data: str  # "random" or "hostile"

    @property
    def id(self) -> str:
        return f"{self.layout}:{self.option_set}:{self.scale_kind}:{self.dtype}:{self.data}"

    @classmethod
    def from_id(cls, case_id: str) -> Case:
        """The case an :attr:`id` names; :class:`ValueError` for anything else."""
        parts = case_id.split(":")
        if len(parts) != 5 or not parts[0].isdigit():
            raise ValueError(f"not a conformance case id: {case_id!r}")
        layout, option_set, scale_kind, dtype, data = parts
        case = cls(int(layout), option_set, scale_kind, dtype, data)
        if (
            not 0 <= case.layout < len(LAYOUTS)
            or option_set not in OPTION_SETS
            or scale_kind not in SCALES
            or dtype not in FLOAT_DTYPES
            or data not in ("random", "hostile")
        ):
            raise ValueError(f"not a conformance case id: {case_id!r}")
        return case

    @property
    def shape(self) -> tuple[int, ...]:
        return LAYOUTS[self.layout][0]

    @property
    def options(self) -> dict:
        """The keyword arguments of :func:`l2norm.l2_normalize` this case runs with."""
        _, axis, across = LAYOUTS[self.layout]
        return {"axis": axis, "across_spatial": across, **OPTION_SETS[self.option_set]}

    @property
    def op(self) -> str:
        """``"L2Norm"``, or ``"RMSNorm"`` for the mean placement (:func:`op_of`)."""
        return op_of(self.options)

    def axes(self) -> Axes:
        return Spec.create(**self.options).resolve(len(self.shape))

    def inputs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(x, scale, cotangent)`` in the case's dtype."""
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        dtype = numpy_dtype(self.dtype)
        x = rng.standard_normal(self.shape) * 3.0
        if self.data == "hostile":
            x = _plant_hostile_slices(x, self.axes(), HOSTILE[self.dtype], rng)
        cotangent = rng.standard_normal(self.shape)
        scale = scale_values(self.scale_kind, self.shape[self.axes().channel], rng)
        with np.errstate(over="ignore"):
            return (
                x.astype(dtype),
                None if scale is None else scale.astype(dtype),
                cotangent.astype(dtype),
            )


def _plant_hostile_slices(
    x: np.ndarray, axes: Axes, magnitudes: dict, rng: np.random.Generator
) -> np.ndarray:
    """Overwrite leading slices with zeros, huge, tiny and subnormal values, NaN and Inf."""
    rows = _oracle._rows(x, axes).copy()
    k = rows.shape[1]
    special = [
        np.zeros(k),
        rng.uniform(0.5, 1.0, k) * magnitudes["huge"] * rng.choice([-1, 1], k),
        rng.uniform(0.5, 1.0, k) * magnitudes["tiny"] * rng.choice([-1, 1], k),
        rng.uniform(0.5, 1.0, k) * magnitudes["subnormal"] * rng.choice([-1, 1], k),
        np.where(np.arange(k) == k // 2, np.nan, rows[0]),
        np.where(np.arange(k) == 0, np.inf, np.where(np.arange(k) == k - 1, -np.inf, rows[0])),
    ]
    for i, row in enumerate(special[: rows.shape[0]]):
        rows[i] = row
    return _oracle._unrows(rows, x, axes)


def cases(quick: bool = False) -> Iterator[Case]:
    """Every conformance case (or, with ``quick``, one in about five, still every dtype).

    Every layout meets every option set with a per-channel scale on hostile data; the
    shared and absent scales and the random data run on every layout with the default
    and the four eps placements. The wide layout (2048 channels) runs random data with
    :data:`WIDE_OPTION_SETS`.
    """
    all_cases: list[Case] = []
    for dtype in FLOAT_DTYPES:
        for layout, option_set in itertools.product(FULL_LAYOUTS, OPTION_SETS):
            all_cases.append(Case(layout, option_set, "per_channel", dtype, "hostile"))
        for layout, scale_kind, option_set in itertools.product(
            FULL_LAYOUTS, SCALES, ["default", *[f"mode={m}" for m in EPS_MODES]]
        ):
            all_cases.append(Case(layout, option_set, scale_kind, dtype, "random"))
        for layout in range(len(FULL_LAYOUTS), len(LAYOUTS)):
            for option_set in WIDE_OPTION_SETS:
                all_cases.append(Case(layout, option_set, "per_channel", dtype, "random"))
    if quick:
        all_cases = all_cases[::5]
    yield from all_cases


def default_cases() -> list[Case]:
    """The fixed representative subset ``l2norm check`` runs by default
    (:data:`DEFAULT_CASE_IDS`)."""
    return [Case.from_id(case_id) for case_id in DEFAULT_CASE_IDS]
