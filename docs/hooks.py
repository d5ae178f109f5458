"""MkDocs hook: draw the generated figures before the site is built."""

from __future__ import annotations

import runpy
from pathlib import Path


def on_pre_build(config, **kwargs) -> None:
    runpy.run_path(str(Path(config["docs_dir"]) / "plot_eps_placements.py"), run_name="__main__")
