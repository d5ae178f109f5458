r"""The eps placements, each written once: the table every lowering computes from.

A placement is three facts: whether eps is *added* or is a *floor* (``clamp``), whether
it meets the norm ``n`` (``power=1``) or the sum of squares ``n**2`` (``power=2``), and
whether that sum is first divided by the slice's size ``N`` (``mean``: the mean of the
squares, which makes the normalization an RMSNorm):

=============== ========= ===== ==== ============================ ==========================
eps_mode        placement power mean ``d(n)``                     peers
=============== ========= ===== ==== ============================ ==========================
``add_sumsq``   add       2     no   ``sqrt(n**2 + eps)``         Caffe SSD, MXNet, CoreML
``add_norm``    add       1     no   ``n + eps``                  ssd.pytorch, mmdetection
``clamp_sumsq`` clamp     2     no   ``sqrt(max(n**2, eps))``     tf.math.l2_normalize
``clamp_norm``  clamp     1     no   ``max(n, eps)``              torch F.normalize, Keras 3
``add_meansq``  add       2     yes  ``sqrt(n**2 / N + eps)``     RMSNorm (torch, Keras,
                                                                  Flax, Llama, T5, Gemma)
=============== ========= ===== ==== ============================ ==========================

Everything a lowering needs follows from those two facts, in the functions below:

* :meth:`EpsMode.denominator`: ``d`` from the sum of squares ``a = n**2``, the norm ``n``
  and eps, all in the units of a slice divided by a power of two (:meth:`EpsMode.scaled_eps`);
* :meth:`EpsMode.ratio`: ``r = n d'(n) / d(n)`` and ``1 - r``, the factor of the backward
  ``dx = (sigma - r xhat <sigma, xhat>) / d`` (``xhat = x / n``; :mod:`l2norm.reference`
  derives it): ``(n / d)**power`` when eps is added, 1 or 0 (above or below the
  threshold) when eps is a floor;
* :meth:`EpsMode.threshold`: the norm below which eps dominates, ``eps**(1 / power)``
  (``sqrt(N eps)`` for a mean);
* :meth:`EpsMode.inf_limit`: ``n / d(n)`` as ``n`` grows without bound, 1 (``sqrt(N)``
  for a mean): a slice holding ``k`` infinities maps them to ``±inf_limit / sqrt(k)``.

Every method takes the slice size as ``count`` (only a mean reads it).

The functions take an array namespace ``xp`` with ``sqrt``, ``where``, ``ones_like`` and
``zeros_like`` (NumPy, torch, jax.numpy and TensorFlow all fit) and arrays of one dtype
(eps included, in a lowering); arithmetic is written with operators. A native kernel
receives ``placement``, ``power`` and ``mean`` as numbers (:attr:`EpsMode.kernel_code`), so a
new placement of the same family needs no kernel change.

Adding an eps mode: a row in :data:`MODES` (and the table in :mod:`l2norm.reference`'s
docstring); ``docs/layout.md`` lists what else it touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["EpsMode", "MODES", "get_mode"]


@dataclass(frozen=True)
class EpsMode:
    """One eps placement.

    Attributes:
        name: the ``eps_mode`` string users pass.
        placement: ``"add"`` (``d**power = n**power + eps``) or ``"clamp"``
            (``d**power = max(n**power, eps)``).
        power: 1 when eps meets the norm, 2 when it meets the sum of squares.
        mean: the sum of squares is divided by the slice size ``N`` first (power 2 only).
        formula: ``d(n)`` as text, for tables and reprs.
        peers: who computes it this way.
    """

    name: str
    placement: Literal["add", "clamp"]
    power: Literal[1, 2]
    formula: str
    peers: str
    mean: bool = False

    @property
    def kernel_code(self) -> tuple[int, int, int]:
        """``(is_add, power, mean)``: how the native kernels are told the placement."""
        return (1 if self.placement == "add" else 0, self.power, int(self.mean))

    def threshold(self, eps: float, count: int = 1) -> float:
        """The norm below which eps dominates: ``eps``, ``sqrt(eps)`` or ``sqrt(N eps)``."""
        return eps if self.power == 1 else math.sqrt(eps * (count if self.mean else 1))

    def inf_limit(self, count: int = 1) -> float:
        """``n / d(n)`` as ``n`` grows without bound: 1, or ``sqrt(N)`` for a mean."""
        return math.sqrt(count) if self.mean else 1.0

    def _powered(self, sumsq: Any, norm: Any, count: Any) -> Any:
        # What eps meets: the norm, the sum of squares, or their mean (sumsq / N).
        if self.power == 1:
            return norm
        return sumsq / count if self.mean else sumsq

    def scaled_eps(self, eps: Any, p: Any) -> Any:
        """eps in the units of a slice divided by ``p`` (a power of two): the norm is
        divided by ``p``, the sum of squares by ``p**2``."""
        return eps / p if self.power == 1 else eps / p / p

    def denominator(self, xp: Any, sumsq: Any, norm: Any, eps: Any, count: Any = 1) -> Any:
        """``d`` from ``sumsq = n**2``, ``norm = n``, eps in the same units and the slice
        size ``count``.

        A NaN in ``sumsq`` or ``norm`` stays NaN (the floor is written as a ``where`` that
        keeps its second operand when the comparison fails).
        """
        m = self._powered(sumsq, norm, count)
        if self.placement == "add":
            return m + eps if self.power == 1 else xp.sqrt(m + eps)
        floored = xp.where(eps > m, eps, m)
        return floored if self.power == 1 else xp.sqrt(floored)

    def above_threshold(self, sumsq: Any, norm: Any, eps: Any, count: Any = 1) -> Any:
        """Where the data, not eps, sets ``d`` in a clamp placement (``n**power >= eps``)."""
        return self._powered(sumsq, norm, count) >= eps

    def ratio(
        self, xp: Any, sumsq: Any, norm: Any, d: Any, eps: Any, count: Any = 1
    ) -> tuple[Any, Any]:
        """``(r, 1 - r)`` with ``r = n d'(n) / d(n)`` in ``[0, 1]``; ``1 - r`` without
        cancellation. (``d**power = m + eps`` with ``m`` what eps meets gives
        ``r = m / d**power``: ``n d'(n) = power * m / (power * d**(power - 1))``.)"""
        if self.placement == "clamp":
            above = self.above_threshold(sumsq, norm, eps, count)
            r = xp.where(above, xp.ones_like(norm), xp.zeros_like(norm))
            return r, xp.ones_like(r) - r
        d_p = d if self.power == 1 else d * d
        return self._powered(sumsq, norm, count) / d_p, eps / d_p


MODES: dict[str, EpsMode] = {
    m.name: m
    for m in (
        EpsMode("add_sumsq", "add", 2, "sqrt(n**2 + eps)", "Caffe SSD, MXNet, CoreML"),
        EpsMode("add_norm", "add", 1, "n + eps", "ssd.pytorch, mmdetection"),
        EpsMode("clamp_sumsq", "clamp", 2, "sqrt(max(n**2, eps))", "tf.math.l2_normalize, Keras 2"),
        EpsMode("clamp_norm", "clamp", 1, "max(n, eps)", "torch F.normalize, Keras 3"),
        EpsMode("add_meansq", "add", 2, "sqrt(n**2 / N + eps)", "RMSNorm", mean=True),
    )
}


def get_mode(name: str) -> EpsMode:
    """The :class:`EpsMode` called ``name`` (names are validated by ``Spec.create``)."""
    return MODES[name]
