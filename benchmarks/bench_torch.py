"""PyTorch: l2norm.torch against the idioms people use today, and the copy bound.

Peers (written out as their projects write them, see ../shared/peers.md):

* torchvision SSD: ``F.normalize(x, dim=1) * w``
* ssd.pytorch: ``x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * w``
* mmdetection: the same in float32 for half inputs, cast back
* copy: ``buf.copy_(x)`` into a preallocated buffer (the memory-bandwidth bound)

Suites: eager forward and forward+backward by the default lowering (on the CPU the native
kernel, built on the first run, about a minute; with the bytes each saves for backward,
counted with ``torch.autograd.graph.saved_tensors_hooks``), the same two by the pure-torch
lowering (``l2norm.torch.use_lowering("ops")``, the fallback where the kernel cannot be
built and what CUDA runs today), compiled forward and forward+backward (``torch.compile``
of ours against the compiled torchvision idiom), and the cost of the guarantees (ours
against the plain formula without float64 sums and without the float32 upcast).

Small calls (:func:`small_calls`): the per-call latency (median and 90th percentile) of the
eager forward at (1, 512, 4, 4) against the one-line idiom, in the same run.

Usage::

    python benchmarks/bench_torch.py [--quick]    # the headline shape alone
    python benchmarks/bench_torch.py --small      # small calls against the idiom
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import l2norm.torch as l2t
from benchmarks.harness import Suite
from l2norm.torch import l2_normalize

HEADLINE = (8, 512, 38, 38)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torchvision_idiom(x, w):
    return F.normalize(x, dim=1) * w.view(1, -1, 1, 1)


def ssd_pytorch_idiom(x, w):
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * w.view(1, -1, 1, 1)


def mmdet_idiom(x, w):
    x_float = x.float()
    norm = x_float.pow(2).sum(1, keepdim=True).sqrt() + 1e-10
    return (w[None, :, None, None].float().expand_as(x_float) * x_float / norm).type_as(x)


def without_guarantees(x, w):
    """The default clamp_norm formula in the fewest eager passes, minus the guarantees: sums
    of squares in the input's dtype (they overflow and underflow), no upcast of half inputs."""
    buf = torch.mul(x, x)
    inv_d = buf.sum(1, keepdim=True).sqrt_().clamp_min_(1e-12).reciprocal_()
    torch.mul(x, inv_d, out=buf)
    return buf.mul_(w.view(1, -1, 1, 1))


def saved_bytes(fn, x, w) -> int:
    """Bytes autograd keeps for backward (each storage counted once)."""
    seen: dict = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w)
    return sum(seen.values())


def _blocking(impls: dict, device: str) -> dict:
    """The callables, each waiting for its kernels to finish (CUDA runs asynchronously)."""
    if device == "cpu":
        return impls

    def wait(fn):
        def run():
            fn()
            torch.cuda.synchronize()

        return run

    return {name: wait(fn) for name, fn in impls.items()}


def suites(
    shape: tuple[int, ...], dtype: str, quick: bool = False, device: str = "cpu"
) -> list[Suite]:
    tdt = TORCH_DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=tdt)
    # the weight follows the usual mixed-precision layout: float32 master weights
    w = torch.full((shape[1],), 20.0, device=device)
    w_same = w.to(tdt)  # the peers (except mmdet) need the input's dtype
    buf = torch.empty_like(x)
    copy = {"copy": lambda: buf.copy_(x)}
    ours = lambda x, w: l2_normalize(x, w)  # noqa: E731
    peers = {
        "torchvision": lambda: torchvision_idiom(x, w_same),
        "ssd.pytorch": lambda: ssd_pytorch_idiom(x, w_same),
        "mmdet": lambda: mmdet_idiom(x, w),
    }
    out = [
        Suite(
            "torch",
            "forward",
            False,
            shape,
            dtype,
            _blocking({"l2norm": lambda: ours(x, w), **peers, **copy}, device),
            device=device,
        )
    ]

    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    wg_same = w_same.clone().requires_grad_(True)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=tdt)

    def fwd_bwd(fn, weight):
        def run():
            xg.grad = None
            weight.grad = None
            fn(xg, weight).backward(g)

        return run

    fb = {
        "l2norm": fwd_bwd(ours, wg),
        "torchvision": fwd_bwd(torchvision_idiom, wg_same),
        "ssd.pytorch": fwd_bwd(ssd_pytorch_idiom, wg_same),
        "mmdet": fwd_bwd(mmdet_idiom, wg),
    }
    memory = {
        "l2norm": saved_bytes(ours, xg, wg),
        "torchvision": saved_bytes(torchvision_idiom, xg, wg_same),
        "ssd.pytorch": saved_bytes(ssd_pytorch_idiom, xg, wg_same),
        "mmdet": saved_bytes(mmdet_idiom, xg, wg),
        "input": x.nbytes,
    }
    out.append(
        Suite(
            "torch",
            "forward+backward",
            False,
            shape,
            dtype,
            _blocking({**fb, **copy}, device),
            memory,
            device,
        )
    )

    if device == "cpu":
        # The pure-torch lowering: what the CPU runs where the kernel cannot be built.
        def with_ops(fn):
            def run():
                with l2t.use_lowering("ops"):
                    fn()

            return run

        with l2t.use_lowering("ops"):
            ops_memory = {"l2norm": saved_bytes(ours, xg, wg), "input": x.nbytes}
        for mode, impls, memory in (
            ("forward", {"l2norm": lambda: ours(x, w), **peers}, {}),
            ("forward+backward", {**fb, "l2norm": fwd_bwd(ours, wg)}, ops_memory),
        ):
            impls["l2norm"] = with_ops(impls["l2norm"])
            out.append(
                Suite(
                    "torch",
                    f"{mode} (ops lowering)",
                    False,
                    shape,
                    dtype,
                    {**impls, **copy},
                    memory,
                )
            )

    out.append(
        Suite(
            "torch",
            "forward (guarantees cost)",
            False,
            shape,
            dtype,
            _blocking(
                {
                    "l2norm": lambda: ours(x, w),
                    "without_guarantees": lambda: without_guarantees(x, w_same),
                },
                device,
            ),
            device=device,
        )
    )

    if not quick or shape == HEADLINE:
        # One compiled graph per (shape, dtype, grad mode): start afresh for each suite set
        # so that a run over several sizes and dtypes stays under dynamo's recompile limit.
        torch._dynamo.reset()
        c_ours = torch.compile(lambda x, w: l2_normalize(x, w), fullgraph=True, dynamic=False)
        c_tv = torch.compile(torchvision_idiom, fullgraph=True, dynamic=False)
        out.append(
            Suite(
                "torch",
                "forward",
                True,
                shape,
                dtype,
                _blocking(
                    {
                        "l2norm": lambda: c_ours(x, w),
                        "torchvision": lambda: c_tv(x, w_same),
                        **copy,
                    },
                    device,
                ),
                device=device,
            )
        )
        out.append(
            Suite(
                "torch",
                "forward+backward",
                True,
                shape,
                dtype,
                _blocking(
                    {
                        "l2norm": fwd_bwd(c_ours, wg),
                        "torchvision": fwd_bwd(c_tv, wg_same),
                        **copy,
                    },
                    device,
                ),
                device=device,
            )
        )
    return out


# --------------------------------------------------------------------------- small calls

SMALL = (1, 512, 4, 4)


def idiom(x, w):
    """The one-line layer people write: ``x / ||x|| * w`` with torch's clamp."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * w.view(1, -1, 1, 1)


def small_calls(shape=SMALL, calls: int = 20000, rounds: int = 20) -> dict[str, dict[str, float]]:
    """Per-call latency of the eager forward at a small shape: ``{impl: {median, p90}}`` in
    microseconds, and each one's ratio to the idiom's.

    Every call is timed on its own (``perf_counter`` around it), so the 90th percentile
    sees the slow calls a mean hides (an OpenMP join waiting for a descheduled thread).
    The implementations take turns in ``rounds`` blocks, so that they share the
    machine's state. ``layer``: ``L2Norm`` with its learnable scale (autograd records);
    ``no_grad``: the same under ``torch.no_grad()``; the idiom is timed in both modes.
    """
    import time

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layer = l2t.L2Norm(shape[1])
    weight = layer.weight  # a Parameter: the idiom records autograd as the layer does

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    impls = {
        "l2norm": lambda: layer(x),
        "idiom": lambda: idiom(x, weight),
        "l2norm no_grad": no_grad(lambda: layer(x)),
        "idiom no_grad": no_grad(lambda: idiom(x, weight)),
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    per_round = calls // rounds
    for fn in impls.values():  # warm up: plans, routes, the kernel's first load
        for _ in range(200):
            fn()
    clock = time.perf_counter
    for _ in range(rounds):
        for name, fn in impls.items():
            samples = times[name]
            for _ in range(per_round):
                start = clock()
                fn()
                samples.append(clock() - start)
    stats = {}
    for name, samples in times.items():
        samples.sort()
        stats[name] = {
            "median": samples[len(samples) // 2] * 1e6,
            "p90": samples[int(len(samples) * 0.9)] * 1e6,
        }
    for name in ("l2norm", "l2norm no_grad"):
        base = stats[name.replace("l2norm", "idiom")]
        for q in ("median", "p90"):
            stats[name][f"{q} / idiom"] = stats[name][q] / base[q]
    return stats


def print_small_calls(stats: dict[str, dict[str, float]]) -> None:
    print(f"eager forward at {SMALL}, float32, {torch.get_num_threads()} threads (us per call)")
    for name, row in stats.items():
        cells = "  ".join(f"{key} {value:.3g}" for key, value in row.items())
        print(f"  {name:16s} {cells}")


if __name__ == "__main__":  # the headline shape alone; run.py for everything
    if sys.argv[1:] == ["--small"]:  # the small-call overhead against the idiom
        print_small_calls(small_calls())
        sys.exit(0)
    from benchmarks.run import headline_main

    sys.exit(headline_main("torch", sys.argv[1:]))
