"""Which lowering computes a call: one function, :func:`choose`.

Three lowerings compute the layer, and the autograd graph of traced forms is a fourth
route:

* ``cpu-kernel`` (:mod:`l2norm.torch._cpu`): the native kernel for CPU tensors of float32
  / float16 / bfloat16, one normalized axis, dense memory; sums in float64 (a one-rung
  ladder). A registered op (:mod:`l2norm.torch._function`) on every path, so fake
  tensors, ``make_fx``, ``torch.func`` and ``torch.compile`` see one node.
* ``triton`` (:mod:`l2norm.torch._triton`): fused Triton kernels for CUDA tensors of the
  same dtypes and layouts, the same arithmetic (sums in float64); a registered op too.
  Without a GPU it runs on CPU tensors in Triton's interpreter when forced (tests).
* ``ops`` (:mod:`l2norm.torch._ops`): plain torch ops on the ladder of
  :mod:`l2norm.core.ladder`, any device, dtype, axes and layout; what double backward
  differentiates, and the fallback wherever no kernel applies (float64, several axes,
  strided views, no compiler, no Triton).
* ``traced``: :func:`l2norm.torch._export.forward`, the max-scaled formula in plain aten
  ops, for ``torch.jit.trace``, ``torch.export`` and ONNX (they record the ops a call
  runs; a deployment runtime cannot run a kernel), differentiated by autograd.

Every route computes each slice on its own with no data-dependent branch and no read
back to the host, so the choice depends only on the call's static properties and can
never make one sample's result depend on another's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from l2norm.core import lowering as _lowering
from l2norm.core.modes import EpsMode, get_mode
from l2norm.core.spec import Axes, Spec
from l2norm.torch import _cpu, _triton
from l2norm.torch._layout import Layout

__all__ = ["LOWERINGS", "Plan", "Route", "choose", "use_lowering"]

#: The lowerings :func:`use_lowering` can force (the table of :mod:`l2norm.core.lowering`).
LOWERINGS: tuple[str, ...] = _lowering.names("torch")


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
        for a in axes.norm:  # no int(): under torch.compile a size may be a SymInt
            size = size * shape[a]
        return cls(spec, axes.norm, axes.channel, axes.ndim, size)

    @property
    def mode(self) -> EpsMode:
        return get_mode(self.spec.eps_mode)

    @property
    def reduced(self) -> tuple[int, ...]:
        """The axes a per-channel scale's gradient sums over."""
        return tuple(a for a in range(self.ndim) if a != self.channel)


class Route(NamedTuple):
    """A call's lowering (``"cpu-kernel"``, ``"triton"``, ``"ops"`` or ``"traced"``) and,
    for a kernel, how it sees the input."""

    lowering: str
    layout: Layout | None = None


OPS, TRACED = Route("ops"), Route("traced")


@contextlib.contextmanager
def use_lowering(name: str | None) -> Iterator[None]:
    """Force a lowering inside the block (for tests, benchmarks and comparisons).

    Args:
        name: ``"ops"`` (plain torch ops everywhere), ``"cpu-kernel"`` (the native CPU
            kernel wherever it applies; :class:`RuntimeError` on a call it should take if
            it cannot be loaded), ``"triton"`` (the Triton kernels wherever they apply, CPU
            tensors included when ``TRITON_INTERPRET=1`` runs Triton's interpreter;
            :class:`RuntimeError` where Triton cannot run them), or None (the default).

    Example::

        >>> import torch, l2norm.torch
        >>> with l2norm.torch.use_lowering("ops"):
        ...     y = l2norm.torch.l2_normalize(torch.ones(2, 4))
    """
    with _lowering.use_lowering("torch", name):
        yield


@_cpu.constant_to_compile
def _triton_ready() -> bool:
    """Whether Triton is installed (a constant to ``torch.compile``)."""
    return _triton.installed()


def choose(x: Tensor, plan: Plan) -> Route:
    """The lowering for ``x``: from its device, dtype, memory layout and the normalized
    axes, the compile / trace / export state and :func:`use_lowering`; never its values."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return TRACED
    if torch.compiler.is_compiling():  # a kernel is one registered op in the graph
        if _forced_while_compiling() == "ops":
            return OPS
        if x.device.type == "cpu":
            view = _cpu.layout(x, plan.norm, plan.channel)
            return Route("cpu-kernel", view) if view is not None and _cpu.ready() else OPS
        view = _triton.layout(x, plan.norm, plan.channel) if x.device.type == "cuda" else None
        return Route("triton", view) if view is not None and _triton_ready() else OPS
    # Eager: the same static properties give the same route, so it is looked up (a small
    # call's budget is a few microseconds). The kernel's availability (loading, warning
    # once) is asked on the first call of each key only.
    key = (plan, x.dtype, x.device, x.shape, x.stride(), _forced(), _cpu.enabled())
    try:
        route = _ROUTES.get(key)
    except TypeError:  # symbolic sizes (make_fx's symbolic tracing): no table
        return _choose_eager(x, plan)
    if route is None:
        route = _choose_eager(x, plan)
        if len(_ROUTES) >= _MAX_ROUTES:
            _ROUTES.clear()
        _ROUTES[key] = route
    return route


#: Eager routes by (plan, dtype, device, shape, strides, forced lowering, kernel on);
#: bounded, emptied when full.
_ROUTES: dict[tuple, Route] = {}
_MAX_ROUTES = 4096


def _forced() -> str | None:
    return _lowering.forced("torch")


@_cpu.constant_to_compile
def _forced_while_compiling() -> str | None:
    """:func:`use_lowering`'s choice as ``torch.compile`` traces: read once per compiled
    graph (a graph compiled inside the block keeps the lowering it was traced with)."""
    return _forced()


def _choose_eager(x: Tensor, plan: Plan) -> Route:
    on_cpu = x.device.type == "cpu"
    forced = _forced()
    if forced == "ops":
        return OPS
    if forced == "triton" or (forced is None and x.device.type == "cuda"):
        view = _triton.layout(x, plan.norm, plan.channel)
        if view is None:
            return OPS
        if forced == "triton":
            _triton.require(x.device)
            return Route("triton", view)
        return Route("triton", view) if _triton.available(x.device) else OPS
    view = _cpu.layout(x, plan.norm, plan.channel) if on_cpu else None
    if view is None:
        return OPS
    if forced == "cpu-kernel":
        _cpu.require()
        return Route("cpu-kernel", view)
    return Route("cpu-kernel", view) if _cpu.ready() else OPS
