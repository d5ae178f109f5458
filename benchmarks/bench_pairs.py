"""What faithful rounding costs where no wider accumulator exists: the lowerings that sum
in double-word pairs (JAX's ``ops`` lowering in float32 and float64, torch's ``ops``
lowering in float64), forward and forward+backward, median milliseconds.

Run it on two checkouts (before / after a change) to compare; the figures in
``docs/maths.md`` were made that way, one after the other on the same machine.

    python benchmarks/bench_pairs.py
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import torch

import l2norm.jax as l2jax
import l2norm.torch as l2torch


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def jax_rows(dtype: str, shape: tuple[int, ...]) -> dict[str, float]:
    x = jax.numpy.asarray(np.random.default_rng(0).standard_normal(shape).astype(dtype))
    s = jax.numpy.full((512,), 20.0, dtype)

    def loss(x, s):
        return (l2jax.l2_normalize(x, s, axis=1) ** 2).sum()

    with l2jax.use_lowering("ops"):
        fwd = jax.jit(lambda x, s: l2jax.l2_normalize(x, s, axis=1))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return {
            f"jax ops {dtype} forward": median_ms(lambda: fwd(x, s).block_until_ready()),
            f"jax ops {dtype} forward+backward": median_ms(
                lambda: jax.block_until_ready(grad(x, s))
            ),
        }


def main() -> None:
    jax.config.update("jax_enable_x64", True)  # float64 arrays; the float32 path is unchanged
    rows = {
        **jax_rows("float32", (8, 512, 38, 38)),
        **jax_rows("float64", (4, 512, 38, 38)),
    }
    xt = torch.randn(4, 512, 38, 38, dtype=torch.float64, requires_grad=True)
    layer = l2torch.L2Norm(512, dtype=torch.float64)
    g = torch.randn_like(xt)

    def forward_backward() -> None:
        torch.autograd.grad(layer(xt), (xt, layer.weight), g)

    rows["torch ops float64 forward"] = median_ms(lambda: layer(xt.detach()))
    rows["torch ops float64 forward+backward"] = median_ms(forward_backward)
    for name, ms in rows.items():
        print(f"{name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
