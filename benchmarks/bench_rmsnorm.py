"""RMSNorm: l2norm's mean placement against the RMSNorm people use, at transformer shapes.

``y = w * x / sqrt(mean(x**2) + eps)`` over the last axis of ``(batch, tokens, channels)``,
eps 1e-6, a weight per channel, forward and forward+backward (input and weight gradients),
each suite timed against its peers in the same run (``benchmarks/harness.py``):

====================== ================================================================
framework              l2norm against
====================== ================================================================
rmsnorm-torch          ``torch.nn.functional.rms_norm`` and its ``torch.compile``d form
                       (eager suites: ours eager; compiled suites: ours compiled too)
rmsnorm-jax            Flax ``nnx.RMSNorm`` (both layers jitted, ours ``l2norm.nnx``)
rmsnorm-keras-<b>      ``keras.layers.RMSNormalization`` on the Keras backend ``<b>``
                       (tensorflow: eager and XLA-compiled; jax: jitted; torch: eager)
====================== ================================================================

Ours is :func:`l2norm.torch.rms_norm` / the ``RMSNorm`` layers, which compute the L2 op with
``eps_mode="add_meansq"`` (faithfully rounded, float32 inside for half inputs). Each
framework runs in a child process of its own, as :mod:`benchmarks.run` runs them.

Usage::

    python benchmarks/bench_rmsnorm.py                 # every framework, SHAPES, both dtypes
    python benchmarks/bench_rmsnorm.py --quick         # the small shape alone
    python benchmarks/bench_rmsnorm.py --frameworks rmsnorm-torch --output DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.harness import Suite
from benchmarks.run import RMS_FRAMEWORKS as FRAMEWORKS

#: A BERT-base / GPT-2 activation and a 7B-model one (batch, tokens, channels).
SHAPES = ((8, 512, 768), (4, 2048, 4096))
QUICK_SHAPES = ((8, 512, 768),)
DTYPES = ("float32", "bfloat16")
EPS = 1e-6


def suites(
    shape: tuple[int, ...],
    dtype: str,
    quick: bool = False,
    device: str = "cpu",
    framework: str = "rmsnorm-torch",
) -> list[Suite]:
    """Forward and forward+backward suites of ``framework`` for a ``(batch, tokens,
    channels)`` ``shape`` on the CPU."""
    if device != "cpu":
        raise ValueError(f"the RMSNorm benchmarks run on the CPU only, not {device!r}")
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    if framework == "rmsnorm-torch":
        # torch.compile takes seconds a graph: a quick run compiles at SHAPES only
        return _torch_suites(x, dy, dtype, compiled=not quick or tuple(shape) in SHAPES)
    if framework == "rmsnorm-jax":
        return _nnx_suites(x, dy, dtype)
    return _keras_suites(x, dy, dtype)


def _torch_suites(x: np.ndarray, dy: np.ndarray, dtype: str, compiled: bool) -> list[Suite]:
    import torch
    import torch.nn.functional as F

    from l2norm.torch import rms_norm

    tdt = getattr(torch, dtype)
    xt, dyt = torch.from_numpy(x).to(tdt), torch.from_numpy(dy).to(tdt)
    channels = x.shape[-1]
    w = torch.linspace(0.5, 2.0, channels, dtype=tdt)
    buf = torch.empty_like(xt)

    def ours(x_, w_):
        return rms_norm(x_, w_, eps=EPS)

    def peer(x_, w_):
        return F.rms_norm(x_, (channels,), w_, eps=EPS)

    # One graph per shape and dtype: start afresh so a long run stays under the
    # recompile limit.
    torch._dynamo.reset()
    c_ours, c_peer = (torch.compile(fn, fullgraph=True, dynamic=False) for fn in (ours, peer))
    xg, wg = xt.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(xt, w)

        return run

    def forward_backward(fn):
        def run():
            torch.autograd.grad(fn(xg, wg), (xg, wg), dyt)

        return run

    copy = {"copy": lambda: buf.copy_(xt)}
    out = []
    shape = tuple(x.shape)
    for mode, timed in (("forward", forward), ("forward+backward", forward_backward)):
        # Ours eager against the peer eager and compiled (a user's two other choices) ...
        eager = {"l2norm": timed(ours), "F.rms_norm": timed(peer)}
        if compiled:
            eager["compiled F.rms_norm"] = timed(c_peer)
        out.append(Suite("rmsnorm-torch", mode, False, shape, dtype, {**eager, **copy}))
        if compiled:  # ... and both compiled
            both = {"l2norm": timed(c_ours), "compiled F.rms_norm": timed(c_peer), **copy}
            out.append(Suite("rmsnorm-torch", mode, True, shape, dtype, both))
    return out


def _nnx_suites(x: np.ndarray, dy: np.ndarray, dtype: str) -> list[Suite]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from l2norm.nnx import RMSNorm

    jdt = jnp.dtype(dtype)
    xj, dyj = jnp.asarray(x, jdt), jnp.asarray(dy, jdt)
    channels, rngs = x.shape[-1], nnx.Rngs(0)
    layers = {
        "l2norm": RMSNorm(channels, eps=EPS, dtype=jdt, rngs=rngs),
        "nnx.RMSNorm": nnx.RMSNorm(channels, epsilon=EPS, dtype=jdt, rngs=rngs),
    }
    forward, backward = {}, {}
    for name, layer in layers.items():
        graphdef, params = nnx.split(layer)

        def apply(params, x_, graphdef=graphdef):
            return nnx.merge(graphdef, params)(x_)

        step, pullback = jax.jit(apply), jax.jit(_pullback(apply))
        forward[name] = lambda step=step, p=params: jax.block_until_ready(step(p, xj))
        backward[name] = lambda pb=pullback, p=params: jax.block_until_ready(pb(p, xj, dyj))
    copy = jax.jit(lambda v: v * 1)
    forward["copy"] = backward["copy"] = lambda: jax.block_until_ready(copy(xj))
    shape = tuple(x.shape)
    return [
        Suite("rmsnorm-jax", "forward", True, shape, dtype, forward),
        Suite("rmsnorm-jax", "forward+backward", True, shape, dtype, backward),
    ]


def _pullback(apply):
    """``(weights, x, dy) -> (dweights, dx)`` of ``apply(weights, x)``: every array an
    argument, none a constant folded into the compiled program."""
    import jax

    return lambda w, x_, dy: jax.vjp(apply, w, x_)[1](dy)


def _keras_suites(x: np.ndarray, dy: np.ndarray, dtype: str) -> list[Suite]:
    """Ours (``l2norm.keras.RMSNorm``) and ``keras.layers.RMSNormalization``, built for
    ``x`` with the dtype policy ``dtype``; gradients for the input and the ``scale``."""
    import keras

    from l2norm.keras import RMSNorm

    backend = keras.backend.backend()
    layers = {
        "l2norm": RMSNorm(eps=EPS, dtype=dtype),
        "keras.layers.RMSNormalization": keras.layers.RMSNormalization(epsilon=EPS, dtype=dtype),
    }
    for layer in layers.values():
        layer.build(x.shape)
    make = {"tensorflow": _keras_tensorflow, "jax": _keras_jax, "torch": _keras_torch}[backend]
    xk, dyk = (keras.ops.cast(keras.ops.convert_to_tensor(a), dtype) for a in (x, dy))
    framework, shape = f"rmsnorm-keras-{backend}", tuple(x.shape)
    out = []
    for (mode, compiled), impls in make(layers, xk, dyk).items():
        out.append(Suite(framework, mode, compiled, shape, dtype, impls))
    return out


def _keras_tensorflow(layers: dict, x, dy) -> dict:
    import tensorflow as tf

    def forward(layer):
        return lambda x_, dy_: layer(x_)

    def forward_backward(layer):
        def run(x_, dy_):
            with tf.GradientTape() as tape:
                tape.watch(x_)
                y = layer(x_)
            return tape.gradient(y, [x_, *layer.trainable_variables], output_gradients=dy_)

        return run

    table: dict = {}
    for name, layer in layers.items():
        for mode, make in (("forward", forward), ("forward+backward", forward_backward)):
            eager = make(layer)
            xla = tf.function(eager, jit_compile=True)  # the inputs are arguments
            table.setdefault((mode, False), {})[name] = lambda fn=eager: fn(x, dy)
            table.setdefault((mode, True), {})[name] = lambda fn=xla: fn(x, dy)
    copy = tf.function(lambda x_: x_ * 1.0, jit_compile=True)
    for impls in table.values():
        impls["copy"] = lambda: copy(x)
    return table


def _keras_jax(layers: dict, x, dy) -> dict:
    import jax

    table: dict = {("forward", True): {}, ("forward+backward", True): {}}
    for name, layer in layers.items():
        weights = [v.value for v in layer.trainable_variables]

        def apply(weights, x_, layer=layer):
            return layer.stateless_call(weights, [], x_)[0]

        step, pullback = jax.jit(apply), jax.jit(_pullback(apply))
        table["forward", True][name] = lambda s=step, w=weights: jax.block_until_ready(s(w, x))
        table["forward+backward", True][name] = lambda p=pullback, w=weights: jax.block_until_ready(
            p(w, x, dy)
        )
    copy = jax.jit(lambda v: v * 1)
    for impls in table.values():
        impls["copy"] = lambda: jax.block_until_ready(copy(x))
    return table


def _keras_torch(layers: dict, x, dy) -> dict:
    import torch

    xg = x.detach().clone().requires_grad_(True)

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x)

        return run

    def forward_backward(layer):
        weights = [v.value for v in layer.trainable_variables]

        def run():
            torch.autograd.grad(layer(xg), [xg, *weights], dy)

        return run

    buf = torch.empty_like(x)
    copy = {"copy": lambda: buf.copy_(x)}
    return {
        ("forward", False): {name: forward(layer) for name, layer in layers.items()} | copy,
        ("forward+backward", False): {n: forward_backward(layer) for n, layer in layers.items()}
        | copy,
    }


def main(argv: list[str] | None = None) -> int:
    """Every RMSNorm framework through :func:`benchmarks.run.main` at :data:`SHAPES` (the
    small one alone with ``--quick``); ``--frameworks``, ``--sizes``, ``--dtypes`` and
    ``--output`` as for that script."""
    from benchmarks.run import main as run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    shapes = QUICK_SHAPES if "--quick" in argv else SHAPES
    defaults = [
        "--frameworks",
        ",".join(FRAMEWORKS),
        "--sizes",
        ";".join(",".join(map(str, s)) for s in shapes),
        "--dtypes",
        ",".join(DTYPES),
        "--output",
        "bench-out-rmsnorm",
    ]
    return run_main([*defaults, *argv])  # later options override the defaults


if __name__ == "__main__":
    sys.exit(main())
