"""The machinery of ``l2norm check`` around the measurements: a progress line per backend
on stderr, and the child processes that run the Keras backends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from l2norm.conformance._registry import lazy_entry
from l2norm.conformance._report import BackendReport


def use_jax_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Keep compiled JAX programs on disk between runs (as PyTorch keeps the CPU kernel).

    Compiling is most of a JAX row's time, and the conformance programs are many and
    small: with the cache warm, the JAX rows of ``l2norm check`` take about a quarter of
    the time. Sets the ``JAX_*`` variables (also seen by child processes), or updates
    ``jax.config`` when JAX is already imported. A ``JAX_COMPILATION_CACHE_DIR`` already
    set wins.

    Args:
        directory: where; default ``$XDG_CACHE_HOME/l2norm/jax`` (``~/.cache/l2norm/jax``).

    Returns:
        The cache directory in use.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        directory = Path(base) / "l2norm" / "jax"
    settings = {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        # Cache every program however quick to compile: there are hundreds of small ones.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    jax = sys.modules.get("jax")
    if jax is not None:  # too late for the environment: set the configuration itself
        for key in settings:
            value = os.environ[key]
            # The minimum entry size is an int option, the minimum compile time a float.
            parse = str if key.endswith("_DIR") else int if key.endswith("BYTES") else float
            jax.config.update(key.lower(), parse(value))
    return str(directory)


class Progress:
    """``[3/7] jax: 11 cases, batch invariance, cross-framework: PASS, 12.3 s`` per backend.

    On a terminal the running backend also gets a bar that fills case by case and is
    replaced by its line; elsewhere (a log, a pipe) only the finished lines are written.
    """

    def __init__(self, total: int, *, enabled: bool = True, stream: IO[str] | None = None):
        self.total, self.enabled = total, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.finished = 0
        self._bar = ""
        self._last_draw = 0.0

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _draw(self, text: str) -> None:
        self._bar = text
        self._write("\r" + text + "\x1b[K")

    def start(self, name: str, cases: int) -> None:
        if self.tty:
            self._draw(f"[{self.finished + 1}/{self.total}] {name}: starting ({cases} cases)")

    def step(self, name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self._last_draw < 0.1 and done < total):
            return
        self._last_draw = now
        width = 30
        filled = width * done // max(total, 1)
        self._draw(
            f"[{self.finished + 1}/{self.total}] {name} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} cases"
        )

    def stage(self, name: str, what: str) -> None:
        if self.tty:
            self._draw(f"[{self.finished + 1}/{self.total}] {name}: {what} ...")

    def waiting(self, names: list[str]) -> None:
        if self.tty and names:
            self._draw(f"waiting for {', '.join(names)} (child processes) ...")

    def finish(self, report: BackendReport, where: str = "") -> None:
        if not self.enabled:
            return
        self.finished += 1
        cases = sum(row.cases for row in report.rows)
        parts = [f"{cases} cases"] if report.rows else []
        if report.invariance is not None:
            parts.append("batch invariance")
        if report.cross is not None:
            parts.append("cross-framework")
        verdict = "PASS" if report.passed else "FAIL"
        line = (
            f"[{self.finished}/{self.total}] {report.name}: {', '.join(parts) or 'nothing run'}"
            f"{where} ... {verdict}, {report.seconds:.1f} s"
        )
        if self.tty:
            self._write("\r" + line + "\x1b[K\n")
            if self._bar.startswith("waiting"):
                self._bar = ""
        else:
            self._write(line + "\n")


class ChildRuns:
    """Backends that need their own process (Keras: ``KERAS_BACKEND``), each run as
    ``python -m l2norm check --json --backends NAME`` while this process checks the others.

    While this process is busy, as many children run as there are spare cores (at least
    one); once it is done (:meth:`wait`), one per core.
    """

    def __init__(
        self, names: list[str], extra_args: list[str], child_env: str, progress: Progress
    ) -> None:
        self.pending = list(names)
        self.extra_args, self.child_env, self.progress = extra_args, child_env, progress
        self.running: dict[str, tuple[subprocess.Popen, IO[bytes], IO[bytes], float]] = {}
        self.reports: dict[str, BackendReport] = {}
        cores = os.cpu_count() or 1
        self.busy_limit, self.idle_limit = max(1, cores - 1), max(1, cores)
        self.poll()

    def _launch(self, name: str) -> None:
        entry = lazy_entry(name)
        env = dict(os.environ, **dict(entry.env if entry else ()), **{self.child_env: "1"})
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        cmd = [sys.executable, "-m", "l2norm", "check", "--json", "--backends", name]
        # Files, not pipes: a child that writes more than a pipe holds would block.
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        proc = subprocess.Popen(cmd + self.extra_args, env=env, stdout=out, stderr=err)
        self.running[name] = (proc, out, err, time.perf_counter())

    def _collect(self, name: str) -> None:
        proc, out, err, started = self.running.pop(name)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        out.close()
        err.close()
        report = _parse_child(name, proc.returncode, stdout, stderr)
        report.seconds = time.perf_counter() - started
        self.reports[name] = report
        self.progress.finish(report, where=" (child process)")

    def poll(self, limit: int | None = None) -> None:
        """Collect finished children and start pending ones up to ``limit`` running."""
        for name, (proc, *_rest) in list(self.running.items()):
            if proc.poll() is not None:
                self._collect(name)
        limit = self.busy_limit if limit is None else limit
        while self.pending and len(self.running) < limit:
            self._launch(self.pending.pop(0))

    def wait(self) -> dict[str, BackendReport]:
        """Run the remaining children to the end; their reports by name."""
        while self.pending or self.running:
            self.poll(self.idle_limit)
            self.progress.waiting(list(self.running))
            time.sleep(0.05)
        return self.reports


def _parse_child(name: str, returncode: int, stdout: str, stderr: str) -> BackendReport:
    """The child's report, or one with a fatal problem saying how the child failed."""
    try:
        payload: dict[str, Any] = json.loads(stdout)
        reports = [BackendReport.from_json(r) for r in payload["reports"]]
        return next(r for r in reports if r.name == name)
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
        tail = " | ".join((stderr or stdout).strip().splitlines()[-5:])
        message = f"{name}: child process failed (exit status {returncode}): {tail}"
        return BackendReport(name, problems=[(message, True)])
