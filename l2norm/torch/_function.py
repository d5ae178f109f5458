"""Autograd for the lowerings: registered ops for the kernels (the native CPU one and the
Triton one, so that ``torch.compile`` keeps each as one node), an ``autograd.Function``
for the ops lowering, and a registered op for TorchScript.

The hand-derived backward (:mod:`l2norm.reference`'s docstring states it) runs in the
lowering that ran the forward: the kernel, or the ops lowering reusing the forward's
per-slice sums. Under ``create_graph=True`` it runs the ops lowering, whose ops autograd
can differentiate again (double backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2norm._spec import Spec
from l2norm.torch import _cpu, _ops, _triton
from l2norm.torch._dispatch import Plan, Route, choose
from l2norm.torch._layout import Layout

#: The kernel lowerings: each has ``layout``, ``forward`` and ``backward`` alike.
KERNELS = {"cpu-kernel": _cpu, "triton": _triton}

__all__ = ["apply", "scripted_l2_normalize"]


class _OpsFunction(torch.autograd.Function):
    """The ops lowering with the hand-derived backward; saves the input and the per-slice
    sums (slice-sized)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, plan: Plan) -> Tensor:
        ctx.plan = plan
        y, saved = _ops.forward(x, weight, plan)
        ctx.save_for_backward(x, weight, saved)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, saved = ctx.saved_tensors
        # create_graph: differentiable ops from x alone, so that autograd can go again.
        reuse = None if torch.is_grad_enabled() else saved
        dx, dw = _ops.vjp(x, weight, g, ctx.plan, reuse)
        return dx, dw if ctx.needs_input_grad[1] else None, None


class _KernelFunction(torch.autograd.Function):
    """A kernel in eager mode: the registered op's autograd without the dispatcher's cost
    (about 60 us a call), which only ``torch.compile`` needs."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, plan: Plan, route: Route) -> Tensor:
        ctx.plan, ctx.route = plan, route
        ctx.save_for_backward(x, weight)
        return KERNELS[route.lowering].forward(x, weight, route.layout, plan.mode, plan.spec.eps)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable ops
            dx, dw = _ops.vjp(x, weight, g, ctx.plan)
        else:
            kernel, route = KERNELS[ctx.route.lowering], ctx.route
            dx, per_channel = kernel.backward(
                x, weight, g, route.layout, ctx.plan.mode, ctx.plan.spec.eps
            )
            dw = _weight_grad(weight, per_channel) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def _weight_grad(weight: Tensor | None, per_channel: Tensor) -> Tensor | None:
    """The scale's gradient from a kernel's per-channel sums (float64)."""
    if weight is None:
        return None
    total = per_channel.sum() if weight.numel() == 1 else per_channel
    return total.reshape(weight.shape).to(weight.dtype)


def apply(x: Tensor, weight: Tensor | None, plan: Plan) -> Tensor:
    """The layer's forward through the lowering :func:`choose` picks."""
    route = choose(x, plan)
    if route.lowering == "traced":
        return _ops.forward(x, weight, plan, differentiable=True)[0]
    if route.lowering == "ops":
        return _OpsFunction.apply(x, weight, plan)
    if torch.compiler.is_compiling():  # one registered op in the graph
        return kernel_forward(
            x, weight, plan.channel, plan.spec.eps_mode, plan.spec.eps, route.lowering
        )
    return _KernelFunction.apply(x, weight, plan, route)


# --------------------------------------------------------------------------- the kernels
# The kernels read the tensors' memory as it lies (_layout), so the ops take the channel
# axis, the placement and the lowering, and find the layout themselves.


def _kernel_plan(x: Tensor, channel: int, eps_mode: str, eps: float) -> Plan:
    spec = Spec.create(axis=channel, eps_mode=eps_mode, eps=eps)
    return Plan.of(spec, spec.resolve(x.dim()), x.shape)


def _kernel_view(x: Tensor, channel: int, lowering: str) -> Layout:
    view = KERNELS[lowering].layout(x, (channel,), channel)
    if view is None:  # callers check first; this would be a dispatch bug
        raise RuntimeError(f"the l2norm {lowering} lowering got a tensor it does not apply to")
    return view


@torch.library.custom_op("l2norm::kernel_forward", mutates_args=())
def kernel_forward(
    x: Tensor, weight: Tensor | None, channel: int, eps_mode: str, eps: float, lowering: str
) -> Tensor:
    """``y = weight * x / d(n)`` over ``channel`` by a kernel (``"cpu-kernel"`` or
    ``"triton"``)."""
    plan = _kernel_plan(x, channel, eps_mode, eps)
    view = _kernel_view(x, channel, lowering)
    return KERNELS[lowering].forward(x, weight, view, plan.mode, eps)


@kernel_forward.register_fake
def _(x, weight, channel, eps_mode, eps, lowering):
    return torch.empty_like(x)  # same strides: the kernels keep the memory format


@torch.library.custom_op("l2norm::kernel_backward", mutates_args=())
def kernel_backward(
    x: Tensor,
    weight: Tensor | None,
    g: Tensor,
    channel: int,
    eps_mode: str,
    eps: float,
    lowering: str,
) -> tuple[Tensor, Tensor]:
    """``(dx, dweight per channel in float64)`` by a kernel."""
    plan = _kernel_plan(x, channel, eps_mode, eps)
    view = _kernel_view(x, channel, lowering)
    return KERNELS[lowering].backward(x, weight, g, view, plan.mode, eps)


@kernel_backward.register_fake
def _(x, weight, g, channel, eps_mode, eps, lowering):
    return torch.empty_like(x), x.new_empty((x.shape[channel],), dtype=torch.float64)


def _kernel_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, channel, eps_mode, eps, lowering = inputs
    ctx.save_for_backward(x, weight)
    ctx.options = (channel, eps_mode, eps, lowering)


def _kernel_grad(ctx: Any, g: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    channel, eps_mode, eps, lowering = ctx.options
    if torch.is_grad_enabled():  # create_graph: differentiable ops
        dx, dw = _ops.vjp(x, weight, g, _kernel_plan(x, channel, eps_mode, eps))
    else:
        dx, per_channel = kernel_backward(x, weight, g, channel, eps_mode, eps, lowering)
        dw = _weight_grad(weight, per_channel) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None


kernel_forward.register_autograd(_kernel_grad, setup_context=_kernel_setup)


# --------------------------------------------------------------------------- TorchScript
# TorchScript cannot compile this package's Python; it can call a registered op. The op
# takes the spec's options as plain values and runs the same dispatch.


def _plan_of(x: Tensor, dims: list[int], across_spatial: bool, eps_mode: str, eps: float) -> Plan:
    axis = dims[0] if len(dims) == 1 else tuple(dims)
    spec = Spec.create(axis=axis, across_spatial=across_spatial, eps_mode=eps_mode, eps=eps)
    return Plan.of(spec, spec.resolve(x.dim()), x.shape)


@torch.library.custom_op("l2norm::l2_normalize", mutates_args=())
def scripted_l2_normalize(
    x: Tensor,
    weight: Tensor | None,
    dims: list[int],
    across_spatial: bool,
    eps_mode: str,
    eps: float,
) -> Tensor:
    """The layer as a registered op (what a scripted :class:`~l2norm.torch.L2Norm` calls)."""
    plan = _plan_of(x, dims, across_spatial, eps_mode, eps)
    route = choose(x, plan)
    if route.lowering in KERNELS:
        return KERNELS[route.lowering].forward(x, weight, route.layout, plan.mode, eps)
    return _ops.forward(x, weight, plan)[0]


@scripted_l2_normalize.register_fake
def _(x, weight, dims, across_spatial, eps_mode, eps):
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, dims, across_spatial, eps_mode, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.plan = _plan_of(x, dims, across_spatial, eps_mode, eps)


def _backward(ctx: Any, g: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    dx, dw = _ops.vjp(x, weight, g, ctx.plan)
    return dx, dw, None, None, None, None


scripted_l2_normalize.register_autograd(_backward, setup_context=_setup_context)
