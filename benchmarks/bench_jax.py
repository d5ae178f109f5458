"""Benchmark l2norm.jax against the naive JAX idiom and a jitted copy (SSD conv4_3 shape).

Run ``python benchmarks/bench_jax.py [--quick]`` for the headline shape alone, or
``python benchmarks/run.py`` for every framework and size (``benchmarks/harness.py``
says how timings are taken).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Suite
from l2norm.jax import l2_normalize


def _naive(x, s):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * s


def _with_grad(f):
    def run(x, s, g):
        y, pullback = jax.vjp(f, x, s)
        return y, pullback(g)

    return jax.jit(run)


def suites(
    shape: tuple[int, ...], dtype: str, quick: bool = False, device: str = "cpu"
) -> list[Suite]:
    """Jitted forward and forward+backward for an NCHW ``shape``, run channels last, on
    ``device`` (``"cpu"`` or ``"cuda"``: jit runs where its inputs are)."""
    nhwc = (shape[0], *shape[2:], shape[1])
    rng = np.random.default_rng(0)
    where = jax.devices("gpu" if device == "cuda" else device)[0]
    x = jax.device_put(jnp.asarray(rng.standard_normal(nhwc, dtype=np.float32), dtype), where)
    g = jax.device_put(jnp.asarray(rng.standard_normal(nhwc, dtype=np.float32), dtype), where)
    s = jax.device_put(jnp.full((nhwc[-1],), 20.0, dtype), where)

    def blocking(f, *args):
        return lambda: jax.block_until_ready(f(*args))

    copy = blocking(jax.jit(lambda x: x * 1), x)
    forward = {
        "l2norm": blocking(jax.jit(l2_normalize), x, s),
        "naive_jax": blocking(jax.jit(_naive), x, s),
        "copy": copy,
    }
    backward = {
        "l2norm": blocking(_with_grad(l2_normalize), x, s, g),
        "naive_jax": blocking(_with_grad(_naive), x, s, g),
        "copy": copy,
    }
    return [
        Suite("jax", "forward", True, nhwc, dtype, forward, device=device),
        Suite("jax", "forward+backward", True, nhwc, dtype, backward, device=device),
    ]


if __name__ == "__main__":  # the headline shape alone; run.py for everything
    from benchmarks.run import headline_main

    sys.exit(headline_main("jax", sys.argv[1:]))
