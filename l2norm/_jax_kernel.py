"""JAX on the CPU through the native kernel (:mod:`l2norm._native`), as XLA custom calls.

:func:`l2norm.jax.normalize` sends here the calls the kernel takes: the CPU backend,
float32 / float16 / bfloat16 data normalized over one axis. XLA:CPU runs each reduction
of the ladder as its own pass over the data; the kernel reads each block of slices twice
while it sits in cache, with float64 sums (the one-rung ladder), so the forward reads
``x`` once and writes ``y`` once, the backward reads ``x`` and ``g`` once and writes
``dx`` once. Every slice is computed on its own, with no branch that depends on other
slices, so results do not depend on the batch.

The custom calls are differentiated by a ``custom_vjp`` whose backward is the kernel's;
higher-order gradients differentiate the ladder lowering's VJP instead (the same maths
in plain ``jax.numpy``). Under ``vmap`` a leading batch dimension folds into the kernel's
outer loop.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2norm import _native
from l2norm._modes import get_mode
from l2norm._spec import Axes, Spec

__all__ = ["LOWERINGS", "KernelPlan", "applies", "normalize", "plan_for", "use_lowering"]

DTYPES = ("float32", "float16", "bfloat16")
#: The lowerings :func:`use_lowering` can force: the native kernel, or plain jax.numpy ops.
LOWERINGS: tuple[str, ...] = ("cpu-kernel", "ops")
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "l2norm_jax_lowering", default=None
)


@contextlib.contextmanager
def use_lowering(name: str | None) -> Iterator[None]:
    """Force a lowering for the calls traced inside the block (tests, comparisons).

    Args:
        name: ``"ops"`` (the ladder in plain ``jax.numpy`` everywhere), ``"cpu-kernel"``
            (the native kernel wherever it applies; RuntimeError on a call it should take
            if it cannot be built), or None (the default: the kernel on the CPU).

    Example::

        >>> import jax.numpy as jnp
        >>> from l2norm.jax import l2_normalize, use_lowering
        >>> with use_lowering("ops"):
        ...     y = l2_normalize(jnp.ones((2, 4)))
    """
    if name is not None and name not in LOWERINGS:
        raise ValueError(f"unknown lowering {name!r}; expected one of {list(LOWERINGS)} or None")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


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
    forced = _FORCED.get()
    if forced == "ops" or dtype not in DTYPES or axes.norm != (axes.channel,):
        return False
    if jax.default_backend() != "cpu":
        return False
    if forced == "cpu-kernel":
        if not _registered():
            raise RuntimeError("the l2norm native CPU kernel is not available (see the warning)")
        return True
    return os.environ.get("L2NORM_CPU_KERNEL", "1") != "0" and _registered()


class KernelPlan(NamedTuple):
    """The static attributes of one call (a ``custom_vjp`` non-differentiable argument)."""

    channels: int
    inner: int
    scale_kind: int  # 0 none, 1 shared, 2 one per channel
    is_add: bool
    power: int
    eps: float
    ladder_plan: Any  # l2norm.jax's plan for the same call: what higher orders differentiate


def plan_for(
    x: jax.Array, has_scale: bool, size: int, spec: Spec, axes: Axes, ladder_plan: Any
) -> KernelPlan:
    """The kernel's attributes for ``x`` with a scale of ``size`` entries (or none)."""
    is_add, power = get_mode(spec.eps_mode).kernel_code
    inner = 1
    for d in x.shape[axes.channel + 1 :]:
        inner *= int(d)
    return KernelPlan(
        channels=int(x.shape[axes.channel]),
        inner=inner,
        scale_kind=0 if not has_scale else (1 if size == 1 else 2),
        is_add=bool(is_add),
        power=int(power),
        eps=float(spec.eps),
        ladder_plan=ladder_plan,
    )


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _attributes(plan: KernelPlan) -> dict[str, Any]:
    return {
        "channels": np.int64(plan.channels),
        "inner": np.int64(plan.inner),
        "scale_kind": np.int64(plan.scale_kind),
        "is_add": bool(plan.is_add),
        "power": np.int64(plan.power),
        "eps": np.float64(plan.eps),
        "threads": np.int64(_threads()),
    }


def _scale_vector(plan: KernelPlan, s: jax.Array) -> jax.Array:
    if plan.scale_kind == 0:
        return jnp.zeros((0,), jnp.float32)
    return s.reshape(-1).astype(jnp.float32)


def _kernel_forward(plan: KernelPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(
        "l2norm_forward", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="expand_dims"
    )
    return call(x, _scale_vector(plan, s), **_attributes(plan))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_vjp(plan: KernelPlan, x: jax.Array, s: jax.Array, g: jax.Array):
    """``(dx, ds)`` by the kernel; differentiated through the ladder lowering's VJP."""
    call = jax.ffi.ffi_call(
        "l2norm_backward",
        (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((plan.channels,), jnp.float32),
        ),
        vmap_method="expand_dims",
    )
    dx, per_channel = call(x, g.astype(x.dtype), _scale_vector(plan, s), **_attributes(plan))
    if plan.scale_kind == 2:
        ds = per_channel.reshape(s.shape)
    elif plan.scale_kind == 1:
        ds = jnp.sum(per_channel).reshape(s.shape)
    else:
        ds = jnp.zeros_like(s)
    return dx, ds.astype(s.dtype)


def _ladder_vjp(plan: KernelPlan, x: jax.Array, s: jax.Array, g: jax.Array):
    from l2norm.jax import _l2norm  # the ladder lowering (it imports this module)

    _, pullback = jax.vjp(functools.partial(_l2norm, plan.ladder_plan), x, s)
    return pullback(g.astype(s.dtype))


def _kernel_vjp_fwd(plan: KernelPlan, x, s, g):
    return _kernel_vjp(plan, x, s, g), (x, s, g)


def _kernel_vjp_bwd(plan: KernelPlan, residuals, cotangents):
    x, s, g = residuals
    _, pullback = jax.vjp(functools.partial(_ladder_vjp, plan), x, s, g)
    return pullback(cotangents)


_kernel_vjp.defvjp(_kernel_vjp_fwd, _kernel_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def normalize(plan: KernelPlan, x: jax.Array, s: jax.Array) -> jax.Array:
    """``y = s x / d(n)`` by the kernel, ``s`` broadcast-shaped as :mod:`l2norm.jax` holds it."""
    return _kernel_forward(plan, x, s)


def _normalize_fwd(plan: KernelPlan, x, s):
    return _kernel_forward(plan, x, s), (x, s)


def _normalize_bwd(plan: KernelPlan, residuals, g):
    x, s = residuals
    return _kernel_vjp(plan, x, s, g)


normalize.defvjp(_normalize_fwd, _normalize_bwd)
