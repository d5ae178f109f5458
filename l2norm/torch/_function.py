"""Autograd for the lowerings: one ``autograd.Function``, and a ``torch.library`` op for
TorchScript.

The hand-derived backward (:mod:`l2norm.reference`'s docstring states it) runs in the
lowering that ran the forward: the CPU kernel, or the ops lowering reusing the forward's
per-slice sums. Under ``create_graph=True`` it runs the ops lowering, whose ops autograd
can differentiate again (double backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2norm._spec import Spec
from l2norm.torch import _cpu, _ops
from l2norm.torch._dispatch import Plan, choose

__all__ = ["apply", "scripted_l2_normalize"]


class _L2NormFunction(torch.autograd.Function):
    """Forward by the chosen lowering; saves the input and at most slice-sized tensors."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, plan: Plan, route: Any) -> Tensor:
        ctx.plan, ctx.route = plan, route
        if isinstance(route, _cpu.Layout):
            y = _cpu.forward(x, weight, route, plan.mode, plan.spec.eps)
            ctx.save_for_backward(x, weight)
        else:
            y, saved = _ops.forward(x, weight, plan)
            ctx.save_for_backward(x, weight, saved)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        plan, route = ctx.plan, ctx.route
        if torch.is_grad_enabled():  # create_graph: differentiable ops, from x alone
            dx, dw = _ops.vjp(x, weight, g, plan)
        elif isinstance(route, _cpu.Layout):
            dx, dw = _cpu.backward(x, weight, g, route, plan.mode, plan.spec.eps)
        else:
            dx, dw = _ops.vjp(x, weight, g, plan, saved[0])
        if not ctx.needs_input_grad[1]:
            dw = None
        return dx, dw, None, None


def apply(x: Tensor, weight: Tensor | None, plan: Plan) -> Tensor:
    """The layer's forward through the lowering :func:`choose` picks."""
    route = choose(x, plan)
    if route == "traced":
        return _ops.forward(x, weight, plan)[0]
    return _L2NormFunction.apply(x, weight, plan, route)


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
    if isinstance(route, _cpu.Layout):
        return _cpu.forward(x, weight, route, plan.mode, eps)
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
