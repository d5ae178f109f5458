"""``l2norm check``: every installed backend through the conformance cases.

Usage::

    l2norm check                      # every installed backend, every case
    l2norm check --quick              # one case in five
    l2norm check --backends torch,jax # a subset
    l2norm check --backends torch --case "1:mode=add_norm:per_channel:float16:hostile"
    l2norm check --json               # machine-readable

Keras chooses its backend once per process, so each ``keras-<backend>`` row runs in a
child process with ``KERAS_BACKEND`` set; the other backends run in this process.
Exit status 1 when any case fails or a requested backend cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from l2norm import conformance
from l2norm._spec import FLOAT_DTYPES

KERAS_BACKENDS: tuple[str, ...] = ("tensorflow", "jax", "torch")
_IN_PROCESS_MODULES = tuple(m for m in conformance.ADAPTER_MODULES if m != "l2norm.keras")
_CHILD_ENV = "L2NORM_CHECK_CHILD"


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


_FRAMEWORKS = {"torch", "keras", "tensorflow", "jax", "jaxlib", "flax"}


def _import_adapter(module: str) -> tuple[str, bool] | None:
    """Import an adapter; on failure return (message, fatal).

    A framework that is not installed is reported but is not a failure (install the
    extra to check it); an adapter that fails any other way is a failure.
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root in _FRAMEWORKS:
            return f"{module}: {root} is not installed", False
        return f"{module}: {type(err).__name__}: {err}", True
    except Exception as err:
        return f"{module}: {type(err).__name__}: {err}", True
    return None


def _load_adapters(wanted: set[str] | None) -> list[tuple[str, bool]]:
    # A Keras child process checks only its Keras backend; the parent checks the rest.
    modules = ["l2norm.keras"] if os.environ.get(_CHILD_ENV) else list(_IN_PROCESS_MODULES)
    return [p for p in map(_import_adapter, modules) if p is not None]


def _run_backend(backend: conformance.Backend, selected: list[conformance.Case]) -> list[Row]:
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
    for case in selected:
        if case.dtype not in rows:
            continue
        result = conformance.run_case(backend, case)
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
    return list(rows.values())


def _run_keras_child(
    keras_backend: str, args: argparse.Namespace
) -> tuple[list[Row], list[tuple[str, bool]]]:
    cmd = [
        sys.executable,
        "-m",
        "l2norm",
        "check",
        "--json",
        "--backends",
        f"keras-{keras_backend}",
    ]
    if args.quick:
        cmd.append("--quick")
    if args.case:
        cmd += ["--case", args.case]
    env = dict(os.environ, KERAS_BACKEND=keras_backend, **{_CHILD_ENV: "1"})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    try:
        payload = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return [], [(f"keras-{keras_backend}: child process failed: " + " | ".join(tail), True)]
    rows = [Row(**row) for row in payload["rows"]]
    return rows, [tuple(p) for p in payload["problems"]]


def _format_table(rows: list[Row]) -> str:
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


def _describe_case(backend: conformance.Backend, case: conformance.Case) -> str:
    result = conformance.run_case(backend, case)
    x, scale, _ = case.inputs()
    lines = [
        f"case {case.id} on {backend.name}",
        f"  options: {case.options}, scale: {case.scale_kind}, shape {x.shape} {x.dtype}",
        f"  forward error: {result.forward_ulps:.4g} ULP"
        f" (bound {backend.forward_ulps[case.dtype]:g})",
        f"  gradient error: {result.grad_eps:.4g} eps (bound {backend.grad_eps[case.dtype]:g})",
        f"  non-finite mismatches: {result.nonfinite}",
        f"  result: {'PASS' if result.passed else 'FAIL'}"
        + (f" ({result.error})" if result.error else ""),
        "  reproduce in Python: from l2norm import conformance; "
        f"x, scale, g = conformance.Case.from_id({case.id!r}).inputs()",
    ]
    return "\n".join(lines)


def check(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="l2norm check", description=__doc__.split("\n")[0])
    parser.add_argument("--backends", help="comma-separated backend names (default: all installed)")
    parser.add_argument("--quick", action="store_true", help="run one case in five")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--case", help="run one case, by the id a failure printed")
    args = parser.parse_args(argv)

    wanted = set(args.backends.split(",")) if args.backends else None
    problems = _load_adapters(wanted)
    if args.case:
        try:
            selected = [conformance.Case.from_id(args.case)]
        except ValueError as err:
            parser.error(str(err))
    else:
        selected = list(conformance.cases(quick=args.quick))

    registered = conformance.backends()
    in_child = bool(os.environ.get(_CHILD_ENV))
    names = sorted(registered) if wanted is None else [n for n in sorted(wanted) if n in registered]
    keras_names = [
        b for b in KERAS_BACKENDS if not in_child and (wanted is None or f"keras-{b}" in wanted)
    ]
    for name in sorted(wanted or ()):
        if name not in registered and (in_child or not name.startswith("keras-")):
            problems.append((f"{name}: not a registered backend", True))
    if args.case and not args.json:
        for name in names:
            print(_describe_case(registered[name], selected[0]))
    rows: list[Row] = []
    for name in names:
        # With --case only that case's dtype has a row.
        rows.extend(r for r in _run_backend(registered[name], selected) if r.cases)
    for keras_backend in keras_names:
        child_rows, child_problems = _run_keras_child(keras_backend, args)
        rows.extend(child_rows)
        problems.extend((m, fatal or wanted is not None) for m, fatal in child_problems)

    failed = (
        not rows
        or any(row.failed or not row.cases for row in rows)
        or any(fatal for _, fatal in problems)
    )
    if args.json:
        payload = {
            "rows": [row.__dict__ for row in rows],
            "problems": problems,
            "passed": not failed,
        }
        print(json.dumps(payload, indent=1, default=float))
        return 1 if failed else 0
    if not args.case:
        print(_format_table(rows))
    for message, fatal in problems:
        print(f"{'ERROR' if fatal else 'not checked'}: {message}")
    for row in rows:
        for case_id in row.failing[:5]:
            print(
                f"FAILED {row.backend} {case_id}  (rerun: l2norm check --backends {row.backend} "
                f"--case '{case_id}')"
            )
        for error in row.errors[:3]:
            print(f"  error: {error}")
    print("conformance: " + ("FAIL" if failed else "PASS"))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: l2norm check [--backends NAMES] [--quick] [--json] [--case ID]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        with np.errstate(all="ignore"):
            return check(rest)
    print(f"l2norm: unknown command {command!r}; expected 'check'", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
