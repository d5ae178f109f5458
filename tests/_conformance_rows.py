"""One conformance case on one backend, with the message a failure prints: shared by the
files that hold a framework's conformance rows (a file per group of rows, so that the
suite's two workers, which take a file at a time, share the load)."""

from __future__ import annotations

from l2norm import conformance


def check_case(backend: str, case: conformance.Case) -> None:
    """Run ``case`` on ``backend`` and assert it passes its bounds."""
    result = conformance.run_case(conformance.get_backend(backend), case)
    assert result.passed, (
        f"{backend} {case.id}: forward {result.forward_ulps:.3g} ULP, gradient "
        f"{result.grad_eps:.3g} eps, {result.nonfinite} non-finite mismatches, "
        f"error={result.error}"
    )
