"""The JAX backends: ``jax`` (:func:`l2norm.jax.l2_normalize`), one per other lowering of
:mod:`l2norm.core.lowering`, forced (``jax-ops``, ``jax-pallas``), and ``nnx`` and
``linen`` (the Flax layers, as users call them). A forced lowering computes the calls it
applies to (the Pallas kernels: one normalized axis) and leaves the others to the ladder,
as in a user's program.

Each runs forward and VJP as one jitted program, compiled once per option set, shape and
dtype (compiling dominates the cost of a case; a program computes the forward too, so a
case's ``forward`` and ``vjp`` share it). Jitted rather than op by op: op by op, every
primitive compiles afresh for each new shape, which measured 3 times slower for the
``jax`` row and 10 times for ``nnx``; ``l2norm check`` also keeps the programs on disk
(:func:`l2norm.conformance.use_jax_compilation_cache`). float64 inputs run with ``jax.enable_x64``,
every other dtype without it, as a user would. XLA on CPU flushes subnormals, so every
row measures with ``flushes_subnormals``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2norm.conformance._registry import Backend
from l2norm.core.spec import FLOAT_DTYPES, Spec
from l2norm.jax import _pallas, l2_normalize, use_lowering

_Run = Callable[..., tuple]


def _options_key(options: dict) -> tuple:
    """The options as a hashable key (a preset and the eps placement it stands for share
    one program)."""
    spec = Spec.create(**options)
    axis = tuple(spec.axis) if isinstance(spec.axis, (list, tuple)) else spec.axis
    return axis, spec.across_spatial, spec.eps, spec.eps_mode


def _kwargs(key: tuple) -> dict:
    axis, across_spatial, eps, eps_mode = key
    return {"axis": axis, "across_spatial": across_spatial, "eps": eps, "eps_mode": eps_mode}


def _pullback(fn: Callable, x: Any, params: Any, g: Any) -> tuple:
    """``(y, dx, dparams)`` of ``fn(x, params)`` for the cotangent ``g``."""
    y, pull = jax.vjp(fn, x, params)
    return (y, *pull(g))


@functools.cache
def _function_program(key: tuple, lowering: str | None) -> _Run:
    kwargs = _kwargs(key)

    def run(x, scale, g):
        with use_lowering(lowering):  # read while jit traces
            return _pullback(lambda x, s: l2_normalize(x, s, **kwargs), x, scale, g)

    return jax.jit(run)


@functools.cache
def _nnx_program(graphdef: Any) -> _Run:
    from flax import nnx

    def run(x, params, rest, g):
        return _pullback(lambda x, p: nnx.merge(graphdef, p, rest)(x), x, params, g)

    return jax.jit(run)


@functools.cache
def _linen_program(key: tuple, shared: bool, param_dtype: str) -> _Run:
    from l2norm.linen import L2Norm

    layer = L2Norm(channel_shared=shared, param_dtype=jnp.dtype(param_dtype), **_kwargs(key))

    def run(x, variables, g):
        return _pullback(lambda x, v: layer.apply(v, x), x, variables, g)

    return jax.jit(run)


def _run_function(x, scale, g, options, lowering=None):
    # None is a pytree without leaves: one program serves "no scale" too.
    return _function_program(_options_key(options), lowering)(x, scale, g)


def _run_nnx(x, scale, g, options):
    from flax import nnx

    from l2norm.nnx import L2Norm

    spec = Spec.create(**options)
    layer = L2Norm(
        x.shape[spec.resolve(x.ndim).channel],
        scale_init=1.0 if scale is None else np.asarray(scale, np.float64).reshape(-1),
        channel_shared=scale is None or scale.size == 1,
        param_dtype=x.dtype if scale is None else scale.dtype,
        **_kwargs(_options_key(options)),
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    y, dx, dparams = _nnx_program(graphdef)(x, params, rest, g)
    return y, dx, None if scale is None else dparams["scale"][...]


def _run_linen(x, scale, g, options):
    shared = scale is None or scale.size == 1
    param_dtype = "float32" if scale is None else scale.dtype.name
    value = jnp.ones((1,), jnp.float32) if scale is None else jnp.asarray(scale).reshape(-1)
    program = _linen_program(_options_key(options), shared, param_dtype)
    y, dx, dvars = program(x, {"params": {"scale": value}}, g)
    return y, dx, None if scale is None else dvars["params"]["scale"]


def build(name: str, lowering: str | None = None) -> Backend:
    """The backend ``nnx`` or ``linen`` (the Flax layers), else ``name`` runs
    :func:`l2norm.jax.l2_normalize` with ``lowering`` forced (``jax-ops``: the ladder in
    jax.numpy; ``jax-pallas``: the Pallas kernels, interpreted on the CPU) or, for None,
    the default one (``jax``: the native kernel on the CPU)."""
    layers = {"nnx": _run_nnx, "linen": _run_linen}
    run = layers.get(name, functools.partial(_run_function, lowering=lowering))

    def compute(x, scale, g, options):
        with jax.enable_x64(x.dtype == np.float64):
            xj = jnp.asarray(x)
            sj = None if scale is None else jnp.asarray(scale)
            y, dx, ds = run(xj, sj, jnp.asarray(g), options)
            ds = None if scale is None else np.asarray(ds).reshape(scale.shape)
            return np.asarray(y), np.asarray(dx), ds

    def forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
        return compute(x, scale, np.zeros_like(x), options)[0]

    def vjp(x, scale, g, options):
        _, dx, ds = compute(x, scale, g, options)
        return dx, ds

    return Backend(
        name=name,
        forward=forward,
        vjp=vjp,
        # XLA:CPU reads float32 subnormals as zero (see l2norm.jax).
        flushes_subnormals=True,
        # The Pallas kernels take no float64 (the lowering would leave such calls to the
        # ladder, which the other rows check).
        dtypes=_pallas.DTYPES if lowering == "pallas" else FLOAT_DTYPES,
    )
