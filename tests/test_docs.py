"""Every code example in the README and the docs runs, so the docs cannot drift.

Python blocks of one page run in order in one namespace (a page reads as one session).
The Keras page runs under the ``keras`` marker, i.e. once per Keras backend.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
KERAS_PAGES = {"keras.md"}
FRAMEWORK_FREE_MODULES = [
    "l2norm",
    "l2norm.reference",
    "l2norm._spec",
    "l2norm.conformance",
    "l2norm.testing",
]


def run_page(page: Path) -> int:
    blocks = BLOCK.findall(page.read_text())
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{page.name} block {number}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name}, python block {number} failed: {err!r}") from err
    return len(blocks)


@pytest.mark.parametrize(
    "page", [p for p in PAGES if p.name not in KERAS_PAGES], ids=lambda p: p.name
)
def test_python_examples_run(page):
    run_page(page)


@pytest.mark.keras
@pytest.mark.parametrize("page", [p for p in PAGES if p.name in KERAS_PAGES], ids=lambda p: p.name)
def test_keras_examples_run_on_this_backend(page):
    assert run_page(page) > 0


def test_the_readme_and_getting_started_have_examples():
    for name in ("README.md", "docs/getting-started.md"):
        assert BLOCK.findall((ROOT / name).read_text()), f"{name} has no python example"


@pytest.mark.parametrize("module", FRAMEWORK_FREE_MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0
