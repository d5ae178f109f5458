"""The benchmark suite: every backend against the peer idioms and the copy bound.

Usage::

    python benchmarks/run.py                  # the full run (sizes tiny to large)
    python benchmarks/run.py --quick          # about a minute
    python benchmarks/run.py --output DIR     # where results.json, results.md, *.png go
    python benchmarks/run.py --frameworks torch,jax
    python benchmarks/run.py --device cuda    # torch and jax on the GPU
    python benchmarks/run.py --frameworks rmsnorm-torch --sizes 8,512,768  # RMSNorm
    python benchmarks/run.py --record         # the headline run, checked in (below)
    python benchmarks/run.py --render         # RESULTS.md's headline from the record

``--record`` runs every CPU framework at :data:`RECORD_SIZES` in float32, bfloat16 and
float16 and writes :data:`RECORD` (``benchmarks/headline.json``, checked in). Everything the
docs show of it is generated from that one file: the headline table of
``benchmarks/RESULTS.md`` (between :data:`BEGIN` and :data:`END`, rewritten by ``--record``
and ``--render``, compared by ``tests/test_benchmarks.py``) and the plots (drawn by the
docs build from the file), so no figure can go stale against the table.

Each framework module ``benchmarks/bench_<name>.py`` exposes
``suites(shape, dtype, quick, device) -> list[Suite]`` for an NCHW ``shape`` (it
converts to its own layout); the RMSNorm frameworks (``rmsnorm-*``,
``benchmarks/bench_rmsnorm.py``) take ``(batch, tokens, channels)`` sizes instead and run
only when named. Every suite is timed interleaved (A B A B ...), warm-up excluded,
median of repeats (``benchmarks/harness.py``). Every framework (and every Keras backend)
runs in a child process of its own: Keras picks its backend once per process, and one
framework's thread pools, still spinning after its last op, would take cores from the
next one's timings.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `l2norm` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Timing, time_suite  # noqa: E402

FRAMEWORKS = ("numpy", "torch", "jax", "keras-tensorflow", "keras-jax", "keras-torch")
#: NCHW sizes from per-call overhead to bandwidth-bound; conv4_3 is the headline.
SIZES = ((1, 64, 8, 8), (2, 256, 19, 19), (8, 512, 38, 38), (32, 512, 75, 75))
QUICK_SIZES = ((1, 64, 8, 8), (8, 512, 38, 38))
HEADLINE = (8, 512, 38, 38)
DTYPES = ("float32", "bfloat16")
#: The checked-in headline run (``--record``) and the page its table lives in.
RECORD = ROOT / "benchmarks" / "headline.json"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RECORD_SIZES = ((1, 64, 8, 8), (2, 256, 19, 19), HEADLINE)
RECORD_DTYPES = ("float32", "bfloat16", "float16")
BEGIN = "<!-- headline: generated from benchmarks/headline.json by benchmarks/run.py -->"
END = "<!-- end of headline -->"
#: The frameworks each device can run (NumPy has no GPU; the Keras rows run on CPU).
DEVICE_FRAMEWORKS = {"cpu": FRAMEWORKS, "cuda": ("torch", "jax")}
#: Run only when named: RMSNorm at (batch, tokens, channels) sizes (bench_rmsnorm.py).
RMS_FRAMEWORKS = (
    "rmsnorm-torch",
    "rmsnorm-jax",
    "rmsnorm-keras-tensorflow",
    "rmsnorm-keras-jax",
    "rmsnorm-keras-torch",
)
NAMED_FRAMEWORKS = {"cpu": RMS_FRAMEWORKS, "cuda": ()}


def _suites_for(framework: str):
    """The ``suites(shape, dtype, quick, device)`` function of ``framework``."""
    if framework.startswith("rmsnorm-"):
        module = importlib.import_module("benchmarks.bench_rmsnorm")
        return functools.partial(module.suites, framework=framework)
    name = "keras" if framework.startswith("keras-") else framework
    return importlib.import_module(f"benchmarks.bench_{name}").suites


def keras_backend(framework: str) -> str | None:
    """The Keras backend a framework's child runs (``"keras-jax"``, ``"rmsnorm-keras-jax"``:
    ``"jax"``), or None."""
    return framework.partition("keras-")[2] or None


def _repeats(shape: tuple[int, ...], quick: bool) -> int:
    numel = 1
    for side in shape:
        numel *= side
    base = 5 if quick else 15
    return max(3, min(base, int(base * 6e6 / numel)))


def run_framework(framework: str, sizes, dtypes, quick: bool, device: str = "cpu") -> list[dict]:
    """Time every suite of one framework in this process; rows of plain data."""
    suites = _suites_for(framework)
    rows = []
    for shape in sizes:
        for dtype in dtypes:
            for suite in suites(shape, dtype, quick, device):
                timing = time_suite(suite, repeats=_repeats(shape, quick), warmup=2, min_time=0.002)
                rows.append(_row(framework, timing, shape))
    return rows


#: Bytes per entry, for the achieved bandwidth.
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def passes(mode: str) -> int:
    """Tensor-sized transfers a call cannot avoid: a forward reads x and writes y; a
    backward adds reading x and g and writing dx (``mode`` may carry a lowering's name,
    ``"forward (ops lowering)"``)."""
    return 5 if "backward" in mode else 2


def achieved_gbps(row: dict) -> float:
    """l2norm's compulsory traffic over its median time, in GB/s (10**9 bytes)."""
    traffic = _numel(row["shape"]) * ITEMSIZE[row["dtype"]] * passes(row["mode"])
    return traffic / row["median_s"]["l2norm"] / 1e9


def _row(framework: str, timing: Timing, nchw: tuple[int, ...]) -> dict:
    suite = timing.suite
    return {
        "framework": framework,
        "device": suite.device,
        "mode": suite.mode,
        "compiled": suite.compiled,
        "shape_nchw": list(nchw),
        "shape": list(suite.shape),
        "dtype": suite.dtype,
        "median_s": timing.seconds,
        "samples_s": timing.samples,
        "ratios": timing.ratios(),
        "memory_bytes": suite.memory,
    }


def vector_extensions() -> str:
    """The CPU's SIMD extensions that decide the ratios (AVX2 vs AVX-512 machines differ):
    from /proc/cpuinfo on Linux, 'unknown' elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16")
    found = [f for f in wanted if f in flags] + sorted(f for f in ("asimd", "sve") if f in flags)
    return " ".join(found) or "none found"


def _commit() -> str:
    """The checked-out commit, ``+`` when the tree has changes (or 'unknown')."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def machine() -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": _commit(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "vector_extensions": vector_extensions(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    for package in ("numpy", "torch", "jax", "flax", "keras", "tensorflow"):
        try:
            info[package] = importlib.import_module(package).__version__
        except Exception:  # not installed: leave it out
            continue
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def _run_child(framework: str, args, sizes, dtypes) -> list[dict] | None:
    """Time one framework in a fresh Python process; its rows, or None if it failed."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if keras_backend(framework):
        env["KERAS_BACKEND"] = keras_backend(framework)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", framework]
        cmd += ["--child-out", str(out), "--dtypes", ",".join(dtypes), "--device", args.device]
        cmd += ["--sizes", ";".join(",".join(map(str, s)) for s in sizes)]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:  # report it and keep the other frameworks' results
            print(f"{framework} benchmark failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "| framework | device | shape | dtype | mode | compiled | l2norm (ms) | best peer | "
        "l2norm / best peer | l2norm / copy | l2norm GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = row["ratios"]
        lines.append(
            f"| {row['framework']} | {row['device']} | {tuple(row['shape'])} | {row['dtype']} | "
            f"{row['mode']} | {'yes' if row['compiled'] else 'no'} | "
            f"{row['median_s']['l2norm'] * 1e3:.3f} | {ratios.get('best_peer', '-')} | "
            f"{ratios.get('vs_best_peer', float('nan')):.2f} | "
            f"{ratios.get('vs_copy', float('nan')):.1f} | {achieved_gbps(row):.0f} |"
        )
    memory = [r for r in rows if r["memory_bytes"]]
    if memory:
        lines += ["", "Bytes saved for backward (or peak), per implementation:", ""]
        for row in memory:
            lines.append(
                f"- {row['framework']} {tuple(row['shape'])} {row['dtype']}: "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row["memory_bytes"].items())
            )
    header = "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items())
    return header + "\n\n" + "\n".join(lines) + "\n"


#: How each framework's compiled rows are called in the headline table.
_COMPILED = {"torch": "torch.compile", "keras-tensorflow": "XLA"}


def _label(row: dict) -> str:
    how = _COMPILED.get(row["framework"], "jit") if row["compiled"] else "eager"
    if row["framework"] == "numpy":
        how = "reference"
    return f"{how} {row['mode']}"


def headline_table(results: dict) -> str:
    """The headline table of a run (:data:`HEADLINE` rows): per framework and mode, for
    each dtype, l2norm's time over the fastest peer idiom's and over a copy's, both in
    the same run; the run's date, commit, command and machine above it.

    Example:
        >>> row = {"framework": "numpy", "mode": "forward", "compiled": False,
        ...        "shape_nchw": list(HEADLINE), "dtype": "float32",
        ...        "ratios": {"vs_best_peer": 8.71, "best_peer": "naive", "vs_copy": 6.14}}
        >>> headline_table({"machine": {}, "command": "run.py", "rows": [row]}).splitlines()[-1]
        '| numpy | reference forward | 8.71 / 6.1 |'
    """
    info = results["machine"]
    rows = [r for r in results["rows"] if tuple(r["shape_nchw"]) == HEADLINE]
    dtypes = [d for d in RECORD_DTYPES if any(r["dtype"] == d for r in rows)] or list(RECORD_DTYPES)
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        ratios = row["ratios"]
        cell = f"{ratios['vs_best_peer']:.2f}"
        if "vs_copy" in ratios:
            cell += f" / {ratios['vs_copy']:.1f}"
        cells.setdefault((row["framework"], _label(row)), {})[row["dtype"]] = cell
    versions = ", ".join(
        f"{k} {info[k]}"
        for k in ("torch", "jax", "flax", "keras", "tensorflow", "numpy")
        if k in info
    )
    lines = [
        f"Run {info.get('date', '?')} at commit {info.get('commit', '?')}: "
        f"`{results.get('command', '?')}`. {info.get('processor', '?')}, "
        f"{info.get('cpu_count', '?')} cores, vector extensions: "
        f"{info.get('vector_extensions', '?')}; {versions}, Python {info.get('python', '?')}.",
        "",
        "| framework | mode | " + " | ".join(f"{d} peer / copy" for d in dtypes) + " |",
        "|---|---|" + "---|" * len(dtypes),
    ]
    for (framework, label), by_dtype in cells.items():
        cells_of_row = [framework, label, *(by_dtype.get(d, "") for d in dtypes)]
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells_of_row) + "|")
    return "\n".join(lines)


def render(results: dict, page: str) -> str:
    """``page`` (RESULTS.md's text) with the block between :data:`BEGIN` and :data:`END`
    replaced by :func:`headline_table` of ``results``.

    Raises:
        ValueError: the page has no such block.
    """
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no block between {BEGIN!r} and {END!r}")
    return page[: start + len(BEGIN)] + "\n" + headline_table(results) + "\n" + page[end:]


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    frameworks = sorted({r["framework"] for r in rows})
    for framework in frameworks:
        float32 = [r for r in rows if r["framework"] == framework and r["dtype"] == "float32"]
        # Eager where the framework has it; JAX only runs compiled.
        compiled = not any(not r["compiled"] for r in float32)
        chosen = [r for r in float32 if r["compiled"] == compiled]
        if not chosen:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for ax, mode in zip(axes, ("forward", "forward+backward"), strict=True):
            by_mode = [r for r in chosen if r["mode"] == mode]
            by_mode.sort(key=lambda r: _numel(r["shape"]))
            impls = sorted({k for r in by_mode for k in r["median_s"]})
            for impl in impls:
                xs = [_numel(r["shape"]) for r in by_mode if impl in r["median_s"]]
                ys = [r["median_s"][impl] * 1e3 for r in by_mode if impl in r["median_s"]]
                style = "-o" if impl == "l2norm" else ("--" if impl == "copy" else "-.")
                ax.plot(xs, ys, style, label=impl, linewidth=2.5 if impl == "l2norm" else 1.2)
            ax.set(xscale="log", yscale="log", xlabel="elements", ylabel="ms (median)")
            ax.set_title(f"{framework}: {mode}, float32, {'jit' if compiled else 'eager'}")
            ax.legend(fontsize=8)
        path = out_dir / f"time_vs_size_{framework}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    headline = [r for r in rows if tuple(r["shape_nchw"]) == HEADLINE and "vs_copy" in r["ratios"]]
    if headline:
        labels = list(dict.fromkeys(f"{r['framework']}\n{_label(r)}" for r in headline))
        dtypes = [d for d in RECORD_DTYPES if any(r["dtype"] == d for r in headline)]
        width = 0.8 / len(dtypes)
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4.5), constrained_layout=True)
        for k, dtype in enumerate(dtypes):
            value = {
                f"{r['framework']}\n{_label(r)}": r["ratios"]["vs_best_peer"]
                for r in headline
                if r["dtype"] == dtype
            }
            xs = [
                i + (k - (len(dtypes) - 1) / 2) * width
                for i, lb in enumerate(labels)
                if lb in value
            ]
            ax.bar(xs, [value[lb] for lb in labels if lb in value], width, label=dtype)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")  # ratios: 0.5 and 2 are the same distance from 1
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("l2norm time / fastest peer idiom (log)")
        ax.set_title(f"SSD conv4_3 {HEADLINE}: below 1 is faster than every peer")
        ax.legend(fontsize=8)
        path = out_dir / "headline_ratios.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _numel(shape) -> int:
    n = 1
    for side in shape:
        n *= side
    return n


def _parse_sizes(text: str | None, quick: bool):
    if not text:
        return QUICK_SIZES if quick else SIZES
    return tuple(tuple(int(v) for v in part.split(",")) for part in text.split(";"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute run")
    parser.add_argument("--output", default="bench-out", help="directory for the results")
    parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_FRAMEWORKS))
    parser.add_argument("--frameworks", help="default: every framework the device runs")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--sizes", help="NCHW sizes, e.g. '1,64,8,8;8,512,38,38'")
    parser.add_argument(
        "--record", action="store_true", help=f"the headline run, written to {RECORD.name}"
    )
    parser.add_argument(
        "--render", action="store_true", help=f"RESULTS.md's headline table from {RECORD.name}"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RECORD.read_text()), RESULTS_MD.read_text()))
        print(f"rewrote the headline of {RESULTS_MD} from {RECORD}")
        return 0
    if args.record:  # the checked-in run: every CPU framework, three sizes, three dtypes
        args.sizes = args.sizes or ";".join(",".join(map(str, s)) for s in RECORD_SIZES)
        args.dtypes = ",".join(RECORD_DTYPES)
    sizes = _parse_sizes(args.sizes, args.quick)
    dtypes = tuple(args.dtypes.split(","))

    if args.child:
        rows = run_framework(args.child, sizes, dtypes, args.quick, args.device)
        Path(args.child_out).write_text(json.dumps(rows))
        return 0

    from tqdm import tqdm

    available = DEVICE_FRAMEWORKS[args.device]
    frameworks = [f for f in (args.frameworks or ",".join(available)).split(",") if f]
    available += NAMED_FRAMEWORKS[args.device]
    unknown = sorted(set(frameworks) - set(available))
    if unknown:
        parser.error(
            f"frameworks {unknown} do not run on {args.device}; expected some of {list(available)}"
        )
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed: list[str] = []
    with tqdm(
        total=len(frameworks) * len(sizes) * len(dtypes), unit="size", file=sys.stderr
    ) as bar:
        for framework in frameworks:
            bar.set_postfix_str(framework)
            child_rows = _run_child(framework, args, sizes, dtypes)
            if child_rows is None:
                failed.append(framework)
            rows += child_rows or []
            bar.update(len(sizes) * len(dtypes))
    info = machine()
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": info, "command": command, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    if args.record and not failed:
        RECORD.write_text(json.dumps(results, indent=1) + "\n")
        RESULTS_MD.write_text(render(results, RESULTS_MD.read_text()))
        print(f"recorded {RECORD} and rewrote the headline of {RESULTS_MD}")
    table = markdown(rows, info)
    (out_dir / "results.md").write_text(table)
    written = plots(rows, out_dir)
    print(table)
    print(
        "wrote",
        ", ".join(str(p) for p in [out_dir / "results.json", out_dir / "results.md", *written]),
    )
    if failed:  # the others' results are written; the exit status still says so
        print(f"benchmarks failed for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def headline_main(framework: str, argv: list[str]) -> int:
    """What ``python benchmarks/bench_<name>.py [options]`` runs: this suite for one
    framework on the headline shape in float32 (options as for this script)."""
    shape = ",".join(str(side) for side in HEADLINE)
    return main(["--frameworks", framework, "--sizes", shape, "--dtypes", "float32", *argv])


if __name__ == "__main__":
    sys.exit(main())
