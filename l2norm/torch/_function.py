"""The kernels as registered ops, and how a call reaches them.

One op per direction, for both kernels (the native CPU one and the Triton one, named by the
``lowering`` argument): ``l2norm::kernel_forward`` and ``l2norm::kernel_backward``
(:func:`torch.library.custom_op`). Each has a fake implementation (shapes and strides only,
never a data pointer), a vmap rule (:func:`torch.library.register_vmap`) and the forward
its autograd (``register_autograd`` with ``setup_context``), so that fake tensors, the meta
device, ``make_fx``, AOTAutograd, ``torch.compile`` and ``torch.func`` see one node.

How a call reaches them (:func:`apply`):

* eager with autograd recording, or under a ``torch.func`` transform or forward AD:
  :class:`_KernelFunction`, the same autograd (the same ``setup_context`` and backward
  functions) plus the forward-mode formula, with its vmap rule generated from the ops'
  rules. Recording eagerly, it is applied through the C entry point of
  ``autograd.Function`` (its Python ``apply`` binds the arguments by signature, 10 us);
* eager without autograd: the op; with no dispatch mode, transform or tensor subclass in
  play, whose dispatch would reach the same function, that function directly (the
  dispatcher costs 25 us of a 30 us small call);
* ``torch.compile``: the op itself (Dynamo cannot trace a custom ``jvp``).

The hand-derived backward (:mod:`l2norm.reference`'s docstring states it) runs in the
kernel that ran the forward; under ``create_graph=True`` (and so under ``torch.func``
transforms, which differentiate with it) in the ops lowering, whose ops autograd can
differentiate again (double backward, ``jacfwd`` of ``jacrev``). The ops lowering runs
as :class:`_OpsFunction` eagerly and as plain differentiable ops under transforms and
forward AD (a documented fallback: its ops carry their own rules).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from l2norm.core.modes import get_mode
from l2norm.core.spec import Spec
from l2norm.torch import _cpu, _ops, _triton
from l2norm.torch._dispatch import Plan, choose
from l2norm.torch._export import forward as exported_forward
from l2norm.torch._layout import Layout

#: The kernel lowerings: each has ``layout``, ``forward`` and ``backward`` alike.
KERNELS = {"cpu-kernel": _cpu, "triton": _triton}

__all__ = ["apply", "kernel_backward", "kernel_forward", "scripted_l2_normalize"]


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


def _plan_from(x: Tensor, norm: tuple[int, ...], channel: int, eps_mode: str, eps: float) -> Plan:
    """The plan of a call given by its resolved axes (``channel`` first among ``norm``)."""
    axis = channel if norm == (channel,) else (channel, *(a for a in norm if a != channel))
    spec = Spec.create(axis=axis, eps_mode=eps_mode, eps=eps)
    return Plan.of(spec, spec.resolve(x.dim()), x.shape)


def _transformed() -> bool:
    """Whether a ``torch.func`` transform or a forward-AD level is active: calls then take
    the routes whose rules the transforms know."""
    return (
        torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0
    )


def apply(x: Tensor, weight: Tensor | None, plan: Plan) -> Tensor:
    """The layer's forward through the lowering :func:`choose` picks."""
    route = choose(x, plan)
    if route.lowering == "traced":  # plain aten ops a deployment runtime can run
        return exported_forward(
            x,
            weight,
            norm=plan.norm,
            channel=plan.channel,
            eps_mode=plan.spec.eps_mode,
            eps=plan.spec.eps,
        )
    if route.lowering == "ops":
        if _transformed():
            return _ops.forward(x, weight, plan, differentiable=True)[0]
        return _OpsFunction.apply(x, weight, plan)
    args = (x, weight, plan.channel, plan.spec.eps_mode, plan.spec.eps, route.lowering)
    if torch.compiler.is_compiling():
        return kernel_forward(*args)
    if _transformed():
        return _KernelFunction.apply(*args)
    if torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
    ):
        return _apply_recorded(*args)
    return _forward(*args)


# --------------------------------------------------------------------------- the ops
# The kernels read the tensors' memory as it lies (_layout), so the ops take the channel
# axis, the placement and the lowering, and find the layout themselves, from the real
# tensor at run time (the strides of a traced call may be symbols).

#: Kernel views by (lowering, shape, strides, dtype, device, channel); bounded.
_VIEWS: dict[tuple, Layout] = {}


def _kernel_view(x: Tensor, channel: int, lowering: str) -> Layout:
    key = (lowering, x.shape, x.stride(), x.dtype, x.device, channel)
    view = _VIEWS.get(key)
    if view is None:
        view = KERNELS[lowering].layout(x, (channel,), channel)
        if view is None:  # callers check first; this would be a dispatch bug
            raise RuntimeError(f"the l2norm {lowering} lowering got a tensor it does not apply to")
        if len(_VIEWS) >= 4096:
            _VIEWS.clear()
        _VIEWS[key] = view
    return view


def _forward_impl(
    x: Tensor, weight: Tensor | None, channel: int, eps_mode: str, eps: float, lowering: str
) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    view = _kernel_view(x, channel, lowering)
    return KERNELS[lowering].forward(x, weight, view, get_mode(eps_mode), eps)


def _refuse_tangents(name: str, *tensors: Tensor | None) -> None:
    """RuntimeError for a forward-AD tangent reaching an op: ``torch.library`` gives custom
    ops no forward-mode rule, and the dispatcher would drop the tangent silently. The
    layer never gets here with one (forward AD goes through :class:`_KernelFunction`)."""
    if torch.autograd.forward_ad._current_level < 0 or not torch._C._is_fwd_grad_enabled():
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"l2norm::{name} was called directly on a forward-AD dual tensor: the op has "
            "no forward-mode rule of its own; call l2norm.torch.l2_normalize or L2Norm, "
            "whose forward mode goes through l2norm's formula"
        )


@torch.library.custom_op("l2norm::kernel_forward", mutates_args=())
def kernel_forward(
    x: Tensor, weight: Tensor | None, channel: int, eps_mode: str, eps: float, lowering: str
) -> Tensor:
    """``y = weight * x / d(n)`` over ``channel`` by a kernel (``"cpu-kernel"`` or
    ``"triton"``); ``x`` dense in memory, ``channel >= 0``."""
    _refuse_tangents("kernel_forward", x, weight)
    return _forward_impl(x, weight, channel, eps_mode, eps, lowering)


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
    _refuse_tangents("kernel_backward", x, weight, g)
    if x.numel() == 0:  # no slices: an empty dx, a zero scale gradient
        return torch.empty_like(x), x.new_zeros((x.shape[channel],), dtype=torch.float64)
    view = _kernel_view(x, channel, lowering)
    return KERNELS[lowering].backward(x, weight, g, view, get_mode(eps_mode), eps)


@kernel_backward.register_fake
def _(x, weight, g, channel, eps_mode, eps, lowering):
    return torch.empty_like(x), x.new_empty((x.shape[channel],), dtype=torch.float64)


def _plain(x: Tensor, weight: Tensor | None) -> bool:
    """Whether the dispatcher would send the op straight to its implementation: no
    dispatch mode (fake tensors, ``make_fx``, ``FlopCounterMode``), no transform, no
    tensor subclass."""
    return (
        type(x) in _PLAIN
        and (weight is None or type(weight) in _PLAIN)
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
    )


_PLAIN = (Tensor, torch.nn.Parameter)


def _forward(
    x: Tensor, weight: Tensor | None, channel: int, eps_mode: str, eps: float, lowering: str
) -> Tensor:
    """The forward op, or its implementation where that is where the op would go."""
    if _plain(x, weight):
        return _forward_impl(x, weight, channel, eps_mode, eps, lowering)
    return kernel_forward(x, weight, channel, eps_mode, eps, lowering)


# What FlopCounterMode counts, per entry: the kernels' arithmetic (forward: a square added
# and two products; backward: the square, <w g, x>, dx's three terms and dw's product).


def _forward_flops(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 4 * math.prod(x_shape)


def _backward_flops(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 12 * math.prod(x_shape)


def _register_flops(flop_counter: Any) -> None:
    flop_counter.register_flop_formula(torch.ops.l2norm.kernel_forward)(_forward_flops)
    flop_counter.register_flop_formula(torch.ops.l2norm.kernel_backward)(_backward_flops)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Registers the flop formulas when ``torch.utils.flop_counter`` is first imported:
    importing it here would cost ``import l2norm.torch`` about 0.3 s (it loads Triton), for
    a tool few calls use. The finder wraps that one module's loader, then removes itself."""

    NAME = "torch.utils.flop_counter"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _register_flops(module)

        spec.loader.exec_module = exec_and_register
        return spec


if _AfterImport.NAME in sys.modules:
    _register_flops(sys.modules[_AfterImport.NAME])
else:
    sys.meta_path.insert(0, _AfterImport())


# --------------------------------------------------------------------------- autograd


def _weight_grad(weight: Tensor | None, per_channel: Tensor) -> Tensor | None:
    """The scale's gradient from a kernel's per-channel sums (float64)."""
    if weight is None:
        return None
    total = per_channel.sum() if weight.numel() == 1 else per_channel
    return total.reshape(weight.shape).to(weight.dtype)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, channel, eps_mode, eps, lowering = inputs
    ctx.save_for_backward(x, weight)
    ctx.save_for_forward(x, weight)
    ctx.options = (channel, eps_mode, eps, lowering)


def _backward(ctx: Any, g: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    channel, eps_mode, eps, lowering = ctx.options
    if torch.is_grad_enabled():  # create_graph (and torch.func): differentiable ops
        dx, dw = _ops.vjp(x, weight, g, _kernel_plan(x, channel, eps_mode, eps))
    else:
        dx, per_channel = kernel_backward(x, weight, g, channel, eps_mode, eps, lowering)
        dw = _weight_grad(weight, per_channel) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None


def _jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, *_: Any) -> Tensor:
    """``dy = w J tx + tw u`` with ``u = x / d(n)``: ``J``, the Jacobian of ``u``, is
    symmetric (``I / d - x x^T d'(n) / (n d^2)``), so ``J tx`` is the unscaled VJP of
    ``tx``. In differentiable ops, so that forward AD can nest (``jacfwd`` of ``jacfwd``)."""
    x, weight = ctx.saved_tensors
    channel, eps_mode, eps, _ = ctx.options
    plan = _kernel_plan(x, channel, eps_mode, eps)
    acc = _ops.accumulator(x)
    w = _ops.weight_view(weight, plan, acc)
    dy = None
    if tx is not None:
        jt = _ops.vjp(x, None, tx, plan)[0].to(acc)
        dy = jt if w is None else jt * w
    if tw is not None:
        u = _ops.forward(x, None, plan, differentiable=True)[0].to(acc)
        du = u * _ops.weight_view(tw, plan, acc)
        dy = du if dy is None else dy + du
    if dy is None:
        return torch.zeros_like(x)
    return dy.to(x.dtype)


def _kernel_plan(x: Tensor, channel: int, eps_mode: str, eps: float) -> Plan:
    return _plan_from(x, (channel,), channel, eps_mode, eps)


kernel_forward.register_autograd(_backward, setup_context=_setup_context)


class _KernelFunction(torch.autograd.Function):
    """A kernel for eager autograd, ``torch.func`` and forward AD: the op's autograd (the
    same ``setup_context`` and backward), a forward-mode formula, and a vmap rule
    generated from the ops' own."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor | None, channel: int, eps_mode: str, eps: float, lowering: str
    ) -> Tensor:
        return _forward(x, weight, channel, eps_mode, eps, lowering)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


#: ``autograd.Function``'s C entry point: what ``_KernelFunction.apply`` calls once no
#: transform is active, without binding the arguments to ``forward``'s signature.
_apply_recorded = super(torch.autograd.Function, _KernelFunction).apply


# --------------------------------------------------------------------------- vmap rules
# Only x (and g) batched: the batch folds into the kernel's outer axis (one call, the
# channel one axis further). A batched scale, or a backward (whose scale gradient is per
# example): one call per example, stacked, which is what a loop over the examples gives.


def _example(arg: Any, dim: int | None, i: int) -> Any:
    """Example ``i`` of a batched argument (``dim`` not None), dense in memory as the
    kernels read it (selected across an inner axis, it is strided); any other as it is."""
    if dim is None:
        return arg
    example = arg.select(dim, i)
    dense = example.is_contiguous() or (
        example.dim() == 4 and example.is_contiguous(memory_format=torch.channels_last)
    )
    return example if dense else example.contiguous()


def _per_example(info: Any, in_dims: tuple, op: Any, *args: Any) -> tuple:
    results = [
        op(*(_example(a, d, i) for a, d in zip(args, in_dims, strict=True)))
        for i in range(info.batch_size)
    ]
    if isinstance(results[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
        return stacked, tuple(0 for _ in stacked)
    return torch.stack(results), 0


@torch.library.register_vmap("l2norm::kernel_forward")
def _(info, in_dims, x, weight, channel, eps_mode, eps, lowering):
    x_dim, w_dim = in_dims[0], in_dims[1]
    if w_dim is None and x_dim is not None:
        folded, axis = x.movedim(x_dim, 0), channel + 1
        if KERNELS[lowering].layout(folded, (axis,), axis) is None:
            folded = folded.contiguous()
            if KERNELS[lowering].layout(folded, (axis,), axis) is None:  # too few pixels
                plan = _kernel_plan(folded, axis, eps_mode, eps)
                return _ops.forward(folded, weight, plan)[0], 0
        return kernel_forward(folded, weight, axis, eps_mode, eps, lowering), 0
    return _per_example(info, in_dims, kernel_forward, x, weight, channel, eps_mode, eps, lowering)


@torch.library.register_vmap("l2norm::kernel_backward")
def _(info, in_dims, x, weight, g, channel, eps_mode, eps, lowering):
    return _per_example(
        info, in_dims, kernel_backward, x, weight, g, channel, eps_mode, eps, lowering
    )


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
        return _forward_impl(x, weight, plan.channel, eps_mode, eps, route.lowering)
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
