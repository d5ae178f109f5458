"""A conformance backend of one platform's Pallas kernel of :mod:`l2norm.jax._pallas`,
called directly (any normalized axes) in Pallas' interpret mode on this machine's CPU: the
TPU kernel (Mosaic block specs, the last block padded) or the GPU kernel (Triton's masked
loads), for ``tests/test_pallas.py``. (The ``jax-pallas`` row of ``l2norm check`` is
:func:`l2norm.jax.l2_normalize` with the ``pallas`` lowering forced.)

Forward and VJP are one jitted program per option set, shape, dtype and scale kind, as
in the ``jax`` rows. Interpret mode runs on XLA:CPU, which flushes float32 subnormals, so
the backend measures with ``flushes_subnormals``. float64 is not taken (TPUs have none;
JAX on a GPU runs float64 on the ladder).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from l2norm.conformance._registry import Backend
from l2norm.core.spec import Spec
from l2norm.jax import _pallas


@functools.cache
def _program(key: tuple, platform: str, has_scale: bool) -> Callable:
    """``(y, dx, ds)`` of one call, jitted: ``key`` is ``(channel, norm axes, eps_mode,
    eps)``."""
    channel, norm, eps_mode, eps = key
    options = {
        "channel": channel,
        "norm_axes": norm,
        "eps_mode": eps_mode,
        "eps": eps,
        "interpret": True,
        "platform": platform,
    }

    def run(x, s, g):
        y = _pallas.forward(x, s if has_scale else None, **options)
        dx, ds = _pallas.vjp(x, s if has_scale else None, g, **options)
        return y, dx, ds

    return jax.jit(run)


def run(x: np.ndarray, scale: np.ndarray | None, g: np.ndarray, options: dict, platform: str):
    """``(y, dx, dscale)`` of the kernels on NumPy inputs, as :mod:`l2norm.reference`
    returns them (``dscale`` in the scale's shape and dtype, None without a scale)."""
    spec = Spec.create(**options)
    axes = spec.resolve(x.ndim)
    key = (axes.channel, axes.norm, spec.eps_mode, spec.eps)
    has_scale = scale is not None
    s = jnp.asarray(scale, jnp.float32).reshape(-1) if has_scale else jnp.ones((1,), jnp.float32)
    y, dx, ds = _program(key, platform, has_scale)(jnp.asarray(x), s, jnp.asarray(g))
    if not has_scale:
        return np.asarray(y), np.asarray(dx), None
    ds = np.asarray(ds)
    ds = ds.sum(dtype=np.float32) if scale.size == 1 else ds  # a shared scale: its sum
    return np.asarray(y), np.asarray(dx), np.asarray(ds).astype(scale.dtype).reshape(scale.shape)


def build(name: str, platform: str) -> Backend:
    """The backend ``name``: ``platform``'s kernel (``"tpu"`` or ``"cuda"``) interpreted.

    Examples:
        >>> build("jax-pallas-cuda", "cuda").flushes_subnormals
        True
    """

    def forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
        return run(x, scale, np.zeros_like(x), options, platform)[0]

    def vjp(x, scale, g, options):
        _, dx, ds = run(x, scale, g, options, platform)
        return dx, ds

    return Backend(
        name=name,
        forward=forward,
        vjp=vjp,
        flushes_subnormals=True,  # interpret mode runs on XLA:CPU
        dtypes=_pallas.DTYPES,
    )
