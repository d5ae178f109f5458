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
Both libraries take a call's parameters as one struct, ``Params`` in ``kernel.h``, which
:class:`Params` mirrors here (the one copy in Python): the C ABI by pointer, the XLA
custom calls as attributes of the same names (:func:`xla_attributes`).

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
    >>> from l2norm.core.modes import get_mode
    >>> rms = get_mode("add_meansq")
    >>> p = _native.params((8, 512, 1444), _native.ScaleKind.PER_CHANNEL, rms, 1e-6, 2)
    >>> (p.shape.C, p.is_add, p.power, p.mean)
    (512, 1, 2, 1)
    >>> lib = _native.capi()  # doctest: +SKIP
    >>> lib is None or lib.l2norm_abi_version() == _native.ABI_VERSION  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from l2norm._native import build as _build
from l2norm._native.build import BuildError

if TYPE_CHECKING:
    from l2norm.core.modes import EpsMode

__all__ = [
    "ABI_VERSION",
    "BuildError",
    "DTYPE_CODES",
    "Params",
    "ScaleKind",
    "Shape",
    "build",
    "capi",
    "installed",
    "installed_capi",
    "params",
    "scale_kind",
    "xla_attributes",
    "xla_library",
]

HERE = Path(__file__).resolve().parent
#: The interface version capi.cpp reports (``l2norm_abi_version``): ``kernel.h``'s.
ABI_VERSION = _build.abi_version()
#: The element-type codes of the C ABI.
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


class ScaleKind(enum.IntEnum):
    """``kernel.h``'s ``ScaleKind``: how many scale entries a call passes."""

    NONE = 0  # a scale of ones
    SHARED = 1  # one value for every channel
    PER_CHANNEL = 2  # one per channel


class Shape(ctypes.Structure):
    """``kernel.h``'s ``Shape``: ``(outer, C, inner)``, the middle axis normalized."""

    _fields_ = (("outer", ctypes.c_int64), ("C", ctypes.c_int64), ("inner", ctypes.c_int64))


class Params(ctypes.Structure):
    """``kernel.h``'s ``Params``, field for field: everything a kernel call is told
    besides its pointers and dtype (:func:`capi` compares its size with the library's)."""

    _fields_ = (
        ("shape", Shape),
        ("eps", ctypes.c_double),
        ("scale", ctypes.c_int32),  # a ScaleKind
        ("is_add", ctypes.c_int32),  # EpsMode.kernel_code: eps added (1) or a floor (0),
        ("power", ctypes.c_int32),  # meeting the norm (1) or the sum of squares (2),
        ("mean", ctypes.c_int32),  # divided by C first (1: RMSNorm)
        ("threads", ctypes.c_int32),
    )


def scale_kind(entries: int | None, channels: int) -> ScaleKind:
    """The kind of a scale of ``entries`` values (None: no scale) over ``channels``.

    Raises:
        ValueError: neither 1 nor ``channels`` entries.
    """
    if entries is None:
        return ScaleKind.NONE
    if entries == 1:
        return ScaleKind.SHARED
    if entries == channels:
        return ScaleKind.PER_CHANNEL
    raise ValueError(f"a scale of {entries} entries over {channels} channels")


@functools.lru_cache(maxsize=256)
def params(
    rows: tuple[int, int, int], scale: ScaleKind, mode: EpsMode, eps: float, threads: int
) -> Params:
    """The :class:`Params` of a call over ``rows = (outer, C, inner)``, cached: a model's
    calls repeat theirs, and building one costs about 2 us, a tenth of a small call. The
    kernel reads it only, and so must its callers (shared between calls).

    Example:
        >>> from l2norm.core.modes import get_mode
        >>> params((2, 3, 4), ScaleKind.NONE, get_mode("clamp_norm"), 1e-12, 1).power
        1
    """
    is_add, power, mean = mode.kernel_code
    return Params(Shape(*rows), eps, int(scale), is_add, power, mean, threads)


def xla_attributes(p: Params) -> dict[str, np.generic]:
    """The XLA custom calls' attributes: ``p``'s fields, by name and in their C types, but
    ``outer``, which the handler takes from the operand (``xla_ffi.cpp``, ReadCall).

    Example:
        >>> from l2norm.core.modes import get_mode
        >>> attributes = xla_attributes(params((0, 3, 4), 2, get_mode("add_meansq"), 1e-6, 1))
        >>> sorted(attributes)
        ['C', 'eps', 'inner', 'is_add', 'mean', 'power', 'scale', 'threads']
        >>> attributes["mean"].dtype
        dtype('int32')
    """
    fields: list[tuple[str, Any, Any]] = [
        (name, kind, getattr(p.shape, name)) for name, kind in Shape._fields_ if name != "outer"
    ]
    fields += [(name, kind, getattr(p, name)) for name, kind in Params._fields_ if name != "shape"]
    return {name: np.dtype(kind).type(value) for name, kind, value in fields}


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
        lib.l2norm_params_size.restype = ctypes.c_int64
        if lib.l2norm_params_size() != ctypes.sizeof(Params):
            raise BuildError(
                f"the library's Params has {lib.l2norm_params_size()} bytes, "
                f"l2norm._native.Params {ctypes.sizeof(Params)}"
            )
    except (BuildError, OSError) as err:
        _warn_once("capi", err)
        return None
    # Every pointer as c_void_p: a plain int from a tensor's data_ptr() goes in as it is
    # (no ctypes.cast per call), and so do ctypes.byref(params) and ctypes pointers.
    c_int, ptr = ctypes.c_int, ctypes.c_void_p
    lib.l2norm_forward.argtypes = [c_int, ptr, ptr, ptr, ptr]  # dtype, params, x, w, y
    lib.l2norm_backward.argtypes = [c_int, *[ptr] * 6]  # dtype, params, x, g, w, dx, dw
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
