"""Running one backend through every section of ``l2norm check``, and printing the results.

:func:`run_backend` gives a :class:`BackendReport` (JSON-able, so a Keras child process can
hand it to its parent); the ``format_*`` functions print the sections.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from l2norm._spec import FLOAT_DTYPES
from l2norm.conformance._cases import Case
from l2norm.conformance._cross import CROSS_SHAPE, Cross, cross_outputs
from l2norm.conformance._invariance import InvarianceResult, check_batch_invariance
from l2norm.conformance._measures import run_case
from l2norm.conformance._registry import Backend, get_backend


@dataclass
class Row:
    """The summary of one backend on one dtype."""

    backend: str
    dtype: str
    cases: int = 0
    failed: int = 0
    forward_ulps: float = 0.0
    grad_eps: float = 0.0
    nonfinite: int = 0
    forward_bound: float = 0.0
    grad_bound: float = 0.0
    failing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class BackendReport:
    """Everything ``l2norm check`` learned about one backend.

    ``problems`` are ``(message, fatal)``; ``cross`` is the backend's ``(y, dx)`` on the
    cross-framework input, if that section ran.
    """

    name: str
    rows: list[Row] = field(default_factory=list)
    invariance: InvarianceResult | None = None
    cross: tuple[np.ndarray, np.ndarray] | None = None
    problems: list[tuple[str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bounds: dict | None = None  # the backend's forward_ulps and grad_eps, for cross_compare
    backend: Backend | None = None  # in this process only; not sent by a child

    @property
    def passed(self) -> bool:
        return (
            not any(fatal for _, fatal in self.problems)
            and all(row.failed == 0 and row.cases for row in self.rows)
            and (self.invariance is None or self.invariance.passed)
        )

    def to_json(self) -> dict:
        """A JSON-able dict (:meth:`from_json` reads it back)."""
        return {
            "name": self.name,
            "rows": [asdict(row) for row in self.rows],
            "invariance": None if self.invariance is None else asdict(self.invariance),
            "cross": None
            if self.cross is None
            else {"y": self.cross[0].ravel().tolist(), "dx": self.cross[1].ravel().tolist()},
            "problems": [list(p) for p in self.problems],
            "notes": self.notes,
            "seconds": self.seconds,
            "bounds": self.bounds,
        }

    @classmethod
    def from_json(cls, payload: dict) -> BackendReport:
        cross = payload.get("cross")
        return cls(
            name=payload["name"],
            rows=[Row(**row) for row in payload["rows"]],
            invariance=None
            if payload.get("invariance") is None
            else InvarianceResult(**payload["invariance"]),
            cross=None
            if cross is None
            else tuple(np.asarray(cross[k], np.float32).reshape(CROSS_SHAPE) for k in ("y", "dx")),
            problems=[(message, bool(fatal)) for message, fatal in payload["problems"]],
            notes=list(payload.get("notes", [])),
            seconds=float(payload.get("seconds", 0.0)),
            bounds=payload.get("bounds"),
        )


def run_backend(
    name: str,
    selected: Sequence[Case],
    *,
    invariance: bool = True,
    cross: bool = True,
    on_case: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> BackendReport:
    """Build backend ``name`` and run the cases, the batch-invariance check and the
    cross-framework input through it. A failure to build is a fatal problem of the report;
    ``on_case(done, total)`` is called after each case and ``on_stage(what)`` before each
    section (for a progress bar)."""
    stage = on_stage or (lambda what: None)
    start = time.perf_counter()
    report = BackendReport(name)
    try:
        stage("loading")
        backend = get_backend(name)
    except Exception as err:  # installed but broken: a failure, with its message
        report.problems.append((f"{name}: {type(err).__name__}: {err}", True))
        report.seconds = time.perf_counter() - start
        return report
    report.backend = backend
    report.bounds = {"forward_ulps": backend.forward_ulps, "grad_eps": backend.grad_eps}
    report.notes.extend(backend.notes)
    report.rows = _run_cases(backend, selected, on_case)
    if invariance:
        stage("batch invariance")
        report.invariance = check_batch_invariance(backend)
    if cross:
        stage("cross-framework")
        try:
            report.cross = cross_outputs(backend)
        except Exception as err:  # reported, as a conformance crash is
            report.problems.append((f"{name}: cross-framework run failed: {err!r}", True))
    report.seconds = time.perf_counter() - start
    return report


def _run_cases(
    backend: Backend, selected: Sequence[Case], on_case: Callable[[int, int], None] | None
) -> list[Row]:
    rows = {
        dtype: Row(
            backend.name,
            dtype,
            forward_bound=backend.forward_ulps[dtype],
            grad_bound=backend.grad_eps[dtype],
        )
        for dtype in FLOAT_DTYPES
        if dtype in backend.dtypes
    }
    for done, case in enumerate(selected, 1):
        if case.dtype in rows:
            result = run_case(backend, case)
            row = rows[case.dtype]
            row.cases += 1
            row.forward_ulps = max(row.forward_ulps, result.forward_ulps)
            row.grad_eps = max(row.grad_eps, result.grad_eps)
            row.nonfinite += result.nonfinite
            if not result.passed:
                row.failed += 1
                row.failing.append(case.id)
                if result.error:
                    row.errors.append(f"{case.id}: {result.error}")
        if on_case is not None:
            on_case(done, len(selected))
    # With --case only that case's dtype has a row.
    return [row for row in rows.values() if row.cases]


# --------------------------------------------------------------------------- formatting


def format_table(rows: Sequence[Row]) -> str:
    """The conformance table: one line per backend and dtype."""
    header = (
        f"{'backend':<17}{'dtype':<10}{'cases':>6}  {'fwd ULP (bound)':<17}"
        f"{'grad eps (bound)':<18}{'non-finite':>10}  result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        fwd = f"{row.forward_ulps:.3g} ({row.forward_bound:g})"
        grad = f"{row.grad_eps:.3g} ({row.grad_bound:g})"
        verdict = "PASS" if row.failed == 0 and row.cases else "FAIL"
        lines.append(
            f"{row.backend:<17}{row.dtype:<10}{row.cases:>6}  {fwd:<17}{grad:<18}"
            f"{row.nonfinite:>10}  {verdict}"
        )
    return "\n".join(lines)


def format_invariance(results: Sequence[InvarianceResult]) -> str:
    """The batch-invariance section: one line per backend."""
    lines = [
        "batch invariance: sample 0 of float32 NCHW (16, 32, 5, 5) / NHWC (16, 5, 5, 32) alone "
        "vs in batches of 3, 8, 16,",
        "next to random samples and to samples with zero / 1e25 / 1e-25 pixels",
        f"{'backend':<17}{'output ULP':>11}{'grad eps':>10}  {'bitwise':<9}"
        f"{'tolerance':>9}  result",
    ]
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(
            f"{r.backend:<17}{r.forward_ulps:>11g}{r.grad_eps:>10.3g}  "
            f"{'yes' if r.bitwise else 'no':<9}{r.tolerance:>9g}  {verdict}"
            + (f"  ({r.note})" if r.note and not r.bitwise else "")
        )
        lines.extend(f"  FAILED {failure}" for failure in r.failures[:4])
        if r.error:
            lines.append(f"  error: {r.error}")
    lines.append("batch invariance: " + ("PASS" if all(r.passed for r in results) else "FAIL"))
    return "\n".join(lines)


def format_cross(cross: Cross) -> str:
    """The cross-framework section: the pairwise difference matrix."""
    names = cross.backends
    label = max(len(n) for n in names) + 6
    lines = [
        f"cross-framework: one float32 input {CROSS_SHAPE} (axis=-1, per-channel scale, "
        "zero / underflowing / overflowing pixels) through every backend",
        "pairwise max difference: forward ULP / input-gradient eps",
        " " * label + "".join(f"{f'[{j + 1}]':>11}" for j in range(len(names))),
    ]
    for i, a in enumerate(names):
        cells = [
            "-" if i == j else f"{cross.forward_ulps[i][j]:.2g} / {cross.grad_eps[i][j]:.2g}"
            for j in range(len(names))
        ]
        lines.append(f"{f'[{i + 1}] {a}':<{label}}" + "".join(f"{c:>11}" for c in cells))
    for message in cross.exceeded:
        lines.append(f"EXCEEDED {message}")
    lines.append("cross-framework: " + ("PASS" if cross.passed else "FAIL"))
    return "\n".join(lines)
