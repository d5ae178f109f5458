"""One conformance case on one backend, with the message a failure prints: shared by the
files that hold a framework's conformance rows (a file per group of rows, so that the
suite's two workers, which take a file at a time, share the load)."""

from __future__ import annotations

from collections.abc import Callable

from l2norm import conformance


def check_case(backend: str, case: conformance.Case) -> None:
    """Run ``case`` on ``backend`` and assert it passes its bounds."""
    result = conformance.run_case(conformance.get_backend(backend), case)
    assert result.passed, (
        f"{backend} {case.id}: forward {result.forward_ulps:.3g} ULP, gradient "
        f"{result.grad_eps:.3g} eps, {result.nonfinite} non-finite mismatches, "
        f"error={result.error}"
    )


def pairwise_cases(cases: list[conformance.Case]) -> list[conformance.Case]:
    """A subset of ``cases`` that meets every pair of values of any two of a case's
    dimensions (layout, option set, scale kind, dtype, data) that some case meets: greedily,
    the case adding most pairs (the first in order among equals). For a backend too slow
    for the whole matrix on this machine (an interpreter); a device runs all of it."""

    def pairs(case: conformance.Case) -> set[tuple]:
        dims = [
            ("layout", case.layout),
            ("options", case.option_set),
            ("scale", case.scale_kind),
            ("dtype", case.dtype),
            ("data", case.data),
        ]
        return {(a, b) for i, a in enumerate(dims) for b in dims[i + 1 :]}

    return greedy_cover(cases, pairs)


def greedy_cover(
    cases: list[conformance.Case], features: Callable[[conformance.Case], set]
) -> list[conformance.Case]:
    """Cases of ``cases`` that together meet every feature any of them has: greedily, the
    case adding most (the first in order among equals)."""
    wanted = set().union(*map(features, cases))
    chosen: list[conformance.Case] = []
    while wanted:
        best = max(cases, key=lambda c: len(features(c) & wanted))
        wanted -= features(best)
        chosen.append(best)
    return chosen
