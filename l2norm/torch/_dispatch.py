"""Which lowering computes a call: one function, :func:`choose`.

Two lowerings compute the layer, and the autograd graph of traced forms is a third route:

* ``cpu-kernel`` (:mod:`l2norm.torch._cpu`): the native kernel for CPU tensors of float32
  / float16 / bfloat16, one normalized axis, dense memory; sums in float64 (a one-rung
  ladder). A registered op (:mod:`l2norm.torch._function`), so ``torch.compile`` keeps
  it as one node of the graph.
* ``ops`` (:mod:`l2norm.torch._ops`): plain torch ops on the ladder of
  :mod:`l2norm._ladder`, any device, dtype, axes and layout; what ``torch.compile`` fuses
  on CUDA, what double backward differentiates, and the fallback wherever the kernel does
  not apply.
* ``traced``: the ``ops`` forward recorded op by op for ``torch.jit.trace``,
  ``torch.export`` and ONNX, differentiated by autograd (they cannot record a Python
  ``autograd.Function``).

Every route computes each slice on its own with no data-dependent branch and no read
back to the host, so the choice depends only on the call's static properties and can
never make one sample's result depend on another's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from l2norm._modes import EpsMode, get_mode
from l2norm._spec import Axes, Spec
from l2norm.torch import _cpu

__all__ = ["LOWERINGS", "Plan", "choose", "use_lowering"]

#: The lowerings :func:`use_lowering` can force.
LOWERINGS: tuple[str, ...] = ("cpu-kernel", "ops")

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "l2norm_lowering", default=None
)


@dataclass(frozen=True)
class Plan:
    """What one call needs that depends only on the spec, the rank and the shape."""

    spec: Spec
    norm: tuple[int, ...]  # normalized axes, sorted
    channel: int
    ndim: int
    size: int  # entries per slice

    @classmethod
    def of(cls, spec: Spec, axes: Axes, shape: torch.Size) -> Plan:
        size = 1
        for a in axes.norm:
            size *= int(shape[a])
        return cls(spec, axes.norm, axes.channel, axes.ndim, size)

    @property
    def mode(self) -> EpsMode:
        return get_mode(self.spec.eps_mode)

    @property
    def reduced(self) -> tuple[int, ...]:
        """The axes a per-channel scale's gradient sums over."""
        return tuple(a for a in range(self.ndim) if a != self.channel)


@contextlib.contextmanager
def use_lowering(name: str | None) -> Iterator[None]:
    """Force a lowering inside the block (for tests, benchmarks and comparisons).

    Args:
        name: ``"ops"`` (plain torch ops everywhere), ``"cpu-kernel"`` (the native CPU
            kernel wherever it applies; :class:`RuntimeError` on a call it should take if
            it cannot be loaded), or None (the default choice).

    Example::

        >>> import torch, l2norm.torch
        >>> with l2norm.torch.use_lowering("ops"):
        ...     y = l2norm.torch.l2_normalize(torch.ones(2, 4))
    """
    if name is not None and name not in LOWERINGS:
        raise ValueError(f"unknown lowering {name!r}; expected one of {list(LOWERINGS)} or None")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def choose(x: Tensor, plan: Plan) -> str | _cpu.Layout:
    """``"traced"``, ``"ops"`` or the CPU kernel's view of ``x`` (a :class:`_cpu.Layout`)."""
    if torch.jit.is_tracing() or (
        torch.compiler.is_exporting() and not torch.compiler.is_compiling()
    ):
        return "traced"
    layout = _cpu.layout(x, plan.norm, plan.channel)
    if torch.compiler.is_compiling():  # the kernel is one registered op in the graph
        return layout if layout is not None and _cpu.ready() else "ops"
    forced = _FORCED.get()
    if forced == "ops" or layout is None:
        return "ops"
    if forced == "cpu-kernel":
        _cpu.require()
        return layout
    return layout if _cpu.ready() else "ops"
