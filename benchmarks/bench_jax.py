"""Benchmark l2norm.jax against the naive JAX idiom and a jitted copy (SSD conv4_3 shape).

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/bench_jax.py``.
Timings are interleaved (A B A B ...), warm-up excluded, median of the repeats.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Suite
from l2norm.jax import l2_normalize

SHAPE = (8, 38, 38, 512)


def _naive(x, s):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * s


def _with_grad(f):
    def run(x, s, g):
        y, pullback = jax.vjp(f, x, s)
        return y, pullback(g)

    return jax.jit(run)


def suites(shape: tuple[int, ...], dtype: str, quick: bool = False) -> list[Suite]:
    """Jitted forward and forward+backward for an NCHW ``shape``, run channels last."""
    nhwc = (shape[0], *shape[2:], shape[1])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(nhwc, dtype=np.float32), dtype=dtype)
    g = jnp.asarray(rng.standard_normal(nhwc, dtype=np.float32), dtype=dtype)
    s = jnp.full((nhwc[-1],), 20.0, dtype)

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
        Suite("jax", "forward", True, nhwc, dtype, forward),
        Suite("jax", "forward+backward", True, nhwc, dtype, backward),
    ]


def run(quick: bool = False) -> list[dict]:
    repeats = 5 if quick else 30
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    g = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    s = jnp.full((SHAPE[-1],), 20.0, jnp.float32)
    impls = {
        ("forward", "l2norm"): (jax.jit(l2_normalize), (x, s)),
        ("forward", "naive"): (jax.jit(_naive), (x, s)),
        ("forward", "copy"): (jax.jit(lambda x, s: x * 1.0), (x, s)),
        ("forward+backward", "l2norm"): (_with_grad(l2_normalize), (x, s, g)),
        ("forward+backward", "naive"): (_with_grad(_naive), (x, s, g)),
        ("forward+backward", "copy"): (jax.jit(lambda x, s, g: (x * 1.0, g * 1.0)), (x, s, g)),
    }
    for f, args in impls.values():
        jax.block_until_ready(f(*args))
    times = {key: [] for key in impls}
    for _ in range(repeats):
        for key, (f, args) in impls.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[key].append(time.perf_counter() - start)
    return [
        {
            "framework": "jax",
            "impl": impl,
            "shape": SHAPE,
            "dtype": "float32",
            "mode": f"{mode}, compiled",
            "median_s": float(np.median(times[(mode, impl)])),
            "device": str(jax.devices()[0]),
        }
        for (mode, impl) in impls
    ]


def main() -> None:
    rows = run()
    by = {(r["mode"], r["impl"]): r["median_s"] for r in rows}
    print(f"{'mode':28} {'impl':8} {'median ms':>10}")
    for r in rows:
        print(f"{r['mode']:28} {r['impl']:8} {r['median_s'] * 1e3:10.2f}")
    for mode in ("forward, compiled", "forward+backward, compiled"):
        ours = by[(mode, "l2norm")]
        print(
            f"{mode}: l2norm/naive = {ours / by[(mode, 'naive')]:.2f}, "
            f"l2norm/copy = {ours / by[(mode, 'copy')]:.2f}"
        )


if __name__ == "__main__":
    main()
