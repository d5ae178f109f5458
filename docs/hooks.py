"""MkDocs hooks: typeset the maths at build time, draw the generated figures, and publish
the benchmark results.

* Maths: ``pymdownx.arithmatex`` marks each ``$...$`` / ``$$...$$`` span; the hook turns
  it into MathML (``latex2mathml``), which browsers typeset natively. The built site then
  needs no script and no network: it renders the same offline and on an air-gapped
  cluster.
* Sample outputs: ``<!-- output of: l2norm check ... -->`` in a page is replaced by that
  command's real output, run at build time, so no sample output can go stale.
* Docstrings: the Sphinx roles some of them use (``:func:``) are dropped from the page,
  leaving the name as code.
* ``docs/plot_eps_placements.py`` draws ``img/eps_placements.png`` straight into the
  built site, from the reference, at every build: the picture cannot go stale and the
  source tree gets no generated file.
* ``benchmarks/RESULTS.md`` stays where the benchmark suite writes it; the site serves it
  as ``RESULTS.md``. Its plots (``img/headline_ratios.png``, ``img/time_vs_size_*.png``)
  are drawn at every build from the checked-in headline run (``benchmarks/headline.json``),
  the same file its headline table is generated from, so the two cannot disagree.
"""

from __future__ import annotations

import html
import json
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from latex2mathml.converter import convert as latex_to_mathml
from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
BENCHMARKS = DOCS.parent / "benchmarks"
GENERATED = "img/eps_placements.png"

# arithmatex's generic output: \( ... \) in a span, \[ ... \] in a div.
_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)


def typeset(page_html: str) -> str:
    """``page_html`` with every arithmatex span replaced by MathML (a block for ``$$``).

    Examples:
        >>> typeset('<span class="arithmatex">\\\\(x^2\\\\)</span>').startswith("<math")
        True
    """

    def inline(match: re.Match[str]) -> str:
        return latex_to_mathml(html.unescape(match.group(1)).strip())

    def block(match: re.Match[str]) -> str:
        tex = html.unescape(match.group(1)).strip()
        return latex_to_mathml(tex, display="block")  # centred by the browser, no scrollbar

    return _INLINE.sub(inline, _BLOCK.sub(block, page_html))


_COMMAND = re.compile(r"<!-- output of: (l2norm [^>]*?) -->")


def command_output(markdown: str) -> str:
    """``markdown`` with each ``<!-- output of: l2norm ... -->`` replaced by a text block
    holding the command and what it printed (run now, in this interpreter's environment).

    Raises:
        RuntimeError: the command failed (the build must not show a failing sample).
    """

    def run(match: re.Match[str]) -> str:
        command = match.group(1)
        done = subprocess.run(
            [sys.executable, "-m", "l2norm", *shlex.split(command)[1:]],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command} failed:\n{done.stdout}\n{done.stderr}")
        return f"```text\n$ {command}\n{done.stdout.rstrip()}\n```"

    return _COMMAND.sub(run, markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return command_output(markdown)


# Sphinx roles (:func:`name`) some docstrings use: mkdocstrings renders the backquoted
# name as code and leaves the role's text in front of it.
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html_text: str, **kwargs) -> str:
    return _ROLE.sub("", typeset(html_text))


def on_files(files, config, **kwargs):
    plot = runpy.run_path(str(DOCS / "plot_eps_placements.py"))
    with tempfile.TemporaryDirectory() as scratch:
        png = plot["main"](Path(scratch) / "plot.png").read_bytes()
    files.append(File.generated(config, GENERATED, content=png))
    files.append(
        File("RESULTS.md", str(BENCHMARKS), config["site_dir"], config["use_directory_urls"])
    )
    bench = runpy.run_path(str(BENCHMARKS / "run.py"), run_name="benchmarks_run")
    rows = json.loads(bench["RECORD"].read_text())["rows"]
    with tempfile.TemporaryDirectory() as scratch:
        for path in bench["plots"](rows, Path(scratch)):
            files.append(File.generated(config, f"img/{path.name}", content=path.read_bytes()))
    return files
