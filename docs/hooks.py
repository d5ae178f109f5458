"""MkDocs hooks: draw the generated figures, and publish the benchmark results.

``benchmarks/RESULTS.md`` and its plots (``benchmarks/img/``) stay where the benchmark
suite writes them; the site serves them as ``RESULTS.md`` and ``img/*.png``, so there is
one copy of the results.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from mkdocs.structure.files import File

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def on_pre_build(config, **kwargs) -> None:
    runpy.run_path(str(Path(config["docs_dir"]) / "plot_eps_placements.py"), run_name="__main__")


def on_files(files, config, **kwargs):
    paths = ["RESULTS.md", *(f"img/{p.name}" for p in sorted((BENCHMARKS / "img").glob("*.png")))]
    for path in paths:
        files.append(File(path, str(BENCHMARKS), config["site_dir"], config["use_directory_urls"]))
    return files
