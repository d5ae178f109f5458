"""Smoke tests of the benchmark suite (tiny sizes), so it never rots. No timing asserts."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import run
from benchmarks.harness import Suite, time_suite


def test_harness_times_every_implementation_and_forms_ratios():
    calls = {"l2norm": 0, "peer": 0, "copy": 0}

    def counter(name):
        def fn():
            calls[name] += 1

        return fn

    suite = Suite("numpy", "forward", False, (1,), "float32", {k: counter(k) for k in calls})
    timing = time_suite(suite, repeats=3, warmup=1)
    assert all(count >= 4 for count in calls.values())
    assert set(timing.ratios()) == {"vs_best_peer", "best_peer", "vs_peer", "vs_copy"}


def test_run_writes_json_markdown_and_plots(tmp_path):
    code = run.main(
        [
            "--quick",
            "--frameworks",
            "numpy,torch,jax",
            "--sizes",
            "1,8,4,4;2,8,4,4",
            "--dtypes",
            "float32",
            "--output",
            str(tmp_path),
        ]
    )
    assert code == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    frameworks = {row["framework"] for row in payload["rows"]}
    assert frameworks == {"numpy", "torch", "jax"}
    for row in payload["rows"]:
        assert "l2norm" in row["median_s"] and row["median_s"]["l2norm"] > 0
        if row["mode"] in ("forward", "forward+backward"):
            assert "vs_copy" in row["ratios"] and "vs_best_peer" in row["ratios"]
    table = (tmp_path / "results.md").read_text()
    assert "| numpy |" in table and "l2norm GB/s" in table
    # The achieved bandwidth is the compulsory traffic over the time: 2 tensor passes
    # forward, 5 forward and backward (also for rows named after a lowering).
    row = next(r for r in payload["rows"] if r["mode"].startswith("forward+backward"))
    numel = math.prod(row["shape"])
    assert run.achieved_gbps(row) == pytest.approx(numel * 4 * 5 / row["median_s"]["l2norm"] / 1e9)
    for framework in frameworks:
        assert (tmp_path / f"time_vs_size_{framework}.png").stat().st_size > 0


@pytest.mark.keras
def test_keras_suites_run_on_this_backend():
    from benchmarks import bench_keras

    suites = bench_keras.suites((1, 8, 4, 4), "float32", quick=True)
    assert {s.mode for s in suites} == {"forward", "forward+backward"}
    for suite in suites:
        assert {"l2norm", "copy"} <= set(suite.impls)
        timing = time_suite(suite, repeats=1, warmup=1)
        assert timing.ratios()["vs_best_peer"] > 0


def test_kernel_bench_times_the_kernel_and_the_copy(capsys):
    from benchmarks import bench_kernel

    table = bench_kernel.main(["--shape", "1,8,4,4", "--repeats", "2"])
    assert [row["dtype"] for row in table] == ["float32", "bfloat16", "float16"]
    for row in table:
        assert all(row[k] > 0 for k in ("copy", "forward", "backward"))
    out = capsys.readouterr().out
    assert "vector extensions:" in out and "| float16 |" in out


#: The peers each RMSNorm framework is timed against (eager suites of a tiny shape).
RMS_PEERS = {
    "rmsnorm-torch": {"F.rms_norm"},
    "rmsnorm-jax": {"nnx.RMSNorm"},
    "rmsnorm-keras": {"keras.layers.RMSNormalization"},
}


def assert_rms_suites_form_ratios(framework: str, peers: set[str]) -> None:
    """The RMSNorm suites of ``framework`` at a tiny (batch, tokens, channels) shape time
    ours, its peers and the copy, forward and forward+backward, and form the ratios."""
    from benchmarks import bench_rmsnorm

    suites = bench_rmsnorm.suites((2, 3, 8), "bfloat16", quick=True, framework=framework)
    assert {s.mode for s in suites} == {"forward", "forward+backward"}
    for suite in suites:
        assert set(suite.impls) == {"l2norm", "copy", *peers}
        ratios = time_suite(suite, repeats=1, warmup=1).ratios()
        assert ratios["vs_best_peer"] > 0 and ratios["vs_copy"] > 0


@pytest.mark.parametrize("framework", ["rmsnorm-torch", "rmsnorm-jax"])
def test_rms_norm_suites_time_ours_against_the_peers(framework):
    assert_rms_suites_form_ratios(framework, RMS_PEERS[framework])


@pytest.mark.keras
def test_rms_norm_keras_suites_run_on_this_backend():
    import keras

    framework = f"rmsnorm-keras-{keras.backend.backend()}"
    assert_rms_suites_form_ratios(framework, RMS_PEERS["rmsnorm-keras"])


def test_run_takes_the_rms_norm_frameworks_by_name_only():
    assert not set(run.RMS_FRAMEWORKS) & set(run.FRAMEWORKS)  # (batch, tokens, C) sizes
    assert run.keras_backend("rmsnorm-keras-jax") == run.keras_backend("keras-jax") == "jax"
    assert run.keras_backend("rmsnorm-torch") is None


def test_results_headline_is_generated_from_the_checked_in_run():
    """RESULTS.md's headline table is exactly what the checked-in run renders (the docs
    build draws the plots from the same file), and that run is a whole headline run."""
    results = json.loads(run.RECORD.read_text())
    page = run.RESULTS_MD.read_text()
    assert run.render(results, page) == page, "run `python benchmarks/run.py --render`"
    headline = [r for r in results["rows"] if tuple(r["shape_nchw"]) == run.HEADLINE]
    assert {r["framework"] for r in headline} == set(run.FRAMEWORKS)
    assert {r["dtype"] for r in headline} == set(run.RECORD_DTYPES)
    assert results["machine"]["vector_extensions"] not in ("", "unknown")
    for row in headline:
        ratio = row["ratios"]["vs_best_peer"]
        assert ratio == row["median_s"]["l2norm"] / row["median_s"][row["ratios"]["best_peer"]]


def test_render_replaces_only_the_generated_block():
    row = {
        "framework": "jax",
        "mode": "forward",
        "compiled": True,
        "shape_nchw": list(run.HEADLINE),
        "dtype": "float32",
        "ratios": {"vs_best_peer": 0.5, "best_peer": "naive", "vs_copy": 1.25},
    }
    page = f"before\n{run.BEGIN}\nstale\n{run.END}\nafter\n"
    out = run.render({"machine": {}, "command": "c", "rows": [row]}, page)
    assert out.startswith(f"before\n{run.BEGIN}\n") and out.endswith(f"{run.END}\nafter\n")
    assert "stale" not in out and "| jax | jit forward | 0.50 / 1.2 |" in out
    with pytest.raises(ValueError, match="no block"):
        run.render({"machine": {}, "rows": []}, "no markers")
