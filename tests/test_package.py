"""The package as a user meets it: imports, the conformance suite, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from l2norm import conformance

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax")


def test_import_l2norm_imports_no_framework():
    code = (
        "import sys, l2norm, l2norm.conformance, l2norm.cli\n"
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
    assert __import__("numpy").isnan(x).any() and __import__("numpy").isinf(x).any()


def test_a_backend_that_is_wrong_fails_its_cases():
    import numpy as np

    def off_by_a_little(x, scale, options):
        y = conformance.get_backend("numpy").forward(x, scale, options)
        return (y.astype(np.float64) * (1 + 1e-3)).astype(y.dtype)

    wrong = conformance.Backend("wrong", off_by_a_little, conformance.get_backend("numpy").vjp)
    case = conformance.Case(0, "default", "per_channel", "float32", "random")
    assert not conformance.run_case(wrong, case).passed


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "l2norm", "check", *args], capture_output=True, text=True
    )


def test_cli_prints_the_reference_table_and_json():
    table = run_cli("--backends", "numpy", "--quick")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "numpy" in table.stdout and "PASS" in table.stdout
    payload = json.loads(run_cli("--backends", "numpy", "--quick", "--json").stdout)
    assert payload["passed"] is True
    assert {row["dtype"] for row in payload["rows"]} == {
        "float16",
        "bfloat16",
        "float32",
        "float64",
    }


def test_cli_fails_for_an_unknown_backend_and_reruns_one_case():
    assert run_cli("--backends", "nonesuch").returncode == 1
    one = run_cli("--backends", "numpy", "--case", "1:mode=add_norm:per_channel:float16:hostile")
    assert one.returncode == 0 and "result: PASS" in one.stdout


def test_cli_cross_framework_section_compares_every_adapter_pairwise():
    names = ["numpy", "torch", "jax", "nnx", "linen", "keras-tensorflow"]
    result = run_cli("--cross-only", "--backends", ",".join(names), "--json")
    payload = json.loads(result.stdout)
    assert result.returncode == 0 and payload["passed"], result.stdout[-2000:] + result.stderr
    cross = payload["cross"]
    assert sorted(cross["backends"]) == sorted(names) and cross["passed"]
    for i, a in enumerate(cross["backends"]):
        for j, b in enumerate(cross["backends"]):
            fwd, grad = cross["forward_ulps"][i][j], cross["grad_eps"][i][j]
            assert fwd == cross["forward_ulps"][j][i] and grad == cross["grad_eps"][j][i]
            # Each backend is within 4 ULP / 16 eps of the reference in float32.
            assert fwd <= 8 and grad <= 32, f"{a} vs {b}: {fwd} ULP, {grad} eps"
            assert i != j or fwd == grad == 0
    table = run_cli("--cross-only", "--backends", "numpy,torch")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "[1] numpy" in table.stdout and "[2] torch" in table.stdout
    assert "cross-framework: PASS" in table.stdout


def test_cross_framework_section_fails_a_backend_that_disagrees():
    from l2norm import cli

    x, scale, g = cli.cross_inputs()
    reference = conformance.get_backend("numpy")
    y = reference.forward(x, scale, {"axis": -1})
    dx, _ = reference.vjp(x, scale, g, {"axis": -1})
    off = (y * (1 + 1e-5)).astype(y.dtype)  # ~80 ULP off
    good = cli.cross_compare({"numpy": (y, dx), "copy": (y.copy(), dx.copy())})
    assert good.passed and good.forward_ulps[0][1] == 0
    bad = cli.cross_compare({"numpy": (y, dx), "off": (off, dx)})
    assert not bad.passed and "numpy vs off" in bad.exceeded[0]
