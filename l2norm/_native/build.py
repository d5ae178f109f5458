"""How the native kernel's libraries are compiled: the one place that knows their sources,
the compiler, the flags, the x86-64 levels and the digests that tie a library to its
sources.

Two users, so that they can never disagree: the install hook (``hatch_build.py``, which
loads this file by path, so it imports nothing but the standard library) builds portable
libraries into the package, one per x86-64 level; :mod:`l2norm._native` checks those
against the sources next to them and otherwise compiles one for this CPU into its cache.

Examples (``l2norm._native.build`` is also the name of a function of the package, so the
module is imported by its full name):
    >>> import importlib
    >>> build = importlib.import_module("l2norm._native.build")
    >>> sorted(build.LIBRARIES)
    ['capi', 'xla']
    >>> build.portable_name("capi", "v3")
    'libl2norm_capi_portable_v3.so'
    >>> build.abi_version() >= 2
    True
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Each library's sources (the first is compiled; the rest are what it includes).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "capi": ("capi.cpp", "kernel.h"),  # plain C ABI (torch, through ctypes)
    "xla": ("xla_ffi.cpp", "kernel.h"),  # XLA FFI custom calls (JAX on the CPU)
}

#: -fno-trapping-math: the kernel never reads floating-point exception flags, and without
#: it GCC does not vectorize a loop holding a NaN-keeping min / max.
BASE_FLAGS = ("-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC")

#: (level, -march flag, the /proc/cpuinfo flags a CPU needs to run it), best first. The
#: install hook builds one library per level; the loader takes the best one the CPU runs.
X86_LEVELS: tuple[tuple[str, str, frozenset[str]], ...] = (
    (
        "v4",
        "-march=x86-64-v4",
        frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ),
    ("v3", "-march=x86-64-v3", frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"})),
    ("v1", "-march=x86-64", frozenset()),
)


class BuildError(RuntimeError):
    """The compiler could not build a library (its message is in the error)."""


def compiler() -> str:
    """``$CXX`` (and only it, when set), else the first of c++, g++, clang++ found."""
    chosen = os.environ.get("CXX")
    if chosen:
        if shutil.which(chosen):
            return chosen
        raise BuildError(f"CXX={chosen!r} is not an executable")
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


@functools.cache
def accepts(cxx: str, flag: str) -> bool:
    """Whether ``cxx`` compiles and links a trivial program with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        run = subprocess.run(
            [cxx, flag, str(src), "-o", str(Path(tmp) / "probe")], capture_output=True, check=False
        )
        return run.returncode == 0


def flags(cxx: str, march: str | None) -> tuple[str, ...]:
    """The compile flags: :data:`BASE_FLAGS`, ``march`` and OpenMP where ``cxx`` takes them."""
    optional = [f for f in (march, "-fopenmp") if f is not None and accepts(cxx, f)]
    return (*BASE_FLAGS, *optional)


def abi_version(native: Path = HERE) -> int:
    """The C ABI's version, written once: ``kAbiVersion`` in ``kernel.h``, which
    ``l2norm_abi_version`` returns and :mod:`l2norm._native` expects of a library."""
    text = (native / "kernel.h").read_text()
    found = re.search(r"^constexpr int kAbiVersion = (\d+);", text, re.MULTILINE)
    if found is None:
        raise BuildError(f"no 'constexpr int kAbiVersion = N;' line in {native / 'kernel.h'}")
    return int(found.group(1))


def source_digest(name: str, native: Path = HERE) -> str:
    """SHA-256 of library ``name``'s sources in ``native``."""
    digest = hashlib.sha256()
    for source in LIBRARIES[name]:
        digest.update((native / source).read_bytes())
    return digest.hexdigest()


def compile_library(
    name: str,
    target: Path,
    *,
    march: str | None,
    include_dirs: tuple[str, ...] = (),
    native: Path = HERE,
) -> None:
    """Compile library ``name`` from ``native`` into ``target``, atomically: it is built
    under a temporary name and renamed, so processes building at once never load a
    half-written library.

    Raises:
        BuildError: no compiler, or the compiler failed (its output in the message).
    """
    cxx = compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=target.parent)
    os.close(fd)
    cmd = [
        cxx,
        *flags(cxx, march),
        *(f"-I{d}" for d in include_dirs),
        str(native / LIBRARIES[name][0]),
        "-o",
        tmp,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    os.replace(tmp, target)


def portable_levels() -> tuple[tuple[str, str | None, frozenset[str]], ...]:
    """The levels the install hook builds on this architecture (one baseline off x86-64)."""
    if platform.machine() in ("x86_64", "AMD64"):
        return X86_LEVELS
    return (("v1", None, frozenset()),)


def portable_name(name: str, level: str) -> str:
    """The file name of library ``name`` built at install for ``level``."""
    return f"libl2norm_{name}_portable_{level}.so"


def stamp_name(name: str) -> str:
    """The file the install hook writes beside library ``name``'s portable builds: the
    digest of their sources, and for ``xla`` the FFI API version of the headers used."""
    return f"libl2norm_{name}_portable.stamp"


def ffi_api_version(include_dir: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(major, minor)`` of the XLA FFI C API in jaxlib's headers at ``include_dir``."""
    try:
        text = (Path(include_dir) / "xla" / "ffi" / "api" / "c_api.h").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", text))
    if set(found) != {"MAJOR", "MINOR"}:
        return None
    return int(found["MAJOR"]), int(found["MINOR"])


def stamp_text(name: str, native: Path = HERE, include_dir: str | None = None) -> str:
    """What :func:`stamp_name` holds for library ``name`` built from ``native`` now."""
    lines = [source_digest(name, native)]
    if include_dir is not None:
        major, minor = ffi_api_version(include_dir) or (-1, -1)
        lines.append(f"ffi {major}.{minor}")
    return "\n".join(lines) + "\n"
