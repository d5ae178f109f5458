"""The timing harness every benchmark shares: interleaved, warmed up, medians.

A :class:`Suite` is one question ("forward on this shape, eager, in torch"): a set of
implementations that compute the same thing, plus the copy bound, timed together so
that every ratio compares figures taken in the same minute on the same machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Suite:
    """Implementations to time against each other.

    Attributes:
        framework: ``"torch"``, ``"keras-tensorflow"``, ``"jax"``, ...
        mode: ``"forward"`` or ``"forward+backward"``.
        compiled: whether the callables are compiled (torch.compile, jax.jit, XLA).
        shape: the input shape in the framework's layout.
        dtype: the input dtype name.
        impls: name -> zero-argument callable that runs once and blocks until done.
            ``"l2norm"`` is ours; ``"copy"`` is the memory-bandwidth bound; the rest
            are peers.
        memory: optional name -> bytes saved for backward (or peak bytes).
        device: where the inputs live (``"cpu"``, ``"cuda"``).
    """

    framework: str
    mode: str
    compiled: bool
    shape: tuple[int, ...]
    dtype: str
    impls: dict[str, Callable[[], object]]
    memory: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"


@dataclass
class Timing:
    suite: Suite
    seconds: dict[str, float]  # median per implementation
    samples: dict[str, list[float]]

    @property
    def peers(self) -> dict[str, float]:
        return {k: v for k, v in self.seconds.items() if k not in ("l2norm", "copy")}

    def ratios(self) -> dict[str, float]:
        """l2norm / best peer, l2norm / each peer, l2norm / copy bound."""
        ours = self.seconds["l2norm"]
        out = {}
        if self.peers:
            best = min(self.peers, key=self.peers.get)
            out["vs_best_peer"] = ours / self.peers[best]
            out["best_peer"] = best
            for name, value in self.peers.items():
                out[f"vs_{name}"] = ours / value
        if "copy" in self.seconds:
            out["vs_copy"] = ours / self.seconds["copy"]
        return out


def time_suite(suite: Suite, repeats: int = 15, warmup: int = 3, min_time: float = 0.0) -> Timing:
    """Time every implementation A B C, B C A, C A B, ..., warm-up rounds excluded; medians.

    Each sample is one call, or several back to back when one call is shorter than
    ``min_time`` seconds (tiny inputs), divided by the count.
    """
    names = list(suite.impls)
    for _ in range(warmup):
        for name in names:
            suite.impls[name]()
    inner = {}
    for name in names:
        start = time.perf_counter()
        suite.impls[name]()
        once = time.perf_counter() - start
        inner[name] = max(1, int(min_time / once)) if once > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        # Rotate the order each round: whatever an implementation leaves behind (freed
        # memory the allocator hands back to the OS, caches it evicted) is then paid by
        # each of the others in turn rather than always by the same one.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn, count = suite.impls[name], inner[name]
            start = time.perf_counter()
            for _ in range(count):
                fn()
            samples[name].append((time.perf_counter() - start) / count)
    return Timing(suite, {n: statistics.median(s) for n, s in samples.items()}, samples)
