"""Keras adapter vs the idioms people use today, on SSD's conv4_3 feature map.

Runs on the Keras backend named by KERAS_BACKEND (tensorflow, jax or torch); run it once
per backend::

    KERAS_BACKEND=tensorflow python benchmarks/bench_keras.py
    KERAS_BACKEND=jax python benchmarks/bench_keras.py
    KERAS_BACKEND=torch python benchmarks/bench_keras.py

Peers (../shared/peers.md): ``tf.math.l2_normalize(x, -1) * g`` and
``keras.layers.UnitNormalization()(x) * g`` on TensorFlow; on JAX
``x / max(||x||, eps) * g`` (what ``optax.safe_norm`` / ``keras.ops.normalize`` compute)
and UnitNormalization; on torch ``F.normalize(x, dim=-1) * g`` and UnitNormalization.
The copy bound is one elementwise pass ``x * 1``. Timings: ``benchmarks/harness.py``.

What the l2norm rows run: on TensorFlow the layer's own lowering (``l2norm.tensorflow._ops``:
an XLA-compiled forward and backward, also in the eager rows, where each pass is one
compiled program call); on JAX and torch, Keras hands the call to ``l2norm.jax`` and
``l2norm.torch``, so those rows measure those adapters behind the Keras layer API.
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np

if __name__ == "__main__":  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.harness import Suite  # noqa: E402
from l2norm.keras import L2Norm  # noqa: E402


def _sync(value):
    """Block until ``value`` is computed (JAX dispatches asynchronously)."""
    for leaf in value if isinstance(value, (list, tuple)) else [value]:
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return value


def _impls_tensorflow(x, g, dy, layer, unit):
    import tensorflow as tf

    def ours(x_, g_):
        return layer(x_)

    def tf_l2(x_, g_):
        return tf.math.l2_normalize(x_, -1) * g_

    def keras_unit(x_, g_):
        return unit(x_) * g_

    def fwd_bwd(fn, watch_gamma_variable):
        def run(x_, g_):
            with tf.GradientTape() as tape:
                tape.watch(x_)
                if not watch_gamma_variable:
                    tape.watch(g_)
                y = fn(x_, g_)
            target = layer.gamma if watch_gamma_variable else g_
            return tape.gradient(y, [x_, target], output_gradients=dy)

        return run

    impls = {}
    for name, fn, is_ours in (
        ("l2norm.keras.L2Norm", ours, True),
        ("tf.math.l2_normalize*g", tf_l2, False),
        ("UnitNormalization*g", keras_unit, False),
    ):
        impls[name] = {
            ("forward", "eager"): fn,
            ("forward+backward", "eager"): fwd_bwd(fn, is_ours),
            ("forward", "compiled"): tf.function(fn, jit_compile=True),
            ("forward+backward", "compiled"): tf.function(fwd_bwd(fn, is_ours), jit_compile=True),
        }
    copy = {("forward", "eager"): lambda x_, g_: x_ * 1.0}
    copy[("forward", "compiled")] = tf.function(copy[("forward", "eager")], jit_compile=True)
    impls["copy bound"] = copy
    return impls, (tf.constant(x), tf.constant(g))


def _impls_jax(x, g, dy, layer, unit):
    import jax
    import jax.numpy as jnp

    from l2norm.keras import l2_normalize

    def ours(x_, g_):
        return l2_normalize(x_, g_)

    def native(x_, g_):
        n = jnp.sqrt(jnp.sum(x_ * x_, axis=-1, keepdims=True))
        return x_ / jnp.maximum(n, 1e-12) * g_

    def keras_unit(x_, g_):
        return unit(x_) * g_

    def fwd_bwd(fn):
        def run(x_, g_):
            return jax.vjp(fn, x_, g_)[1](dy)

        return run

    impls = {}
    for name, fn in (
        ("l2norm.keras.l2_normalize", ours),
        ("jnp x/max(norm,eps)*g", native),
        ("UnitNormalization*g", keras_unit),
    ):
        impls[name] = {
            ("forward", "compiled"): jax.jit(fn),
            ("forward+backward", "compiled"): jax.jit(fwd_bwd(fn)),
        }
    impls["copy bound"] = {("forward", "compiled"): jax.jit(lambda x_, g_: x_ * 1.0)}
    return impls, (jnp.asarray(x), jnp.asarray(g))


def _impls_torch(x, g, dy, layer, unit):
    import torch
    import torch.nn.functional as F

    dy_t = torch.from_numpy(dy)

    def ours(x_, g_):
        return layer(x_)

    def native(x_, g_):
        return F.normalize(x_, dim=-1) * g_

    def keras_unit(x_, g_):
        return unit(x_) * g_

    def fwd_bwd(fn, is_ours):
        def run(x_, g_):
            x_ = x_.detach().requires_grad_(True)
            target = layer.gamma.value if is_ours else g_.detach().requires_grad_(True)
            y = fn(x_, target)
            return torch.autograd.grad(y, [x_, target], dy_t)

        return run

    impls = {}
    for name, fn, is_ours in (
        ("l2norm.keras.L2Norm", ours, True),
        ("F.normalize*g", native, False),
        ("UnitNormalization*g", keras_unit, False),
    ):
        impls[name] = {
            ("forward", "eager"): lambda x_, g_, fn=fn: _no_grad(fn, x_, g_),
            ("forward+backward", "eager"): fwd_bwd(fn, is_ours),
        }
    impls["copy bound"] = {("forward", "eager"): lambda x_, g_: x_ * 1.0}
    return impls, (torch.from_numpy(x), torch.from_numpy(g))


def _no_grad(fn, x_, g_):
    import torch

    with torch.no_grad():
        return fn(x_, g_)


def suites(
    shape: tuple[int, ...], dtype: str, quick: bool = False, device: str = "cpu"
) -> list[Suite]:
    """Every (mode, eager/compiled) suite for an NCHW ``shape``, run channels last, on
    the CPU."""
    if device != "cpu":
        raise ValueError(f"the Keras benchmarks run on the CPU only, not {device!r}")
    backend = keras.backend.backend()
    if dtype != "float32":
        # The peer idioms' gradient tapes here are written for float32 only.
        return []
    nhwc = (shape[0], *shape[2:], shape[1])
    rng = np.random.default_rng(0)
    np_dtype = np.dtype("float32")
    x = np.maximum(rng.standard_normal(nhwc), 0).astype(np_dtype)  # after a ReLU
    g = np.full((nhwc[-1],), 20.0, dtype=np_dtype)
    dy = rng.standard_normal(nhwc).astype(np_dtype)
    layer = L2Norm(scale_init=20.0, dtype=dtype)
    layer.build(nhwc)
    unit = keras.layers.UnitNormalization(dtype=dtype)
    make = {"tensorflow": _impls_tensorflow, "jax": _impls_jax, "torch": _impls_torch}[backend]
    impls, args = make(x, g, dy, layer, unit)
    args = tuple(keras.ops.cast(a, dtype) for a in args)
    if backend == "torch":
        args = tuple(a.cpu() for a in args)
    names = {name: ("l2norm" if name.startswith("l2norm") else name) for name in impls}
    names["copy bound"] = "copy"
    out = []
    for mode in sorted({m for table in impls.values() for m in table}):
        copy_mode = ("forward", mode[1]) if ("forward", mode[1]) in impls["copy bound"] else mode
        fns = {}
        for name, table in impls.items():
            fn = table.get(copy_mode if name == "copy bound" else mode)
            if fn is not None:
                fns[names[name]] = lambda fn=fn: _sync(fn(*args))
        out.append(Suite(f"keras-{backend}", mode[0], mode[1] == "compiled", nhwc, dtype, fns))
    return out


if __name__ == "__main__":  # the headline shape alone; run.py for everything
    from benchmarks.run import headline_main

    sys.exit(headline_main(f"keras-{keras.backend.backend()}", sys.argv[1:]))
