"""The package as a user meets it: imports, the conformance suite, the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from l2norm import conformance
from l2norm.core.spec import FLOAT_DTYPES

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax")
#: Hidden in a child process to play a machine where no framework is installed.
HIDDEN = FRAMEWORKS


def test_import_l2norm_imports_no_framework():
    code = (
        "import sys, l2norm, l2norm.conformance, l2norm.cli, l2norm.testing.frameworks\n"
        "from l2norm import conformance\n"
        "conformance.known_backends(), conformance.unavailable('jax')\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "", f"importing l2norm loaded {out.strip()}"


@pytest.mark.parametrize("case", list(conformance.cases()), ids=lambda c: c.id)
def test_reference_passes_every_conformance_case_against_the_exact_oracle(case):
    backend = conformance.get_backend("numpy")
    result = conformance.run_case(backend, case)
    assert result.passed, (
        f"{case.id}: forward {result.forward_ulps} ULP (bound {backend.forward_ulps[case.dtype]}), "
        f"gradient {result.grad_eps} eps (bound {backend.grad_eps[case.dtype]}), "
        f"non-finite mismatches {result.nonfinite}, error {result.error}"
    )


def test_case_ids_round_trip_and_are_unique():
    all_cases = list(conformance.cases())
    ids = [c.id for c in all_cases]
    assert len(set(ids)) == len(ids)
    assert all(conformance.Case.from_id(i) == c for i, c in zip(ids, all_cases, strict=True))
    with pytest.raises(ValueError, match="not a conformance case id"):
        conformance.Case.from_id("9:default:none:float32:random")


def test_hostile_cases_hold_every_hostile_slice():
    x, _, _ = conformance.Case(1, "default", "per_channel", "float32", "hostile").inputs()
    assert (x == 0).all(axis=1).any()
    assert (abs(x) > 1e19).any() and (abs(x) < 1e-38).any()
    assert np.isnan(x).any() and np.isinf(x).any()


def test_a_backend_that_is_wrong_fails_its_cases():
    def off_by_a_little(x, scale, options):
        y = conformance.get_backend("numpy").forward(x, scale, options)
        return (y.astype(np.float64) * (1 + 1e-3)).astype(y.dtype)

    wrong = conformance.Backend("wrong", off_by_a_little, conformance.get_backend("numpy").vjp)
    case = conformance.Case(0, "default", "per_channel", "float32", "random")
    assert not conformance.run_case(wrong, case).passed


def run_cli(*args: str, hide: Sequence[str] = (), setup: str = "") -> subprocess.CompletedProcess:
    """``l2norm check ARGS`` in a child process, with the modules in ``hide`` made
    unimportable (as if not installed) and ``setup`` run first (to register fakes)."""
    code = (
        "import sys\n"
        f"for name in {list(hide)!r}: sys.modules[name] = None\n"
        f"{setup}\n"
        "from l2norm.cli import main\n"
        f"sys.exit(main(['check', *{list(args)!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_cli_prints_the_reference_table_and_json():
    table = run_cli("--backends", "numpy")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "numpy" in table.stdout and "conformance: PASS" in table.stdout
    payload = json.loads(run_cli("--backends", "numpy", "--json").stdout)
    assert payload["passed"] is True and payload["cases"] == "default"
    assert {row["dtype"] for row in payload["rows"]} == set(FLOAT_DTYPES)
    assert sum(row["cases"] for row in payload["rows"]) == len(conformance.DEFAULT_CASE_IDS)
    assert payload["batch_invariance"][0]["passed"] is True
    # RMSNorm (the mean placement) has rows and a cross-framework section of its own.
    rms = [row for row in payload["rows"] if row["op"] == "RMSNorm"]
    assert rms and {row["op"] for row in payload["rows"]} == {"L2Norm", "RMSNorm"}
    assert sum(row["cases"] for row in rms) == sum(
        "mode=add_meansq" in case for case in conformance.DEFAULT_CASE_IDS
    )
    assert "RMSNorm (eps_mode=" in table.stdout


def test_cli_full_runs_the_whole_matrix_and_quick_is_the_default():
    full = json.loads(run_cli("--backends", "numpy", "--full", "--json").stdout)
    assert sum(row["cases"] for row in full["rows"]) == len(list(conformance.cases()))
    quick = json.loads(run_cli("--backends", "numpy", "--quick", "--json").stdout)
    assert quick["cases"] == "default" and quick["passed"]


def test_cli_lists_missing_frameworks_with_their_extra_and_passes():
    result = run_cli(hide=HIDDEN)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert (
        'not installed: torch, torch-ops, torch-triton, torch-cuda (pip install "l2norm[torch]")'
        in out
    )
    assert 'not installed: jax, jax-ops, jax-pallas, nnx, linen (pip install "l2norm[jax]")' in out
    assert 'not installed: keras-tensorflow (pip install "l2norm[tensorflow]")' in out
    assert 'keras-jax (pip install "l2norm[tensorflow,jax]")' in out
    assert "conformance: PASS (1 backends" in out
    payload = json.loads(run_cli("--json", hide=HIDDEN).stdout)
    assert payload["passed"] and 'pip install "l2norm[jax]"' in payload["not_installed"]["jax"]


def test_cli_naming_a_missing_or_unknown_backend_is_an_error():
    missing = run_cli("--backends", "numpy,jax", hide=HIDDEN)
    assert missing.returncode == 2
    assert "backend 'jax': jax is not installed" in missing.stderr
    assert 'pip install "l2norm[jax]"' in missing.stderr
    unknown = run_cli("--backends", "nonesuch")
    assert unknown.returncode == 2
    assert "unknown backend 'nonesuch'; known backends: numpy, torch" in unknown.stderr
    bad_case = run_cli("--backends", "numpy", "--case", "9:default:none:float32:random")
    assert bad_case.returncode == 2 and "not a conformance case id" in bad_case.stderr


def test_cli_help_names_the_command_and_the_backends():
    top = subprocess.run(
        [sys.executable, "-m", "l2norm", "--help"], capture_output=True, text=True, check=True
    )
    assert "commands:" in top.stdout and "check" in top.stdout.split("commands:")[1]
    check = run_cli("--help")
    assert check.returncode == 0
    listed = check.stdout.split("backends (ready here, or why not):")[1]
    for name in conformance.known_backends():
        assert re.search(rf"^  {re.escape(name)} ", listed, re.M), name
    assert re.search(r"^  numpy +ready$", listed, re.M)


def test_cli_empty_backend_list_is_a_usage_error():
    empty = run_cli("--backends", " , ")
    assert empty.returncode == 2 and "--backends names no backend" in empty.stderr
    assert "conformance:" not in empty.stdout


def test_cli_reruns_one_case():
    one = run_cli("--backends", "numpy", "--case", "1:mode=add_norm:per_channel:float16:hostile")
    assert one.returncode == 0 and "result: PASS" in one.stdout


def test_cli_progress_goes_to_stderr_one_line_per_backend():
    result = run_cli("--backends", "numpy", "--json")
    assert re.search(
        r"^\[1/1\] numpy: \d+ cases, batch invariance, cross-framework \.\.\. PASS, [\d.]+ s$",
        result.stderr,
        re.MULTILINE,
    ), result.stderr
    json.loads(result.stdout)  # stdout stays pure JSON


def test_cli_accepts_the_old_cpu_kernel_flag_with_a_note():
    result = run_cli("--backends", "numpy", "--cpu-kernel")
    assert result.returncode == 0 and "--cpu-kernel is deprecated" in result.stderr


BATCHY = """
import numpy as np
from l2norm import conformance
numpy = conformance.get_backend("numpy")
def forward(x, scale, options):  # one ULP off from batch 8 on: the cases are smaller
    y = numpy.forward(x, scale, options)
    return np.nextafter(y, np.inf).astype(y.dtype) if x.shape[0] >= 8 else y
conformance.register(conformance.Backend("batchy", forward, numpy.vjp))
"""


def test_cli_batch_invariance_section_fails_a_batch_dependent_backend():
    result = run_cli("--backends", "numpy,batchy", setup=BATCHY)
    assert result.returncode == 1, result.stdout + result.stderr
    section = result.stdout[result.stdout.index("batch invariance:") :]
    assert re.search(r"^numpy +0 +0 +yes +0 +PASS", section, re.MULTILINE)
    assert re.search(r"^batchy +1 +0 +no +0 +FAIL", section, re.MULTILINE)
    assert "FAILED NCHW batch 8: output 1 ULP" in section
    assert "batch invariance: FAIL" in section and "conformance: FAIL" in result.stdout
    # Its cases pass: only the batch-invariance section fails it.
    assert not re.search(r"^batchy .*FAIL$", result.stdout[: result.stdout.index("batch inv")])


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "jax", "flax", "keras", "tensorflow")),
    reason="needs every framework",
)
def test_cli_cross_framework_section_compares_every_adapter_pairwise():
    names = ["numpy", "torch", "jax", "nnx", "linen", "keras-tensorflow"]
    result = run_cli("--cross-only", "--backends", ",".join(names), "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == 0 and payload["passed"], result.stdout[-2000:] + result.stderr
    for cross in (payload["cross"], payload["cross_rms"]):  # L2Norm, then RMSNorm
        assert sorted(cross["backends"]) == sorted(names) and cross["passed"]
        for i, a in enumerate(cross["backends"]):
            for j, b in enumerate(cross["backends"]):
                fwd, grad = cross["forward_ulps"][i][j], cross["grad_eps"][i][j]
                assert fwd == cross["forward_ulps"][j][i] and grad == cross["grad_eps"][j][i]
                # Each backend rounds faithfully (within 1 ULP of the exact result), so any
                # two are at most 1 ULP apart; gradients within 2 eps of the reference each.
                assert fwd <= 1 and grad <= 4, f"{a} vs {b}: {fwd} ULP, {grad} eps"
                assert i != j or fwd == grad == 0
    assert payload["cross_rms"]["options"]["eps_mode"] == "add_meansq"
    table = run_cli("--cross-only", "--backends", "numpy,torch")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "[1] numpy" in table.stdout and "[2] torch" in table.stdout
    assert "cross-framework, L2Norm: PASS" in table.stdout
    assert "cross-framework, RMSNorm: PASS" in table.stdout


def test_cross_framework_section_fails_a_backend_that_disagrees():
    x, scale, g = conformance.cross_inputs()
    reference = conformance.get_backend("numpy")
    y = reference.forward(x, scale, {"axis": -1})
    dx, _ = reference.vjp(x, scale, g, {"axis": -1})
    off = (y * (1 + 1e-5)).astype(y.dtype)  # ~80 ULP off
    good = conformance.cross_compare({"numpy": (y, dx), "copy": (y.copy(), dx.copy())})
    assert good.passed and good.forward_ulps[0][1] == 0
    bad = conformance.cross_compare({"numpy": (y, dx), "off": (off, dx)})
    assert not bad.passed and "numpy vs off" in bad.exceeded[0]


@pytest.mark.skipif(not importlib.util.find_spec("torch"), reason="needs torch")
def test_cli_checks_both_torch_lowerings_and_they_are_bitwise_batch_invariant():
    result = run_cli("--backends", "torch,torch-ops", "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == 0 and payload["passed"], result.stdout[-2000:] + result.stderr
    assert {row["backend"] for row in payload["rows"]} == {"torch", "torch-ops"}
    for invariance in payload["batch_invariance"]:
        assert invariance["bitwise"] and invariance["tolerance"] == 0, invariance
