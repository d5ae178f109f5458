"""``l2norm check``: every installed backend through the conformance suite.

Usage::

    l2norm check                      # every installed backend, a representative subset
    l2norm check --full               # the whole case matrix (what CI runs via the tests)
    l2norm check --backends torch,jax # a subset; naming one that is not installed is an error
    l2norm check --backends torch --case "1:mode=add_norm:per_channel:float16:hostile"
    l2norm check --json               # machine-readable
    l2norm check --cross-only         # only the cross-framework section

Three sections: the conformance table (each backend against the reference, per dtype;
by default the fixed subset :data:`l2norm.conformance.DEFAULT_CASE_IDS`, which meets
every dtype, eps placement, layout and scale kind on hostile and random data), batch
invariance (a sample's result must not depend on its batch), and the cross-framework
comparison (one float32 input through every backend, pairwise differences), once for the
L2 op and once for RMSNorm. RMSNorm is the L2 op with the mean placement
(``eps_mode="add_meansq"``): its cases have rows of their own in the table (op ``RMSNorm``)
and a summary line under it.

Backends whose framework is not installed are listed with the extra that installs them;
they are not a failure unless named with ``--backends``. Keras picks its backend once per
process, so each ``keras-<backend>`` row runs in a child process with ``KERAS_BACKEND``
set, alongside the rows of this process. JAX programs are cached on disk between runs
(``~/.cache/l2norm/jax``, unless ``JAX_COMPILATION_CACHE_DIR`` says otherwise), as PyTorch
caches the native CPU kernel: the first run builds and compiles (about three minutes on
two cores), later ones reuse. A progress line per backend goes to stderr. ``--quick``
(once one case in five) is kept and now means the default subset; ``--cpu-kernel`` is
accepted with a deprecation note (the torch row runs the kernel by default, ``torch-ops``
the pure-torch lowering).

Exit status: 0 when every checked backend passes, 1 when a case, the batch invariance or
the cross-framework comparison fails or an installed backend is broken, 2 for a usage
error (an unknown backend, one that is not installed, a malformed case id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from l2norm import conformance
from l2norm.conformance._report import (
    BackendReport,
    format_cross,
    format_invariance,
    format_table,
    run_backend,
)
from l2norm.conformance._runner import ChildRuns, Progress, use_jax_compilation_cache
from l2norm.testing.frameworks import triton_interpreter_without_gpu

# Kept importable from here for older callers; they live in l2norm.conformance now.
cross_inputs = conformance.cross_inputs
cross_compare = conformance.cross_compare
CROSS_SHAPE = conformance.CROSS_SHAPE

CHILD_ENV = "L2NORM_CHECK_CHILD"


def _backend_help() -> str:
    """The ``--backends`` help: every known backend, those installed here marked."""
    lines = []
    for name in conformance.known_backends():
        problem = conformance.unavailable(name)
        why = "ready" if problem is None else str(problem).removeprefix(f"backend {name!r}: ")
        lines.append(f"  {name:<17} {why}")
    return "backends (ready here, or why not):\n" + "\n".join(lines)


class _CheckParser(argparse.ArgumentParser):
    """Lists the backends only when the help is shown: finding out which are ready imports
    their frameworks (torch, Triton: about a second), which a run need not pay."""

    def format_help(self) -> str:
        self.epilog = _backend_help()
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    parser = _CheckParser(
        prog="l2norm check",
        description=(
            "Run every installed backend through the conformance suite: each backend "
            "against the reference (forward ULPs, gradient eps), batch invariance and "
            "the cross-framework comparison. Exit status 0 when all pass, 1 on a "
            "failure, 2 on a usage error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backends",
        metavar="NAMES",
        help="comma-separated backend names, listed below (default: all installed)",
    )
    parser.add_argument(
        "--full", action="store_true", help="run every case (default: a representative subset)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the representative subset: now the default"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--case", metavar="ID", help="run one case, by the id a failure printed")
    parser.add_argument(
        "--cross-only", action="store_true", help="run only the cross-framework section"
    )
    parser.add_argument("--cpu-kernel", action="store_true", help=argparse.SUPPRESS)
    return parser


def _select_backends(
    parser: argparse.ArgumentParser, requested: str | None
) -> tuple[list[str], dict[str, conformance.BackendUnavailable]]:
    """The backends to check, and the known ones left out with why (default run only).

    A named backend that is unknown or cannot run here is a usage error."""
    known = conformance.known_backends()
    if requested is None:
        names, missing = [], {}
        for name in known:
            problem = conformance.unavailable(name)
            if problem is None:
                names.append(name)
            else:
                missing[name] = problem
        return names, missing
    names = list(dict.fromkeys(n.strip() for n in requested.split(",") if n.strip()))
    if not names:
        parser.error(f"--backends names no backend; known backends: {', '.join(known)}")
    for name in names:
        if name not in known:
            parser.error(f"unknown backend {name!r}; known backends: {', '.join(known)}")
        problem = conformance.unavailable(name)
        if problem is not None:
            parser.error(str(problem))
    return names, {}


def _missing_lines(missing: dict[str, conformance.BackendUnavailable]) -> list[str]:
    """``not installed: jax, nnx, linen (pip install "l2norm[jax]")``, one line per hint."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    for name, problem in missing.items():
        kind = "not installed" if problem.install else "not available"
        hint = problem.install or problem.reason
        groups.setdefault((kind, hint), []).append(name)
    return [f"{kind}: {', '.join(names)} ({hint})" for (kind, hint), names in groups.items()]


def check(argv: Sequence[str]) -> int:
    """``l2norm check``; returns the exit status."""
    # Before any backend loads triton (and before the help lists what is ready): without a
    # GPU the torch-triton row runs the Triton kernels in Triton's interpreter, which must
    # be on when triton is first imported.
    triton_interpreter_without_gpu()
    parser = _parser()
    args = parser.parse_args(argv)
    in_child = bool(os.environ.get(CHILD_ENV))
    if args.cpu_kernel and not in_child:
        print(
            "l2norm check: --cpu-kernel is deprecated and does nothing: the torch row now runs "
            "the native CPU kernel by default (torch-ops runs the pure-torch lowering)",
            file=sys.stderr,
        )
    if args.case:
        try:
            selected = [conformance.Case.from_id(args.case)]
        except ValueError as err:
            parser.error(str(err))
    else:
        selected = list(conformance.cases()) if args.full else conformance.default_cases()
    use_jax_compilation_cache()
    names, missing = _select_backends(parser, args.backends)
    start = time.perf_counter()

    # Backends that need their own environment (Keras) run in children, the rest here.
    children = [n for n in names if not in_child and _needs_child(n)]
    progress = Progress(len(names), enabled=not in_child)
    runs = ChildRuns(children, _child_args(args), CHILD_ENV, progress)
    reports: dict[str, BackendReport] = {}
    for name in names:
        if name in children:
            continue
        runs.poll()
        progress.start(name, 0 if args.cross_only else len(selected))
        report = run_backend(
            name,
            [] if args.cross_only else selected,
            invariance=not (args.case or args.cross_only),
            cross=not args.case,
            on_case=lambda done, total, n=name: (progress.step(n, done, total), runs.poll()),
            on_stage=lambda what, n=name: (progress.stage(n, what), runs.poll()),
        )
        progress.finish(report)
        reports[name] = report
    reports.update(runs.wait())
    reports = {name: reports[name] for name in names if name in reports}  # check order
    elapsed = time.perf_counter() - start

    if args.case and not args.json:
        for report in reports.values():
            if report.rows:
                print(_describe_case(report, selected[0]))
    return _finish(args, reports, missing, in_child, elapsed)


def _needs_child(name: str) -> bool:
    entry = conformance.lazy_entry(name)
    return entry is not None and bool(entry.env)


def _child_args(args: argparse.Namespace) -> list[str]:
    extra = ["--full"] if args.full else []
    if args.case:
        extra += ["--case", args.case]
    if args.cross_only:
        extra.append("--cross-only")
    return extra


def _finish(
    args: argparse.Namespace,
    reports: dict[str, BackendReport],
    missing: dict[str, conformance.BackendUnavailable],
    in_child: bool,
    elapsed: float,
) -> int:
    if args.case:
        for report in reports.values():
            note = f"case {args.case} not run: the backend lacks its dtype"
            if not report.rows and not report.problems and note not in report.notes:
                report.notes.append(note)
    rows = [row for report in reports.values() for row in report.rows]
    problems = [p for report in reports.values() for p in report.problems]
    invariance = [r.invariance for r in reports.values() if r.invariance is not None]
    bounds = {name: SimpleNamespace(**r.bounds) for name, r in reports.items() if r.bounds}
    crosses = {}  # per op: the backends' outputs on the cross-framework input, compared
    for attribute, options in (
        ("cross", conformance.CROSS_OPTIONS),
        ("cross_rms", conformance.RMS_CROSS_OPTIONS),
    ):
        outputs = {n: getattr(r, attribute) for n, r in reports.items()}
        outputs = {n: out for n, out in outputs.items() if out is not None}
        if len(outputs) > 1 and not in_child:
            crosses[attribute] = conformance.cross_compare(outputs, bounds, options)
    failed = (
        not reports
        or any(not report.passed for report in reports.values())
        or (args.cross_only and not any(r.cross is not None for r in reports.values()))
        or any(not cross.passed for cross in crosses.values())
    )
    if args.json:
        payload = {
            "passed": not failed,
            "seconds": round(elapsed, 3),
            "cases": "case" if args.case else "full" if args.full else "default",
            "rows": [row.__dict__ for row in rows],
            "batch_invariance": [{**r.__dict__, "passed": r.passed} for r in invariance],
            "problems": problems,
            "not_installed": {name: str(p) for name, p in missing.items()},
        }
        for attribute, cross in crosses.items():
            payload[attribute] = {**cross.__dict__, "passed": cross.passed}
        if in_child:
            payload["reports"] = [r.to_json() for r in reports.values()]
        print(json.dumps(payload, indent=1, default=float))
        return 1 if failed else 0
    if not args.case and not args.cross_only:
        subset = (
            f"all {len(list(conformance.cases()))} cases"
            if args.full
            else f"{len(conformance.DEFAULT_CASE_IDS)} representative cases per backend "
            "(every dtype, eps placement, layout and scale kind; hostile and random data); "
            "--full runs all of them"
        )
        print(f"conformance against the reference: {subset}")
        print(format_table(rows))
        print()
        print(format_invariance(invariance))
        print()
    if crosses:
        print("\n\n".join(format_cross(cross) for cross in crosses.values()))
        agree = all(cross.passed for cross in crosses.values())
        print("cross-framework: " + ("PASS" if agree else "FAIL"))
    for report in reports.values():
        for note in report.notes:
            print(f"note: {report.name}: {note}")
    for line in _missing_lines(missing):
        print(line)
    for message, fatal in problems:
        print(f"{'ERROR' if fatal else 'note'}: {message}")
    for row in rows:
        for case_id in row.failing[:5]:
            print(
                f"FAILED {row.backend} {case_id}  (rerun: l2norm check --backends {row.backend} "
                f"--case '{case_id}')"
            )
        for error in row.errors[:3]:
            print(f"  error: {error}")
    print(f"conformance: {'FAIL' if failed else 'PASS'} ({len(reports)} backends, {elapsed:.1f} s)")
    return 1 if failed else 0


def _describe_case(report: BackendReport, case: conformance.Case) -> str:
    """One case on one backend, from its report (the case ran in this process or a child)."""
    x, _, _ = case.inputs()
    lines = [
        f"case {case.id} on {report.name}",
        f"  options: {case.options}, scale: {case.scale_kind}, shape {x.shape} {x.dtype}",
    ]
    for row in report.rows:
        lines += [
            f"  forward error: {row.forward_ulps:.4g} ULP (bound {row.forward_bound:g})",
            f"  gradient error: {row.grad_eps:.4g} eps (bound {row.grad_bound:g})",
            f"  non-finite mismatches: {row.nonfinite}",
            f"  result: {'PASS' if not row.failed else 'FAIL'}"
            + "".join(f" ({e.split(': ', 1)[1]})" for e in row.errors),
        ]
    lines.append(
        "  reproduce in Python: from l2norm import conformance; "
        f"x, scale, g = conformance.Case.from_id({case.id!r}).inputs()"
    )
    return "\n".join(lines)


_USAGE = """usage: l2norm COMMAND [OPTIONS]

l2norm: one L2Normalization layer (y = scale * x / ||x|| along the channel axis) for
NumPy, PyTorch, Keras 3 and Flax, with identical maths everywhere.

commands:
  check    run every installed backend through the conformance suite
           (l2norm check --help lists its options and the backends)

examples:
  l2norm check                       # a representative subset on every installed backend
  l2norm check --full                # every case
  l2norm check --backends torch,jax  # two backends
"""


def main(argv: Sequence[str] | None = None) -> int:
    """The ``l2norm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        with np.errstate(all="ignore"):
            return check(rest)
    print(f"l2norm: unknown command {command!r}; expected 'check' (l2norm --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
