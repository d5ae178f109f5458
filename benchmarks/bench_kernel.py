"""The native CPU kernel alone against the copy bound: its C ABI called on preallocated
buffers (no framework call, no allocation), interleaved with ``torch``'s copy of the same
tensor into a preallocated buffer, median milliseconds and the ratios issue #14 sets
targets for (forward <= 1.5x, forward+backward <= 4x the copy).

    python benchmarks/bench_kernel.py                        # the library this CPU loads
    L2NORM_KERNEL_LEVEL=v3 python benchmarks/bench_kernel.py   # the AVX2 build
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.run import vector_extensions
from l2norm import _native
from l2norm.core.modes import get_mode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _row(lib, name: str, shape, threads: int, gen, repeats: int) -> dict:
    n, c, h, wd = shape
    scale = torch.full((c,), 20.0, dtype=torch.float64)
    x = torch.randn(shape, generator=gen).to(DTYPES[name])
    g = torch.randn(shape, generator=gen).to(DTYPES[name])
    y, dx, buf = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    dw = torch.empty(c, dtype=torch.float64)
    code = _native.DTYPE_CODES[name]
    # (outer, C, inner), a scale per channel, eps placement clamp_norm, eps 1e-12
    kind, mode = _native.ScaleKind.PER_CHANNEL, get_mode("clamp_norm")
    params = ctypes.byref(_native.params((n, c, h * wd), kind, mode, 1e-12, threads))
    calls = {
        "copy": lambda: buf.copy_(x),
        "forward": lambda: lib.l2norm_forward(
            code, params, x.data_ptr(), scale.data_ptr(), y.data_ptr()
        ),
        "backward": lambda: lib.l2norm_backward(
            code, params, x.data_ptr(), g.data_ptr(), scale.data_ptr(), dx.data_ptr(), dw.data_ptr()
        ),
    }
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for round_ in range(repeats + 2):
        for key, fn in calls.items():
            start = time.perf_counter()
            status = fn()
            if round_ >= 2:  # two warm-up rounds
                samples[key].append(time.perf_counter() - start)
            if key != "copy" and status != 0:
                raise RuntimeError(f"the kernel refused its arguments ({key})")
    return {"dtype": name, **{k: statistics.median(v) * 1e3 for k, v in samples.items()}}


def rows(shape: tuple[int, int, int, int], dtypes, repeats: int) -> list[dict]:
    """One row per dtype: median ms of the copy, the forward and the backward."""
    lib = _native.capi()
    if lib is None:
        raise RuntimeError("the native kernel is not available here")
    gen = torch.Generator().manual_seed(0)
    return [_row(lib, name, shape, torch.get_num_threads(), gen, repeats) for name in dtypes]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,512,38,38", help="N,C,H,W")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    table = rows(shape, args.dtypes.split(","), args.repeats)  # type: ignore[arg-type]
    print(f"kernel: {_native.installed_capi() or 'built here'}; threads {torch.get_num_threads()}")
    print(f"vector extensions: {vector_extensions()}; shape {shape}")
    print("| dtype | copy ms | forward ms | backward ms | forward / copy | (f + b) / copy |")
    print("|---|---|---|---|---|---|")
    for r in table:
        fb = (r["forward"] + r["backward"]) / r["copy"]
        print(
            f"| {r['dtype']} | {r['copy']:.2f} | {r['forward']:.2f} | {r['backward']:.2f} "
            f"| {r['forward'] / r['copy']:.2f} | {fb:.2f} |"
        )
    return table


if __name__ == "__main__":
    main()
