"""The native CPU kernel, framework-free: ``kernel.h`` compiled by the machine's C++
compiler into small shared libraries.

* ``capi``: a plain C ABI (``capi.cpp``) on raw pointers; :mod:`l2norm.torch` calls it
  through :mod:`ctypes`, so it is tied to no torch version and needs no torch headers.
  ``pip install`` builds it into the package (``hatch_build.py``, for any CPU of the
  architecture), so it loads with no compiler at run time.
* ``xla``: XLA custom calls (``xla_ffi.cpp``) for :mod:`l2norm.jax` on the CPU. ``pip
  install`` builds it too, against the FFI headers of the jaxlib in the build environment
  (``jaxlib`` is a build requirement); it is used where the installed jaxlib has the same
  FFI API major version and at least its minor.

:mod:`l2norm._native.build` is the one place that knows the sources, compilers and flags.

Otherwise each is compiled the first time it is needed (a few seconds, one line on stderr),
for this machine's CPU (``-march=native``) and with OpenMP where the compiler has it, and
cached under ``$L2NORM_CACHE_DIR`` (default ``~/.cache/l2norm``) by a hash of its sources,
the compiler and the CPU, so a cache shared between machines never runs code built for
another. ``L2NORM_KERNEL_PREBUILT=0``
ignores the library built at install (and builds one for this exact CPU instead);
``L2NORM_KERNEL_LEVEL=v3`` (or ``v1``) caps the x86-64 level it loads. Where no
compiler works, the callers fall back to their framework's ops after one warning.

Examples:
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
import subprocess
import sys
import warnings
from pathlib import Path

from l2norm._native import build as _build
from l2norm._native.build import BuildError

__all__ = [
    "ABI_VERSION",
    "BuildError",
    "DTYPE_CODES",
    "build",
    "capi",
    "installed",
    "installed_capi",
    "xla_library",
]

HERE = Path(__file__).resolve().parent
#: The interface version capi.cpp reports (``l2norm_abi_version``).
ABI_VERSION = 1
#: The element-type codes of the C ABI.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


def _cache_dir() -> Path:
    root = os.environ.get("L2NORM_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "l2norm"


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(name: str, include_dirs: tuple[str, ...] = ()) -> Path:
    """The path of library ``name`` (``"capi"`` or ``"xla"``) compiled for this CPU
    (``-march=native``), compiled now if not cached.

    Raises:
        BuildError: no compiler, or the compiler failed (its output in the message).
    """
    cxx = _build.compiler()
    flags = _build.flags(cxx, "-march=native")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    digest = hashlib.sha256()
    for part in (
        _build.source_digest(name).encode(),
        version.stdout.encode(),
        " ".join(flags).encode(),
        " ".join(include_dirs).encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
    suffix = ".dll" if sys.platform == "win32" else ".so"
    target = _cache_dir() / f"libl2norm_{name}_{digest.hexdigest()[:16]}{suffix}"
    if not target.exists():
        print(f"l2norm: compiling the native CPU kernel ({name}, once)...", file=sys.stderr)
        _build.compile_library(name, target, march="-march=native", include_dirs=include_dirs)
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


def _ffi_compatible(built: str, include_dir: str | None) -> bool:
    """Whether a library built against FFI API ``built`` ("ffi MAJOR.MINOR") runs on the
    jaxlib whose headers are at ``include_dir``: the same major, at least the minor."""
    runtime = _build.ffi_api_version(include_dir) if include_dir else None
    major, minor = (int(v) for v in built.removeprefix("ffi ").split("."))
    return runtime is not None and runtime[0] == major and runtime[1] >= minor


def installed(name: str, include_dir: str | None = None) -> Path | None:
    """Library ``name`` built at install (``hatch_build.py``) for the best x86-64 level this
    CPU runs, if it was built and its sources are the ones next to it (an editable install
    edited since is rebuilt here, not trusted); for ``xla``, only if it was built against
    the FFI API of the jaxlib whose headers are at ``include_dir``."""
    stamp = HERE / _build.stamp_name(name)
    if os.environ.get("L2NORM_KERNEL_PREBUILT", "1") == "0" or not stamp.exists():
        return None
    lines = stamp.read_text().split("\n")
    if lines[0].strip() != _build.source_digest(name):
        return None
    if name == "xla" and not _ffi_compatible(lines[1].strip(), include_dir):
        return None
    flags = set(_cpu_flags().split())
    # L2NORM_KERNEL_LEVEL=v3 caps the level (e.g. to time the AVX2 build on an AVX-512 CPU).
    cap = os.environ.get("L2NORM_KERNEL_LEVEL")
    levels = [level for level, _, _ in _build.X86_LEVELS]
    allowed = levels[levels.index(cap) :] if cap in levels else levels
    for level, _, needs in _build.portable_levels():
        library = HERE / _build.portable_name(name, level)
        if level in allowed and library.exists() and needs <= flags:
            return library
    return None


def installed_capi() -> Path | None:
    """:func:`installed` for the C-ABI library."""
    return installed("capi")


@functools.cache
def capi() -> ctypes.CDLL | None:
    """The C-ABI library with its function signatures set, or None (after one warning):
    the one built at install if there is one, else one built here on first use."""
    try:
        lib = ctypes.CDLL(str(installed("capi") or build("capi")))
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
    """The XLA custom-call library, or None (after one warning): the one built at install
    if it fits this jaxlib's FFI API, else one built here against the FFI headers in
    ``include_dir`` (``jax.ffi.include_dir()``)."""
    try:
        return ctypes.CDLL(str(installed("xla", include_dir) or build("xla", (include_dir,))))
    except (BuildError, OSError) as err:
        _warn_once("xla", err)
        return None
