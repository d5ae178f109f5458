"""The cross-framework comparison: one float32 input through every backend, compared pairwise.

Each backend is measured against the reference case by case; this section shows how far
the frameworks are from each other on one input a user could have (an NHWC feature map
with an all-zero pixel and pixels whose squares underflow or overflow float32), once per
op: the L2 op with its default options (:data:`CROSS_OPTIONS`) and RMSNorm, the mean
placement (:data:`RMS_CROSS_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from l2norm.conformance._measures import forward_error, gradient_error, gradient_magnitudes
from l2norm.conformance._registry import DEFAULT_FORWARD_ULPS, DEFAULT_GRAD_EPS
from l2norm.core.spec import Spec

if TYPE_CHECKING:
    from l2norm.conformance._registry import Backend

CROSS_SHAPE: tuple[int, ...] = (2, 6, 6, 64)
CROSS_OPTIONS: dict = {"axis": -1}
#: RMSNorm over the channels with the usual eps of its peers' layers (torch, Keras, Flax).
RMS_CROSS_OPTIONS: dict = {"axis": -1, "eps_mode": "add_meansq", "eps": 1e-6}


def cross_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The input, scale and cotangent every backend gets (float32, NHWC, seeded)."""
    rng = np.random.default_rng(20240607)
    x = rng.standard_normal(CROSS_SHAPE)
    x[0, 0, 0] = 0.0  # an all-zero pixel (after a ReLU)
    x[0, 0, 1] *= 1e-30  # squares underflow float32
    x[0, 0, 2] *= 1e25  # squares overflow float32
    x[1, 1, 1] *= 1e-13  # below sqrt(eps) of the *_sumsq modes
    scale = rng.uniform(10.0, 30.0, CROSS_SHAPE[-1])
    g = rng.standard_normal(CROSS_SHAPE)
    return x.astype(np.float32), scale.astype(np.float32), g.astype(np.float32)


def cross_outputs(backend: Backend, options: dict = CROSS_OPTIONS) -> tuple[np.ndarray, np.ndarray]:
    """``(y, dx)`` of one backend on :func:`cross_inputs` with ``options``, as float32."""
    x, scale, g = cross_inputs()
    with np.errstate(all="ignore"):
        y = np.asarray(backend.forward(x, scale, dict(options)), np.float32)
        dx, _ = backend.vjp(x, scale, g, dict(options))
    return y, np.asarray(dx, np.float32)


@dataclass
class Cross:
    """Pairwise maximum differences: forward in float32 ULPs, input gradient in float32
    machine epsilons relative to each slice's term size (the conformance measures), of the
    op ``options`` compute."""

    backends: list[str]
    forward_ulps: list[list[float]]
    grad_eps: list[list[float]]
    exceeded: list[str]
    options: dict = field(default_factory=lambda: dict(CROSS_OPTIONS))

    @property
    def passed(self) -> bool:
        return not self.exceeded


def cross_compare(
    outputs: dict[str, tuple[np.ndarray, np.ndarray]],
    registered: dict[str, Backend] | None = None,
    options: dict = CROSS_OPTIONS,
) -> Cross:
    """Compare every pair of ``outputs`` (name -> ``(y, dx)``, computed with ``options``); a
    pair fails when it differs by more than the sum of the two backends' float32 bounds
    (each is within its bound of the reference). ``registered`` gives the bounds; a name
    missing there gets the defaults."""
    x, scale, g = cross_inputs()
    f32 = np.dtype(np.float32)
    magnitude, _ = gradient_magnitudes(x, scale, g, Spec.create(**options))
    names = list(outputs)
    registered = registered or {}
    fwd = [[0.0] * len(names) for _ in names]
    grad = [[0.0] * len(names) for _ in names]
    exceeded = []

    def bound(name: str, kind: str) -> float:
        backend = registered.get(name)
        if backend is None:
            return (DEFAULT_FORWARD_ULPS if kind == "fwd" else DEFAULT_GRAD_EPS)["float32"]
        return (backend.forward_ulps if kind == "fwd" else backend.grad_eps)["float32"]

    with np.errstate(all="ignore"):
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                b = names[j]
                (ya, dxa), (yb, dxb) = outputs[a], outputs[b]
                f = max(forward_error(ya, yb, f32, True), forward_error(yb, ya, f32, True))
                d = gradient_error(dxa, dxb, magnitude, None, None, None, f32, True)
                fwd[i][j] = fwd[j][i] = f
                grad[i][j] = grad[j][i] = d
                # Two faithfully rounded results are at most 1 ULP apart: each is one of
                # the two floats around the exact value.
                f_bound = max(bound(a, "fwd"), bound(b, "fwd"))
                g_bound = bound(a, "grad") + bound(b, "grad")
                if not (f <= f_bound and d <= g_bound):
                    exceeded.append(
                        f"{a} vs {b}: {f:.3g} ULP (bound {f_bound:g}), "
                        f"{d:.3g} eps (bound {g_bound:g})"
                    )
    return Cross(names, fwd, grad, exceeded, dict(options))
