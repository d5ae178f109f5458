"""The native CPU kernel, framework-free: ``kernel.h`` compiled by the machine's C++
compiler into small shared libraries.

* ``capi``: a plain C ABI (``capi.cpp``) on raw pointers; :mod:`l2norm.torch` calls it
  through :mod:`ctypes`, so it is tied to no torch version and needs no torch headers.
  ``pip install`` builds it into the package (``hatch_build.py``, for any CPU of the
  architecture), so it loads with no compiler at run time.
* ``xla``: XLA custom calls (``xla_ffi.cpp``) for :mod:`l2norm.jax` on the CPU; built only
  where JAX is installed (it needs the FFI headers jaxlib ships).

Otherwise each is compiled the first time it is needed (a few seconds, one line on stderr),
for this machine's CPU (``-march=native``) and with OpenMP where the compiler has it, and
cached under ``$L2NORM_CACHE_DIR`` (default ``~/.cache/l2norm``) by a hash of its sources,
the compiler and the CPU, so a cache shared between machines never runs code built for
another. ``bash scripts/setup`` builds both at install. ``L2NORM_KERNEL_PREBUILT=0``
ignores the library built at install (and builds one for this exact CPU instead);
``L2NORM_KERNEL_LEVEL=v3`` (or ``v1``) caps the x86-64 level it loads. Where no
compiler works, the callers fall back to their framework's ops after one warning.

Example:
    >>> from l2norm import _native
    >>> lib = _native.capi()  # doctest: +SKIP
    >>> lib is None or lib.l2norm_abi_version() == _native.ABI_VERSION  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = [
    "ABI_VERSION",
    "BuildError",
    "DTYPE_CODES",
    "build",
    "capi",
    "installed_capi",
    "xla_library",
]

HERE = Path(__file__).resolve().parent
#: The interface version capi.cpp reports (``l2norm_abi_version``).
ABI_VERSION = 1
#: The element-type codes of the C ABI.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_SOURCES = {"capi": "capi.cpp", "xla": "xla_ffi.cpp"}


class BuildError(RuntimeError):
    """The compiler could not build a library (its message is in the error)."""


def _cache_dir() -> Path:
    root = os.environ.get("L2NORM_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l2norm"


def _compiler() -> str:
    chosen = os.environ.get("CXX")
    if chosen:  # the user's choice, and only it
        if shutil.which(chosen):
            return chosen
        raise BuildError(f"CXX={chosen!r} is not an executable")
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _accepts(cxx: str, flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("int main() { return 0; }\n")
        run = subprocess.run(
            [cxx, flag, str(src), "-o", str(Path(tmp) / "probe")], capture_output=True, check=False
        )
        return run.returncode == 0


@functools.cache
def _flags(cxx: str) -> tuple[str, ...]:
    # -fno-trapping-math: the kernel never reads floating-point exception flags, and
    # without it GCC does not vectorize a loop holding a NaN-keeping min / max.
    flags = ["-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
    for optional in ("-march=native", "-fopenmp"):
        if _accepts(cxx, optional):
            flags.append(optional)
    return tuple(flags)


def build(name: str, include_dirs: tuple[str, ...] = ()) -> Path:
    """The path of library ``name`` (``"capi"`` or ``"xla"``), compiled if not cached.

    Raises:
        BuildError: no compiler, or the compiler failed (its output in the message).
    """
    cxx = _compiler()
    flags = _flags(cxx)
    sources = [HERE / _SOURCES[name], HERE / "kernel.h"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    digest = hashlib.sha256()
    for part in (
        *(p.read_bytes() for p in sources),
        version.stdout.encode(),
        " ".join(flags).encode(),
        " ".join(include_dirs).encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = _cache_dir() / f"libl2norm_{name}_{digest.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"l2norm: compiling the native CPU kernel ({name}, once)...", file=sys.stderr, flush=True)
    # Built under a temporary name and renamed: processes building at once never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    includes = [f"-I{d}" for d in include_dirs]
    cmd = [cxx, *flags, *includes, str(sources[0]), "-o", tmp]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


_WARNED: set[str] = set()


def _warn_once(name: str, err: Exception) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"l2norm: the native CPU kernel ({name}) could not be built, so l2norm computes with "
        "its framework's ops on the CPU (correct, slower). It needs a C++ compiler (set CXX). "
        f"Cause: {str(err)[:600]}",
        RuntimeWarning,
        stacklevel=4,
    )


#: What each x86-64 level needs of the CPU (its /proc/cpuinfo flags), best first.
_X86_LEVELS = (
    ("v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("v3", {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}),
    ("v1", set()),
)


def installed_capi() -> Path | None:
    """The C-ABI library built at install (``hatch_build.py``) for the best level this CPU
    runs, if it was built and its sources are the ones next to it (an editable install
    edited since is rebuilt here, not trusted)."""
    stamp = HERE / "libl2norm_capi_portable.sha256"
    if os.environ.get("L2NORM_KERNEL_PREBUILT", "1") == "0" or not stamp.exists():
        return None
    digest = hashlib.sha256()
    for name in ("capi.cpp", "kernel.h"):
        digest.update((HERE / name).read_bytes())
    if stamp.read_text().strip() != digest.hexdigest():
        return None
    flags = set(_cpu_flags().split())
    # L2NORM_KERNEL_LEVEL=v3 caps the level (e.g. to time the AVX2 build on an AVX-512 CPU).
    cap = os.environ.get("L2NORM_KERNEL_LEVEL")
    levels = [level for level, _ in _X86_LEVELS]
    allowed = levels[levels.index(cap) :] if cap in levels else levels
    for level, needs in _X86_LEVELS:
        library = HERE / f"libl2norm_capi_portable_{level}.so"
        if level in allowed and library.exists() and needs <= flags:
            return library
    return None


@functools.cache
def capi() -> ctypes.CDLL | None:
    """The C-ABI library with its function signatures set, or None (after one warning):
    the one built at install if there is one, else one built here on first use."""
    try:
        lib = ctypes.CDLL(str(installed_capi() or build("capi")))
        if lib.l2norm_abi_version() != ABI_VERSION:
            raise BuildError(f"library reports ABI {lib.l2norm_abi_version()}, not {ABI_VERSION}")
    except (BuildError, OSError) as err:
        _warn_once("capi", err)
        return None
    i64, ptr, dptr = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)
    c_int, c_double = ctypes.c_int, ctypes.c_double
    lib.l2norm_forward.argtypes = [
        *(c_int, ptr, ptr, i64, i64, i64, dptr, i64, c_int, c_int, c_double, c_int)
    ]
    lib.l2norm_backward.argtypes = [
        *(c_int, ptr, ptr, ptr, dptr, i64, i64, i64, dptr, i64, c_int, c_int, c_double, c_int)
    ]
    lib.l2norm_forward.restype = lib.l2norm_backward.restype = c_int
    return lib


@functools.cache
def xla_library(include_dir: str) -> ctypes.CDLL | None:
    """The XLA custom-call library, built against the FFI headers in ``include_dir``
    (``jax.ffi.include_dir()``), or None (after one warning)."""
    try:
        return ctypes.CDLL(str(build("xla", (include_dir,))))
    except (BuildError, OSError) as err:
        _warn_once("xla", err)
        return None
