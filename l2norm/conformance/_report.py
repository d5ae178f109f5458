"""Running one backend through every section of ``l2norm check``, and printing the results.

:func:`run_backend` gives a :class:`BackendReport` (JSON-able, so a Keras child process can
hand it to its parent); the ``format_*`` functions print the sections.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from l2norm.conformance._cases import L2_NORM, RMS_NORM, Case, op_of
from l2norm.conformance._cross import (
    CROSS_OPTIONS,
    CROSS_SHAPE,
    RMS_CROSS_OPTIONS,
    Cross,
    cross_outputs,
)
from l2norm.conformance._invariance import InvarianceResult, check_batch_invariance
from l2norm.conformance._measures import run_case
from l2norm.conformance._registry import Backend, get_backend
from l2norm.core.spec import FLOAT_DTYPES


@dataclass
class Row:
    """The summary of one backend on one op (``"L2Norm"`` or ``"RMSNorm"``) and dtype."""

    backend: str
    dtype: str
    op: str = L2_NORM
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

    ``problems`` are ``(message, fatal)``; ``cross`` and ``cross_rms`` are the backend's
    ``(y, dx)`` on the cross-framework input for the L2 op and for RMSNorm, if that section
    ran.
    """

    name: str
    rows: list[Row] = field(default_factory=list)
    invariance: InvarianceResult | None = None
    cross: tuple[np.ndarray, np.ndarray] | None = None
    cross_rms: tuple[np.ndarray, np.ndarray] | None = None
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
            "cross": _outputs_to_json(self.cross),
            "cross_rms": _outputs_to_json(self.cross_rms),
            "problems": [list(p) for p in self.problems],
            "notes": self.notes,
            "seconds": self.seconds,
            "bounds": self.bounds,
        }

    @classmethod
    def from_json(cls, payload: dict) -> BackendReport:
        return cls(
            name=payload["name"],
            rows=[Row(**row) for row in payload["rows"]],
            invariance=None
            if payload.get("invariance") is None
            else InvarianceResult(**payload["invariance"]),
            cross=_outputs_from_json(payload.get("cross")),
            cross_rms=_outputs_from_json(payload.get("cross_rms")),
            problems=[(message, bool(fatal)) for message, fatal in payload["problems"]],
            notes=list(payload.get("notes", [])),
            seconds=float(payload.get("seconds", 0.0)),
            bounds=payload.get("bounds"),
        )


def _outputs_to_json(outputs: tuple[np.ndarray, np.ndarray] | None) -> dict | None:
    return (
        None
        if outputs is None
        else {"y": outputs[0].ravel().tolist(), "dx": outputs[1].ravel().tolist()}
    )


def _outputs_from_json(payload: dict | None) -> tuple[np.ndarray, np.ndarray] | None:
    if payload is None:
        return None
    y, dx = (np.asarray(payload[k], np.float32).reshape(CROSS_SHAPE) for k in ("y", "dx"))
    return y, dx


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
    cross-framework input (the L2 op, then RMSNorm) through it. A failure to build is a
    fatal problem of the report; ``on_case(done, total)`` is called after each case and
    ``on_stage(what)`` before each section (for a progress bar)."""
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
        for attribute, options in (("cross", CROSS_OPTIONS), ("cross_rms", RMS_CROSS_OPTIONS)):
            try:
                setattr(report, attribute, cross_outputs(backend, options))
            except Exception as err:  # reported, as a conformance crash is
                message = f"{name}: cross-framework run ({op_of(options)}) failed: {err!r}"
                report.problems.append((message, True))
    report.seconds = time.perf_counter() - start
    return report


def _run_cases(
    backend: Backend, selected: Sequence[Case], on_case: Callable[[int, int], None] | None
) -> list[Row]:
    rows = {
        (op, dtype): Row(
            backend.name,
            dtype,
            op,
            forward_bound=backend.forward_ulps[dtype],
            grad_bound=backend.grad_eps[dtype],
        )
        for op in (L2_NORM, RMS_NORM)
        for dtype in FLOAT_DTYPES
        if dtype in backend.dtypes
    }
    for done, case in enumerate(selected, 1):
        row = rows.get((case.op, case.dtype))
        if row is not None:
            result = run_case(backend, case)
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
    # With --case only that case's op and dtype have a row.
    return [row for row in rows.values() if row.cases]


# --------------------------------------------------------------------------- formatting


def format_table(rows: Sequence[Row]) -> str:
    """The conformance table: one line per backend, op and dtype, and a line summing up
    RMSNorm (the mean placement) over the backends, where its cases ran."""
    header = (
        f"{'backend':<17}{'op':<9}{'dtype':<10}{'cases':>6}  {'fwd ULP (bound)':<17}"
        f"{'grad eps (bound)':<18}{'non-finite':>10}  result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        fwd = f"{row.forward_ulps:.3g} ({row.forward_bound:g})"
        grad = f"{row.grad_eps:.3g} ({row.grad_bound:g})"
        lines.append(
            f"{row.backend:<17}{row.op:<9}{row.dtype:<10}{row.cases:>6}  {fwd:<17}{grad:<18}"
            f"{row.nonfinite:>10}  {_verdict(row)}"
        )
    rms = [row for row in rows if row.op == RMS_NORM]
    if rms:
        backends = sorted({row.backend for row in rms})
        failing = sorted({row.backend for row in rms if _verdict(row) == "FAIL"})
        lines.append(
            f"{RMS_NORM} (eps_mode='add_meansq', d = sqrt(mean(x**2) + eps)): "
            f"{sum(row.cases for row in rms)} cases on {len(backends)} backends, at most "
            f"{max(row.forward_ulps for row in rms):.3g} ULP forward, "
            f"{max(row.grad_eps for row in rms):.3g} eps gradient: "
            + (f"FAIL on {', '.join(failing)}" if failing else "PASS")
        )
    return "\n".join(lines)


def _verdict(row: Row) -> str:
    return "PASS" if row.failed == 0 and row.cases else "FAIL"


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
    """The cross-framework section of one op: the pairwise difference matrix."""
    names = cross.backends
    label = max(len(n) for n in names) + 6
    op = op_of(cross.options)
    options = ", ".join(f"{k}={v!r}" for k, v in cross.options.items())
    lines = [
        f"cross-framework, {op}: one float32 input {CROSS_SHAPE} ({options}, per-channel "
        "scale, zero / underflowing / overflowing pixels) through every backend",
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
    lines.append(f"cross-framework, {op}: " + ("PASS" if cross.passed else "FAIL"))
    return "\n".join(lines)
