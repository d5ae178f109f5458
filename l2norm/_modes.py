r"""The eps placements, each written once: the table every lowering computes from.

A placement is two facts: whether eps is *added* or is a *floor* (``clamp``), and whether
it meets the norm ``n`` (``power=1``) or the sum of squares ``n**2`` (``power=2``):

=============== ========= ===== =========================== =============================
eps_mode        placement power ``d(n)``                    peers
=============== ========= ===== =========================== =============================
``add_sumsq``   add       2     ``sqrt(n**2 + eps)``        Caffe SSD, MXNet, CoreML
``add_norm``    add       1     ``n + eps``                 ssd.pytorch, mmdetection
``clamp_sumsq`` clamp     2     ``sqrt(max(n**2, eps))``    tf.math.l2_normalize, Keras 2
``clamp_norm``  clamp     1     ``max(n, eps)``             torch F.normalize, Keras 3
=============== ========= ===== =========================== =============================

Everything a lowering needs follows from those two facts, in the functions below:

* :meth:`EpsMode.denominator`: ``d`` from the sum of squares ``a = n**2``, the norm ``n``
  and eps, all in the units of a slice divided by a power of two (:meth:`EpsMode.scaled_eps`);
* :meth:`EpsMode.ratio`: ``r = n d'(n) / d(n)`` and ``1 - r``, the factor of the backward
  ``dx = (sigma - r xhat <sigma, xhat>) / d`` (``xhat = x / n``; :mod:`l2norm.reference`
  derives it): ``(n / d)**power`` when eps is added, 1 or 0 (above or below the
  threshold) when eps is a floor;
* :meth:`EpsMode.threshold`: the norm below which eps dominates, ``eps**(1 / power)``.

The functions take an array namespace ``xp`` with ``sqrt``, ``where``, ``ones_like`` and
``zeros_like`` (NumPy, torch, jax.numpy and TensorFlow all fit) and arrays of one dtype
(eps included, in a lowering); arithmetic is written with operators. A native kernel
receives ``placement`` and ``power`` as numbers (:attr:`EpsMode.kernel_code`), so a new
placement of the same family needs no kernel change.

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
        formula: ``d(n)`` as text, for tables and reprs.
        peers: who computes it this way.
    """

    name: str
    placement: Literal["add", "clamp"]
    power: Literal[1, 2]
    formula: str
    peers: str

    @property
    def kernel_code(self) -> tuple[int, int]:
        """``(is_add, power)``: how the native kernels are told the placement."""
        return (1 if self.placement == "add" else 0, self.power)

    def threshold(self, eps: float) -> float:
        """The norm below which eps dominates: ``eps`` or ``sqrt(eps)``."""
        return eps if self.power == 1 else math.sqrt(eps)

    def scaled_eps(self, eps: Any, p: Any) -> Any:
        """eps in the units of a slice divided by ``p`` (a power of two): the norm is
        divided by ``p``, the sum of squares by ``p**2``."""
        return eps / p if self.power == 1 else eps / p / p

    def denominator(self, xp: Any, sumsq: Any, norm: Any, eps: Any) -> Any:
        """``d`` from ``sumsq = n**2``, ``norm = n`` and eps in the same units.

        A NaN in ``sumsq`` or ``norm`` stays NaN (the floor is written as a ``where`` that
        keeps its second operand when the comparison fails).
        """
        if self.placement == "add":
            return norm + eps if self.power == 1 else xp.sqrt(sumsq + eps)
        if self.power == 1:
            return xp.where(eps > norm, eps, norm)
        return xp.sqrt(xp.where(eps > sumsq, eps, sumsq))

    def above_threshold(self, sumsq: Any, norm: Any, eps: Any) -> Any:
        """Where the data, not eps, sets ``d`` in a clamp placement (``n**power >= eps``)."""
        return (norm if self.power == 1 else sumsq) >= eps

    def ratio(self, xp: Any, sumsq: Any, norm: Any, d: Any, eps: Any) -> tuple[Any, Any]:
        """``(r, 1 - r)`` with ``r = n d'(n) / d(n)`` in ``[0, 1]``; ``1 - r`` without
        cancellation. (``d**power = n**power + eps`` gives ``d' = (n / d)**(power - 1)``.)"""
        if self.placement == "clamp":
            above = self.above_threshold(sumsq, norm, eps)
            r = xp.where(above, xp.ones_like(norm), xp.zeros_like(norm))
            return r, xp.ones_like(r) - r
        d_p = d if self.power == 1 else d * d
        n_p = norm if self.power == 1 else sumsq
        return n_p / d_p, eps / d_p


MODES: dict[str, EpsMode] = {
    m.name: m
    for m in (
        EpsMode("add_sumsq", "add", 2, "sqrt(n**2 + eps)", "Caffe SSD, MXNet, CoreML"),
        EpsMode("add_norm", "add", 1, "n + eps", "ssd.pytorch, mmdetection"),
        EpsMode("clamp_sumsq", "clamp", 2, "sqrt(max(n**2, eps))", "tf.math.l2_normalize, Keras 2"),
        EpsMode("clamp_norm", "clamp", 1, "max(n, eps)", "torch F.normalize, Keras 3"),
    )
}


def get_mode(name: str) -> EpsMode:
    """The :class:`EpsMode` called ``name`` (names are validated by ``Spec.create``)."""
    return MODES[name]
