"""The one lowering registry (:mod:`l2norm.core.lowering`): its table is the lowerings the
frameworks choose from, ``use_lowering`` accepts exactly its forceable names, and the
conformance backends of the lowerings are generated from it. No framework is imported:
the frameworks' ``choose`` code is read as source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import l2norm
from l2norm import conformance
from l2norm.core import lowering as _lowering

#: The modules whose ``choose`` picks each framework's lowering.
DISPATCH = {"torch": "torch/_dispatch.py", "jax": "jax/_primitives.py"}


def lowering_literals(module: str) -> set[str]:
    """Every lowering name ``module``'s source can pick or test: the strings it returns from
    ``choose``, passes to ``Route(...)``, or compares a forced or chosen lowering with."""
    tree = ast.parse((Path(l2norm.__file__).parent / module).read_text())
    found: set[str] = set()

    def strings(node: ast.AST) -> set[str]:
        return {
            c.value
            for c in ast.walk(node)
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        }

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Route" and node.args:
            found |= strings(node.args[0])
        elif isinstance(node, ast.Compare) and re.search(
            r"forced|lowering", ast.unparse(node.left)
        ):
            found |= set().union(*map(strings, node.comparators))
        elif isinstance(node, ast.FunctionDef) and node.name == "choose":
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and ret.value is not None:
                    found |= strings(ret.value)
    return found


@pytest.mark.parametrize("framework", sorted(DISPATCH))
def test_every_lowering_a_framework_chooses_is_in_the_table(framework):
    named = lowering_literals(DISPATCH[framework])
    assert named == {lw.name for lw in _lowering.lowerings(framework)}


def test_use_lowering_accepts_the_forceable_names_only():
    assert _lowering.names("torch") == ("cpu-kernel", "triton", "ops")
    with _lowering.use_lowering("torch", "ops"), _lowering.use_lowering("jax", "pallas"):
        assert (_lowering.forced("torch"), _lowering.forced("jax")) == ("ops", "pallas")
        with _lowering.use_lowering("torch", None):
            assert (_lowering.forced("torch"), _lowering.forced("jax")) == (None, "pallas")
        assert _lowering.forced("torch") == "ops"
    assert _lowering.forced("torch") is None
    with pytest.raises(ValueError, match=r"unknown lowering 'traced' for torch; expected one of"):
        with _lowering.use_lowering("torch", "traced"):  # chosen by the trace state only
            pass


def test_the_lowering_backends_are_generated_from_the_table():
    known = conformance.known_backends()
    rows = [lw for lw in _lowering.TABLE if lw.row]
    assert [lw.backend for lw in rows if lw.row == "default"] == ["numpy", "torch", "jax"]
    for lw in rows:
        entry = known[lw.backend]
        assert (entry.modules, entry.extra) == (lw.modules, lw.extra), lw
        assert entry.lowering == (lw.name if lw.row == "forced" else None), lw
    generated = {lw.backend for lw in rows}
    assert generated == {
        "numpy",
        "torch",
        "torch-ops",
        "torch-triton",
        "jax",
        "jax-ops",
        "jax-pallas",
    }
    # Every other row is an adapter, not a lowering: it forces none.
    assert all(entry.lowering is None for name, entry in known.items() if name not in generated)
