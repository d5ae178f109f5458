"""The package as an index would publish it: the sdist, a wheel built from it, made
publishable by auditwheel, carrying both kernels; and the sdist installed where no C++
compiler exists.

Both build through pip in an isolated build environment, as a user's install would (the
build requirements come from the package index or pip's cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NO_COMPILER = {"CXX": "/nonexistent/c++"}


def _run(*cmd: str | Path, env: dict[str, str] | None = None, **kwargs) -> str:
    """Run ``cmd`` (output captured; its tail shown on failure)."""
    run = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
        **kwargs,
    )
    assert run.returncode == 0, f"{cmd} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    _run(sys.executable, "-m", "build", "--sdist", "--outdir", out, ROOT)
    (path,) = out.glob("l2norm-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """A wheel built from the sdist, repaired by auditwheel into a manylinux wheel."""
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, sdist)
    (built,) = out.glob("l2norm-*.whl")
    _run(BIN / "auditwheel", "repair", "-w", out / "repaired", built)
    (repaired,) = (out / "repaired").glob("l2norm-*.whl")
    return repaired


def test_the_sdist_holds_sources_and_no_binaries(sdist):
    import tarfile

    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("l2norm/_native/kernel.h") for n in names)
    assert any(n.endswith("l2norm/_native/build.py") for n in names)
    assert not [n for n in names if n.endswith((".so", ".stamp"))]


def test_the_wheel_is_manylinux_for_every_python_3_with_both_kernels(wheel):
    name = wheel.name
    assert name.startswith("l2norm-0.1.0-py3-none-manylinux_"), name
    assert name.endswith("_x86_64.whl") or name.endswith("_aarch64.whl"), name
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
    for library in ("capi", "xla"):
        assert f"l2norm/_native/libl2norm_{library}_portable.stamp" in files
        assert f"l2norm/_native/libl2norm_{library}_portable_v1.so" in files
    # The OpenMP runtime the kernels link is carried in the wheel, as the policy asks.
    assert any(f.startswith("l2norm.libs/libgomp") for f in files), sorted(files)


def test_the_wheel_computes_with_its_own_kernels_and_no_compiler(wheel, tmp_path):
    """Installed into a folder ahead of the development checkout, with no compiler and an
    empty cache: torch and JAX load the wheel's libraries and match the reference."""
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel)
    code = """
import os, warnings, numpy as np, torch, jax, jax.numpy as jnp
SITE = os.environ["PYTHONPATH"]
warnings.simplefilter("error")
import l2norm, l2norm.torch, l2norm.jax
from l2norm import _native
from l2norm.testing import assert_matches_reference
capi, xla = _native.installed("capi"), _native.installed("xla", jax.ffi.include_dir())
assert capi is not None and xla is not None, (capi, xla)
assert str(capi).startswith(SITE) and str(xla).startswith(SITE), (capi, xla)
x = np.random.default_rng(0).standard_normal((2, 8, 3, 3)).astype(np.float32)
scale = np.full(8, 20.0, np.float32)
assert l2norm.torch.lowering_for(torch.from_numpy(x)) == "cpu-kernel"
assert l2norm.jax.lowering_for(x, axis=1) == "cpu-kernel"
on_torch = lambda v, s: l2norm.torch.l2_normalize(torch.from_numpy(v), torch.from_numpy(s), dim=1)
on_jax = jax.jit(lambda v, s: l2norm.jax.l2_normalize(v, s, axis=1))
assert_matches_reference(on_torch, x, scale, forward_ulps=1, axis=1)
assert_matches_reference(on_jax, x, scale, forward_ulps=1, axis=1)
print("ok")
"""
    cache = tmp_path / "cache"
    out = _run(
        sys.executable,
        "-c",
        code,
        env={**NO_COMPILER, "PYTHONPATH": str(site), "L2NORM_CACHE_DIR": str(cache)},
        cwd=tmp_path,  # not the checkout: python -c puts the working folder first
    )
    assert out.split() == ["ok"], out
    assert not cache.exists() or not any(cache.iterdir())  # nothing compiled at run time


def test_the_sdist_installs_without_a_compiler(sdist, tmp_path):
    """No C++ compiler at install: the install succeeds with a message, the package
    imports and computes (the NumPy reference; the adapters fall back to framework ops)."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    _run(
        pip, "install", "-q", "-c", ROOT / "requirements" / "constraints.txt", "numpy", "ml_dtypes"
    )
    _run(pip, "install", "-q", "--no-deps", sdist, env=NO_COMPILER)
    code = (
        "import numpy as np, l2norm, l2norm._native as n\n"
        "print(l2norm.l2_normalize(np.array([[3.0, 4.0]]), [20.0, 10.0]).tolist())\n"
        "print(n.installed('capi'))\n"
    )
    out = _run(venv / "bin" / "python", "-c", code, env=NO_COMPILER, cwd=tmp_path)
    assert out.split("\n")[:2] == ["[[12.0, 8.0]]", "None"], out
