"""``l2norm check``: every installed backend through the conformance cases.

Usage::

    l2norm check                      # every installed backend, every case
    l2norm check --quick              # one case in five
    l2norm check --backends torch,jax # a subset
    l2norm check --backends torch --case "1:mode=add_norm:per_channel:float16:hostile"
    l2norm check --json               # machine-readable
    l2norm check --cross-only         # only the cross-framework section
    l2norm check --cpu-kernel         # also the native CPU kernel of l2norm.torch

After the conformance table, a cross-framework section runs one random float32 input
(with an all-zero pixel and pixels whose squares underflow or overflow) and one scale
through every checked backend and prints their pairwise maximum differences.

Keras chooses its backend once per process, so each ``keras-<backend>`` row runs in a
child process with ``KERAS_BACKEND`` set; the other backends run in this process.
Exit status 1 when any case fails, two backends differ by more than the sum of their
bounds, or a requested backend cannot be loaded.
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
from l2norm._spec import FLOAT_DTYPES, Spec

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
) -> tuple[list[Row], list[tuple[str, bool]], dict]:
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
    if args.cross_only:
        cmd.append("--cross-only")
    env = dict(os.environ, KERAS_BACKEND=keras_backend, **{_CHILD_ENV: "1"})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    try:
        payload = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return (
            [],
            [(f"keras-{keras_backend}: child process failed: " + " | ".join(tail), True)],
            {},
        )
    rows = [Row(**row) for row in payload["rows"]]
    outputs = {
        name: tuple(np.asarray(out[k], np.float32).reshape(CROSS_SHAPE) for k in ("y", "dx"))
        for name, out in payload.get("cross_outputs", {}).items()
    }
    return rows, [tuple(p) for p in payload["problems"]], outputs


# --------------------------------------------------------------------------- cross-framework

CROSS_SHAPE: tuple[int, ...] = (2, 6, 6, 64)
_CROSS_OPTIONS = {"axis": -1}


def cross_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The input, scale and cotangent every backend gets (float32, NHWC, seeded)."""
    rng = np.random.default_rng(20240607)
    x = rng.standard_normal(CROSS_SHAPE)
    x[0, 0, 0] = 0.0  # an all-zero pixel (after a ReLU)
    x[0, 0, 1] *= 1e-30  # squares underflow float32
    x[0, 0, 2] *= 1e25  # squares overflow float32
    x[1, 1, 1] *= 1e-13  # below sqrt(eps) of the *_sumsq modes
    scale = rng.uniform(10.0, 30.0, CROSS_SHAPE[-1])
    g = rng.standard_normal(CROSS_SHAPE)
    return x.astype(np.float32), scale.astype(np.float32), g.astype(np.float32)


def _cross_outputs(
    names: Sequence[str], registered: dict[str, conformance.Backend]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[tuple[str, bool]]]:
    x, scale, g = cross_inputs()
    outputs, problems = {}, []
    for name in names:
        backend = registered[name]
        try:
            y = np.asarray(backend.forward(x, scale, dict(_CROSS_OPTIONS)), np.float32)
            dx, _ = backend.vjp(x, scale, g, dict(_CROSS_OPTIONS))
            outputs[name] = (y, np.asarray(dx, np.float32))
        except Exception as err:  # reported, as a conformance crash is
            problems.append((f"{name}: cross-framework run failed: {err!r}", True))
    return outputs, problems


@dataclass
class Cross:
    """Pairwise maximum differences: forward in float32 ULPs, input gradient in float32
    machine epsilons relative to each slice's term size (the conformance measures)."""

    backends: list[str]
    forward_ulps: list[list[float]]
    grad_eps: list[list[float]]
    exceeded: list[str]

    @property
    def passed(self) -> bool:
        return not self.exceeded


def cross_compare(
    outputs: dict[str, tuple[np.ndarray, np.ndarray]],
    registered: dict[str, conformance.Backend] | None = None,
) -> Cross:
    """Compare every pair; a pair fails when it differs by more than the sum of the two
    backends' float32 bounds (each is within its bound of the reference)."""
    x, scale, g = cross_inputs()
    f32 = np.dtype(np.float32)
    magnitude, _ = conformance.gradient_magnitudes(x, scale, g, Spec.create(**_CROSS_OPTIONS))
    names = list(outputs)
    registered = registered or {}
    fwd = [[0.0] * len(names) for _ in names]
    grad = [[0.0] * len(names) for _ in names]
    exceeded = []
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            (ya, dxa), (yb, dxb) = outputs[a], outputs[b]
            f = max(
                conformance.forward_error(ya, yb, f32, True),
                conformance.forward_error(yb, ya, f32, True),
            )
            d = conformance.gradient_error(dxa, dxb, magnitude, None, None, None, f32, True)
            fwd[i][j] = fwd[j][i] = f
            grad[i][j] = grad[j][i] = d
            bounds = [registered.get(n) for n in (a, b)]
            f_bound = sum(
                bk.forward_ulps["float32"] if bk else conformance.DEFAULT_FORWARD_ULPS["float32"]
                for bk in bounds
            )
            g_bound = sum(
                bk.grad_eps["float32"] if bk else conformance.DEFAULT_GRAD_EPS["float32"]
                for bk in bounds
            )
            if not (f <= f_bound and d <= g_bound):
                exceeded.append(
                    f"{a} vs {b}: {f:.3g} ULP (bound {f_bound:g}), {d:.3g} eps (bound {g_bound:g})"
                )
    return Cross(names, fwd, grad, exceeded)


def _format_cross(cross: Cross) -> str:
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
    parser.add_argument(
        "--cross-only", action="store_true", help="run only the cross-framework section"
    )
    parser.add_argument(
        "--cpu-kernel",
        action="store_true",
        help="build l2norm.torch's native CPU kernel and check it (backend torch-cpu-kernel)",
    )
    args = parser.parse_args(argv)

    wanted = set(args.backends.split(",")) if args.backends else None
    problems = _load_adapters(wanted)
    if args.cpu_kernel and not os.environ.get(_CHILD_ENV):
        try:
            importlib.import_module("l2norm.torch").use_cpu_kernel()
        except Exception as err:  # no torch, no compiler, no ninja: say so and fail
            problems.append((f"torch-cpu-kernel: {type(err).__name__}: {err}", True))
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
    for name in names if not args.cross_only else ():
        # With --case only that case's dtype has a row.
        rows.extend(r for r in _run_backend(registered[name], selected) if r.cases)
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if not args.case:
        outputs, cross_problems = _cross_outputs(names, registered)
        problems.extend(cross_problems)
    for keras_backend in keras_names:
        child_rows, child_problems, child_outputs = _run_keras_child(keras_backend, args)
        rows.extend(child_rows)
        outputs.update(child_outputs)
        problems.extend((m, fatal or wanted is not None) for m, fatal in child_problems)
    cross = cross_compare(outputs, registered) if len(outputs) > 1 and not in_child else None

    failed = (
        (not rows and not args.cross_only)
        or (args.cross_only and not outputs)
        or any(row.failed or not row.cases for row in rows)
        or any(fatal for _, fatal in problems)
        or (cross is not None and not cross.passed)
    )
    if args.json:
        payload = {
            "rows": [row.__dict__ for row in rows],
            "problems": problems,
            "passed": not failed,
        }
        if in_child:
            payload["cross_outputs"] = {
                name: {"y": y.ravel().tolist(), "dx": dx.ravel().tolist()}
                for name, (y, dx) in outputs.items()
            }
        if cross is not None:
            payload["cross"] = {**cross.__dict__, "passed": cross.passed}
        print(json.dumps(payload, indent=1, default=float))
        return 1 if failed else 0
    if not args.case and not args.cross_only:
        print(_format_table(rows))
    if cross is not None:
        print(_format_cross(cross))
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
        print(
            "usage: l2norm check [--backends NAMES] [--quick] [--json] [--case ID] [--cross-only]"
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "check":
        with np.errstate(all="ignore"):
            return check(rest)
    print(f"l2norm: unknown command {command!r}; expected 'check'", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
