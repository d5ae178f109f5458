"""The l2norm op as three JAX primitives, so that every transformation reaches a rule of
its own; each is lowered by the native CPU kernel (XLA FFI custom calls) or by the
ladder in plain ``jax.numpy`` (:mod:`l2norm.jax`), chosen while tracing.

* ``l2norm_forward(x, s) = s u`` with ``u = x / d(n)``;
* ``l2norm_tangent(x, s, tx, ts) = s J tx + ts u``, its forward-mode derivative (linear in
  ``tx, ts``), with ``J = du/dx``;
* ``l2norm_vjp(x, s, g) = (J (s g), sum g u)``, its transpose (linear in ``g``).

``J = I / d - x x^T d'(n) / (n d**2)`` is symmetric, so the tangent is computed by the
VJP's own lowering: ``J tx`` is the input gradient with no scale. The rules:

* differentiation: the forward's JVP is the tangent primitive, whose transpose is the VJP
  primitive (and the VJP's transpose the tangent): ``jax.grad`` runs the kernel's backward
  (one pass), ``jax.jvp`` / ``jacfwd`` the kernel too. The tangent's and the VJP's own
  derivatives (second order and up) are ``jax.jvp`` of the ladder's formulas in plain
  ``jax.numpy``, which differentiate to any order;
* batching: any ``in_axes`` of any operand. ``x``'s extra leading axes are *groups*; the
  scale is shared by all groups or has one entry per group (``(*groups, per)``). The
  kernel folds a shared scale's groups into its outer loop and loops over the groups of a
  per-group scale; the ladder maps over them. A VJP always gets one scale per group, so
  that its scale gradient comes out per example (``vmap(grad)``);
* sharding (kernel): the custom calls are ``custom_partitioning`` ops with a Shardy rule:
  every axis but the normalized (channel) axis (batch, spatial, groups) may be sharded
  and stays so, each device normalizing its own slices; a sharded channel axis is
  gathered first (XLA inserts the all-gather), which costs communication but never gives
  a wrong answer. The scale gradient is the only collective: a sum of ``C`` numbers over
  the devices holding the data. The ladder lowering is plain ``jax.numpy`` and XLA
  partitions it as any other (it sums a sharded channel axis across devices).

Zero-size operands (any axis) give empty results and a zero scale gradient, with no
kernel call.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import dispatch as _dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from l2norm import _native
from l2norm._native import ScaleKind
from l2norm.core import lowering as _registry
from l2norm.core.modes import MODES, EpsMode, get_mode
from l2norm.core.spec import Axes, Spec
from l2norm.jax import _ops, _pallas

__all__ = ["LOWERINGS", "OpPlan", "applies", "normalize", "plan_for", "use_lowering"]

DTYPES = ("float32", "float16", "bfloat16")
#: The lowerings :func:`use_lowering` can force: the native CPU kernel, the Pallas kernels
#: (:mod:`l2norm.jax._pallas`: GPUs and TPUs; interpreted elsewhere), or plain jax.numpy ops.
LOWERINGS: tuple[str, ...] = _registry.names("jax")
#: Where the Pallas kernels are the default: CUDA GPUs, whose Triton lowering is compiled
#: ahead of time in the tests. On TPUs (Mosaic) and ROCm they are opt-in
#: (``use_lowering("pallas")``) until they have run on such hardware.
PALLAS_DEFAULT_BACKENDS = ("gpu",)


@contextlib.contextmanager
def use_lowering(name: str | None) -> Iterator[None]:
    """Force a lowering for the calls traced inside the block (tests, comparisons).

    Args:
        name: ``"ops"`` (the ladder in plain ``jax.numpy`` everywhere), ``"cpu-kernel"``
            (the native kernel wherever it applies; RuntimeError on a call it should take
            if it cannot be built), ``"pallas"`` (the Pallas kernels wherever they apply:
            Triton on GPUs, Mosaic on TPUs, interpreted on the CPU), or None (the
            default: the kernel on the CPU, Pallas on CUDA GPUs, the ladder elsewhere).

    Example::

        >>> import jax.numpy as jnp
        >>> from l2norm.jax import l2_normalize, use_lowering
        >>> with use_lowering("ops"):
        ...     y = l2_normalize(jnp.ones((2, 4)))
    """
    with _registry.use_lowering("jax", name):
        yield


@functools.cache
def _registered() -> bool:
    """Build (once) and register the custom calls; False where they cannot be built."""
    lib = _native.xla_library(jax.ffi.include_dir())
    if lib is None:
        return False
    for name, symbol in (
        ("l2norm_forward", lib.L2NormForward),
        ("l2norm_backward", lib.L2NormBackward),
    ):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


def applies(dtype: str, axes: Axes) -> bool:
    """Whether a call with data of ``dtype`` over ``axes`` runs on the kernel: the CPU
    backend, one normalized axis, the kernel's dtypes, not turned off (``use_lowering``,
    ``L2NORM_CPU_KERNEL=0``), and the kernel built. Decided while tracing, from static
    properties only."""
    forced = _registry.forced("jax")
    if forced in ("ops", "pallas") or dtype not in DTYPES or axes.norm != (axes.channel,):
        return False
    if jax.default_backend() != "cpu":
        return False
    if forced == "cpu-kernel":
        if not _registered():
            raise RuntimeError("the l2norm native CPU kernel is not available (see the warning)")
        return True
    return os.environ.get("L2NORM_CPU_KERNEL", "1") != "0" and _registered()


def choose(dtype: str, axes: Axes, width: int) -> str:
    """The lowering of a call with data of ``dtype`` over ``axes``, slices of ``width``
    entries: ``"cpu-kernel"`` (:func:`applies`), ``"pallas"`` (forced, or the default on
    :data:`PALLAS_DEFAULT_BACKENDS`; one normalized axis, a dtype and width the kernels
    take) or ``"ops"``. Decided while tracing, from static properties only."""
    if applies(dtype, axes):
        return "cpu-kernel"
    forced = _registry.forced("jax")
    one_axis = axes.norm == (axes.channel,)
    takes = one_axis and dtype in _pallas.DTYPES and _pallas.fits(width)
    if forced == "pallas" or (forced is None and jax.default_backend() in PALLAS_DEFAULT_BACKENDS):
        return "pallas" if takes else "ops"
    return "ops"


class OpPlan(NamedTuple):
    """The static attributes of one call (the primitives' parameter).

    ``x`` has ``base_ndim`` axes, after any group axes ``vmap`` added; the scale operand
    has shape ``(*groups, per)`` or ``(per,)`` (shared), ``per = channels`` for a scale
    per channel and 1 otherwise (no scale: a constant 1).
    """

    lowering: str  # "cpu-kernel", "pallas" or "ops"
    base_ndim: int
    channel: int
    channels: int
    scale_kind: int  # l2norm._native.ScaleKind: 0 none, 1 shared, 2 one per channel
    is_add: bool  # the eps placement, EpsMode.kernel_code
    power: int
    mean: bool
    eps: float
    ladder_plan: Any  # l2norm.jax's plan: the ops lowering, what higher orders differentiate


def plan_for(
    x: jax.Array, scale_kind: int, spec: Spec, axes: Axes, ladder_plan: Any, lowering: str
) -> OpPlan:
    """The plan of ``x`` normalized over one ``axes.channel`` (or the ladder's ``axes``)."""
    is_add, power, mean = get_mode(spec.eps_mode).kernel_code
    return OpPlan(
        lowering=lowering,
        base_ndim=x.ndim,
        channel=axes.channel,
        channels=int(x.shape[axes.channel]),
        scale_kind=scale_kind,
        is_add=bool(is_add),
        power=int(power),
        mean=bool(mean),
        eps=float(spec.eps),
        ladder_plan=ladder_plan,
    )


def normalize(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    """``y = s x / d(n)``; ``s`` of shape ``(per,)`` in the accumulator's dtype.

    Example::

        >>> import jax.numpy as jnp
        >>> from l2norm.jax import l2_normalize
        >>> l2_normalize(jnp.array([[3.0, 4.0]]))  # through this function
        Array([[0.6, 0.8]], dtype=float32)
    """
    return forward_p.bind(x, s, plan=plan)


# --------------------------------------------------------------------------- the ladder


def _groups(plan: OpPlan, x: jax.Array) -> tuple[int, ...]:
    return tuple(x.shape[: x.ndim - plan.base_ndim])


def _broadcast_scale(plan: OpPlan, s: jax.Array, groups: int) -> jax.Array:
    """``s`` (``(*groups, per)`` or ``(per,)``) shaped to multiply ``x``."""
    lead = s.shape[:-1] if s.ndim > 1 else (1,) * groups
    if not lead and plan.scale_kind != ScaleKind.PER_CHANNEL:
        return s.reshape(())  # the ladder sums a shared scale's gradient over everything
    base = [1] * plan.base_ndim
    if plan.scale_kind == ScaleKind.PER_CHANNEL:
        base[plan.channel] = plan.channels
    return s.reshape((*lead, *base))


def _ladder_forward_one(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:

    return _ops.forward(plan.ladder_plan, x, _broadcast_scale(plan, s, 0))[0].astype(x.dtype)


def _ladder_vjp_one(plan: OpPlan, x: jax.Array, s: jax.Array, g: jax.Array):

    sb = _broadcast_scale(plan, s, 0)
    _, residuals = _ops.forward(plan.ladder_plan, x, sb)
    dx, ds = _ops.backward(plan.ladder_plan, residuals, g.astype(s.dtype))
    return dx, (ds.reshape(s.shape) if plan.scale_kind else jnp.zeros_like(s))


def _over_groups(one: Callable, plan: OpPlan, x: jax.Array, s: jax.Array, *xlike: jax.Array):
    """``one`` (a function of one call) mapped over the group axes; a scale gradient of a
    shared scale is summed over them."""
    groups = _groups(plan, x)
    if not groups:
        return one(plan, x, s, *xlike)
    per_group = s.ndim > 1

    def flat(a: jax.Array) -> jax.Array:
        return a.reshape((-1, *a.shape[len(groups) :]))

    out = jax.vmap(
        functools.partial(one, plan), in_axes=(0, 0 if per_group else None, *[0] * len(xlike))
    )(flat(x), flat(s) if per_group else s, *map(flat, xlike))
    if not isinstance(out, tuple):
        return out.reshape(x.shape)
    dx, ds = out
    # Per group: one row of ds each (the scale's shape, or a kernel's per-channel rows).
    ds = ds.reshape((*groups, *ds.shape[1:])) if per_group else jnp.sum(ds, axis=0)
    return dx.reshape(x.shape), ds


# --------------------------------------------------------------------------- the kernel


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _mode(plan: OpPlan) -> EpsMode:
    """The eps placement the plan was made from (its full kernel code)."""
    code = (int(plan.is_add), plan.power, int(plan.mean))
    return next(m for m in MODES.values() if m.kernel_code == code)


def _attributes(plan: OpPlan, x: jax.Array) -> dict[str, Any]:
    """The custom calls' attributes for ``x`` as this device holds it (the axes after the
    channel axis may be sharded): the kernel's Params but its outer size, which the
    handler takes from ``x``."""
    channel = x.ndim - plan.base_ndim + plan.channel
    inner = int(np.prod(x.shape[channel + 1 :], dtype=np.int64))
    rows = (0, plan.channels, inner)
    kind = ScaleKind(plan.scale_kind)
    return _native.xla_attributes(_native.params(rows, kind, _mode(plan), plan.eps, _threads()))


def _kernel_scale(plan: OpPlan, s: jax.Array) -> jax.Array:
    """The scale as the custom calls take it: float32, no entries when there is none."""
    return (s[..., :0] if plan.scale_kind == ScaleKind.NONE else s).astype(jnp.float32)


def _forward_call(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    """One custom call: the groups of a per-group scale (``s.shape[:-1]``) in a loop."""
    return jax.ffi.ffi_call("l2norm_forward", jax.ShapeDtypeStruct(x.shape, x.dtype))(
        x, s, **_attributes(plan, x)
    )


def _vjp_call(plan: OpPlan, x: jax.Array, g: jax.Array, s: jax.Array):
    """One custom call: ``dx`` and the scale gradient per channel and per scale group."""
    return jax.ffi.ffi_call(
        "l2norm_backward",
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((*s.shape[:-1], plan.channels), jnp.float32),
        ),
    )(x, g, s, **_attributes(plan, x))


def _pallas_one(plan: OpPlan, x: jax.Array, s: jax.Array, *g: jax.Array):
    """One call (no group axes) on the Pallas kernels, with the custom calls' scale and
    results: ``s u``, or ``dx`` and the scale gradient per channel (float32)."""
    options = {"channel": plan.channel, "eps_mode": _mode(plan).name, "eps": plan.eps}
    scale = None if plan.scale_kind == ScaleKind.NONE else s
    if not g:
        return _pallas.forward(x, scale, **options)
    return _pallas.vjp(x, scale, g[0], **options)


def _pallas_scale(plan: OpPlan, s: jax.Array) -> jax.Array:
    """The scale for :func:`_pallas_one`: no scale is one shared placeholder (not a
    per-group array of no entries, which the group mapping cannot flatten)."""
    return jnp.ones((1,), jnp.float32) if plan.scale_kind == ScaleKind.NONE else s


def _pallas_forward_call(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    """:func:`_forward_call` on the Pallas kernels."""
    return _over_groups(_pallas_one, plan, x, _pallas_scale(plan, s))


def _pallas_vjp_call(plan: OpPlan, x: jax.Array, g: jax.Array, s: jax.Array):
    """:func:`_vjp_call` on the Pallas kernels: the scale gradient per channel, per scale
    group (or summed over the groups of a shared scale, in a fixed order)."""
    dx, dw = _over_groups(_pallas_one, plan, x, _pallas_scale(plan, s), g)
    if plan.scale_kind == ScaleKind.NONE:  # the custom calls' shape: one row per scale group
        dw = jnp.zeros((*s.shape[:-1], plan.channels), jnp.float32)
    return dx, dw


_CALLS = {
    ("cpu-kernel", "forward"): _forward_call,
    ("cpu-kernel", "vjp"): _vjp_call,
    ("pallas", "forward"): _pallas_forward_call,
    ("pallas", "vjp"): _pallas_vjp_call,
}


def _mesh_axes(entries: tuple) -> tuple[str, ...]:
    """The mesh axis names of some PartitionSpec entries."""
    names: list[str] = []
    for entry in entries:
        if entry is not None:
            names.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(names)


@functools.cache
def _partitioned(which: str, plan: OpPlan, ndim: int, per_group: bool) -> Callable:
    """The kernel call ``which`` ("forward" or "vjp"; the CPU kernel's custom calls or the
    Pallas kernels, by ``plan.lowering``) as a ``custom_partitioning`` op.

    Sharding rule (Shardy): every axis but the channel axis passes through; the channel
    axis and the scale's entries need replication. Per device the kernel normalizes its
    own slices (the outer size from the buffer, the inner from the local shape); the VJP
    sums its scale gradient over the devices that share the data.
    """
    call = _CALLS[plan.lowering, which]
    groups = ndim - plan.base_ndim
    split = groups + plan.channel  # the channel axis, the one that may not stay sharded
    x_factors = [f"a{i}" for i in range(split)] + ["c"]
    x_factors += [f"i{i}" for i in range(ndim - split - 1)]
    kept = x_factors[:groups] if per_group else []
    s_rule = " ".join([*kept, "p"])
    x_rule = " ".join(x_factors)
    summed = tuple(f for f in x_factors if f not in kept and f != "c")
    # The sums over the scale's groups are not declared reduction factors (dx keeps the
    # axes): the per-device function sums them itself (psum) and returns them whole.
    if which == "forward":
        rule = f"{x_rule}, {s_rule} -> {x_rule}"
    else:
        rule = f"{x_rule}, {x_rule}, {s_rule} -> {x_rule}, {' '.join([*kept, 'c'])}"

    def shardings(mesh: Any, x_sharding: Any) -> tuple:
        spec = tuple(x_sharding.spec) + (None,) * (ndim - len(x_sharding.spec))
        spec = (*spec[:split], None, *spec[split + 1 :])
        s_spec = (*(spec[:groups] if per_group else ()), None)
        x_s = NamedSharding(mesh, PartitionSpec(*spec))
        s_s = NamedSharding(mesh, PartitionSpec(*s_spec))
        axes = _mesh_axes(tuple(e for f, e in zip(x_factors, spec, strict=True) if f in summed))
        return x_s, s_s, axes

    def partition(mesh: Any, arg_shapes: Any, result_shape: Any) -> tuple:
        x_sharding = arg_shapes[0].sharding
        if not isinstance(x_sharding, NamedSharding):  # no mesh known: run it whole
            x_sharding = NamedSharding(mesh, PartitionSpec())
        x_s, s_s, axes = shardings(mesh, x_sharding)
        if which == "forward":
            return mesh, functools.partial(call, plan), x_s, (x_s, s_s)

        def lower(x: jax.Array, g: jax.Array, s: jax.Array):
            dx, dw = call(plan, x, g, s)
            return dx, lax.psum(dw, axes) if axes else dw

        return mesh, lower, (x_s, s_s), (x_s, x_s, s_s)

    def infer(mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:  # GSPMD (no Shardy)
        x_sharding = arg_shapes[0].sharding
        if not isinstance(x_sharding, NamedSharding):
            return None
        x_s, s_s, _ = shardings(mesh, x_sharding)
        return x_s if which == "forward" else (x_s, s_s)

    op = custom_partitioning(functools.partial(call, plan))
    op.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=("c", "p"),
    )
    return op


def _kernel_forward(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    ks = _kernel_scale(plan, s)
    return _partitioned("forward", plan, x.ndim, ks.ndim > 1)(x, ks)


def _kernel_vjp(plan: OpPlan, x: jax.Array, s: jax.Array, g: jax.Array):
    ks = _kernel_scale(plan, s)
    dx, dw = _partitioned("vjp", plan, x.ndim, ks.ndim > 1)(x, g.astype(x.dtype), ks)
    if plan.scale_kind == ScaleKind.PER_CHANNEL:
        ds = dw
    elif plan.scale_kind == ScaleKind.SHARED:
        ds = jnp.sum(dw, axis=-1, keepdims=True)
    else:
        ds = jnp.zeros_like(s)
    return dx, ds.astype(s.dtype)


# --------------------------------------------------------------------------- lowerings


def forward_impl(plan: OpPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    """``s u`` by the plan's lowering."""
    if x.size == 0:
        return jnp.zeros_like(x)
    if plan.lowering in ("cpu-kernel", "pallas"):
        return _kernel_forward(plan, x, s)
    return _over_groups(_ladder_forward_one, plan, x, s)


def vjp_impl(plan: OpPlan, x: jax.Array, s: jax.Array, g: jax.Array):
    """``(J (s g), sum g u)`` by the plan's lowering; the second has ``s``'s shape."""
    if x.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(s)
    if plan.lowering in ("cpu-kernel", "pallas"):
        return _kernel_vjp(plan, x, s, g)
    return _over_groups(_ladder_vjp_one, plan, x, s, g)


def tangent_impl(
    plan: OpPlan, x: jax.Array, s: jax.Array, tx: jax.Array, ts: jax.Array
) -> jax.Array:
    """``s J tx + ts u``: ``J`` is symmetric, so ``J tx`` is the input gradient of ``tx``
    with no scale; both terms are summed in the accumulator's dtype, rounded once."""
    unit = plan._replace(scale_kind=ScaleKind.NONE)
    ones = jnp.ones((*s.shape[:-1], 1), s.dtype)
    groups = len(_groups(plan, x))
    j_tx = vjp_impl(unit, x, ones, tx)[0].astype(s.dtype)
    u = forward_impl(unit, x, ones).astype(s.dtype)
    out = _broadcast_scale(plan, s, groups) * j_tx + _broadcast_scale(plan, ts, groups) * u
    return out.astype(x.dtype)


def _ladder_plan(plan: OpPlan) -> OpPlan:
    return plan._replace(lowering="ops")


# --------------------------------------------------------------------------- primitives


def _primitive(name: str, impl: Callable, multiple_results: bool) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = multiple_results

    def lowered(*args: jax.Array, plan: OpPlan):
        return impl(plan, *args)

    # Eager calls run the lowering compiled, once per plan, shape and dtype.
    prim.def_impl(jax.jit(lowered, static_argnames="plan"))
    # The kernel's lowering is a custom_partitioning op, which needs the devices while
    # lowering; JAX learns that from this set (no public spelling yet).
    _dispatch.prim_requires_devices_during_lowering.add(prim)
    mlir.register_lowering(prim, mlir.lower_fun(lowered, multiple_results=multiple_results))
    return prim


forward_p = _primitive("l2norm_forward", forward_impl, False)
tangent_p = _primitive("l2norm_tangent", tangent_impl, False)
vjp_p = _primitive("l2norm_vjp", vjp_impl, True)


# The outputs have the avals of x (and of s: the scale gradient).
forward_p.def_abstract_eval(lambda x, *_, plan: x)
tangent_p.def_abstract_eval(lambda x, *_, plan: x)
vjp_p.def_abstract_eval(lambda x, s, g, *, plan: (x, s))


def _tangents(primals: tuple, tangents: tuple) -> list:
    return [ad.instantiate_zeros(t) if type(t) is ad.Zero else t for t in tangents]


def _forward_jvp(primals: tuple, tangents: tuple, *, plan: OpPlan):
    x, s = primals
    y = forward_p.bind(x, s, plan=plan)
    tx, ts = _tangents(primals, tangents)
    return y, tangent_p.bind(x, s, tx, ts, plan=plan)


def _by_ladder(prim: Primitive, impl: Callable) -> Callable:
    """A JVP rule (second order and up): the primitive for the value, the ladder's
    formulas in plain jax.numpy for the tangent (linear and transposable)."""

    def rule(primals: tuple, tangents: tuple, *, plan: OpPlan):
        out = prim.bind(*primals, plan=plan)
        ladder = functools.partial(impl, _ladder_plan(plan))
        _, tangent = jax.jvp(ladder, primals, tuple(_tangents(primals, tangents)))
        return out, tangent

    return rule


def _tangent_transpose(ct, x, s, tx, ts, *, plan: OpPlan):
    if type(ct) is ad.Zero:
        return None, None, None, None
    dx, ds = vjp_p.bind(x, s, ct, plan=plan)
    return (
        None,
        None,
        dx if ad.is_undefined_primal(tx) else None,
        ds if ad.is_undefined_primal(ts) else None,
    )


def _vjp_transpose(cts, x, s, g, *, plan: OpPlan):
    ct_dx, ct_ds = cts
    if type(ct_dx) is ad.Zero and type(ct_ds) is ad.Zero:
        return None, None, None
    ct_dx = jnp.zeros_like(x) if type(ct_dx) is ad.Zero else ct_dx
    ct_ds = jnp.zeros_like(s) if type(ct_ds) is ad.Zero else ct_ds
    return None, None, tangent_p.bind(x, s, ct_dx, ct_ds, plan=plan)


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_jvps[tangent_p] = _by_ladder(tangent_p, tangent_impl)
ad.primitive_jvps[vjp_p] = _by_ladder(vjp_p, vjp_impl)
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[vjp_p] = _vjp_transpose


def _batcher(prim: Primitive, scale_args: tuple[int, ...], per_group: bool) -> Callable:
    """The batching rule: the new axis first, as a group axis of ``x`` (unbatched x-like
    operands broadcast); the scale-like operands shared when none is batched or grouped
    (``per_group`` False), otherwise one per group."""

    def rule(args: tuple, dims: tuple, *, plan: OpPlan):
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
        moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
        x_args = [i for i in range(len(args)) if i not in scale_args]
        for i in x_args:
            if dims[i] is None:
                moved[i] = jnp.broadcast_to(moved[i], (size, *moved[i].shape))
        groups = _groups(plan, moved[0])
        grouped = per_group or any(dims[i] is not None or args[i].ndim > 1 for i in scale_args)
        if grouped:
            for i in scale_args:
                s = moved[i]
                if dims[i] is not None and s.ndim == 2:  # batched here, shared below
                    s = s.reshape((size, *(1,) * (len(groups) - 1), s.shape[-1]))
                moved[i] = jnp.broadcast_to(s, (*groups, s.shape[-1]))
        out = prim.bind(*moved, plan=plan)
        return out, ([0, 0] if prim.multiple_results else 0)

    return rule


batching.primitive_batchers[forward_p] = _batcher(forward_p, (1,), False)
batching.primitive_batchers[tangent_p] = _batcher(tangent_p, (1, 3), False)
batching.primitive_batchers[vjp_p] = _batcher(vjp_p, (1,), True)
