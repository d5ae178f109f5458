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
    "l2norm.core.portable",
    "l2norm.core.spec",
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


def test_the_built_site_typesets_every_formula_without_a_script(tmp_path):
    """``mkdocs build`` writes MathML for every ``$...$`` span (docs/hooks.py), loads no
    maths script from a CDN, and leaves no generated file in ``docs/``."""
    import subprocess
    import sys

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    maths = (site / "maths" / "index.html").read_text()
    sources = "".join((ROOT / "docs" / "maths.md").read_text().split("```"))
    spans = len(re.findall(r"\$\$.+?\$\$|\$[^$\n]+?\$", sources, re.S))
    assert maths.count("<math ") >= spans > 10
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert 'class="arithmatex"' not in text, page
        assert "mathjax" not in text.lower() and "katex" not in text.lower(), page
    assert (site / "img" / "eps_placements.png").stat().st_size > 10_000
    assert not (site / "hooks.py").exists() and not (site / "plot_eps_placements.py").exists()
    assert not (ROOT / "docs" / "img").exists()


def test_a_real_browser_lays_out_the_maths_offline(tmp_path):
    """Headless Chromium (Debian's ``chromium``, installed by scripts/setup) with no network
    lays out every formula of the maths page as MathML boxes of non-zero height, and the
    visible text holds no raw LaTeX."""
    import shutil
    import subprocess
    import sys

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the docs check needs headless Chromium (apt-get install chromium)"
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    page = site / "maths" / "index.html"
    probe = (
        "<script>addEventListener('load', () => {"
        "const boxes = [...document.querySelectorAll('math')].map(m => m.getBoundingClientRect());"
        "document.body.dataset.laidOut = boxes.filter(b => b.height > 4).length;"
        "document.body.dataset.total = boxes.length;"
        "document.body.dataset.raw = /\\\\(frac|lVert|varepsilon)/.test(document.body.innerText);"
        "});</script>"
    )
    page.write_text(page.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--proxy-server=127.0.0.1:9",  # no network: anything remote would fail to load
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    total = int(re.search(r'data-total="(\d+)"', dom).group(1))
    laid_out = int(re.search(r'data-laid-out="(\d+)"', dom).group(1))
    assert total > 10 and laid_out == total, (laid_out, total)
    assert 'data-raw="false"' in dom
