"""Build hook: compile the native CPU kernel's libraries into the package at install.

With them, ``pip install l2norm`` (and ``pip install -e .``) leaves kernels that load with
no compiler at run time and no pause at the first call: the C-ABI library (torch) and the
XLA custom calls (JAX), the latter against the FFI headers of the jaxlib in the build
environment (a build requirement). On x86-64 each is built three times, for the
x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and baseline levels, and ``l2norm._native`` loads
the best one this CPU runs; elsewhere once, for the baseline. A stamp beside them holds
the digest of their sources (and the FFI API version), which the loader checks.

How to compile lives in ``l2norm/_native/build.py``, loaded here by path (the package
itself needs numpy, which the build environment lacks). Where no compiler works at install
time the hook says so and installs the pure-Python package: ``l2norm._native`` then
builds the libraries on first use, or the adapters fall back to their framework's ops.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NATIVE = Path("l2norm") / "_native"


def _load_build(root: str):
    spec = importlib.util.spec_from_file_location("_l2norm_build", Path(root) / NATIVE / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the like look their module up
    spec.loader.exec_module(module)
    return module


def _ffi_include_dir() -> str | None:
    """jaxlib's FFI headers in the build environment, found without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(next(iter(spec.submodule_search_locations))) / "include"
    return str(include) if (include / "xla" / "ffi" / "api" / "ffi.h").exists() else None


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name not in ("wheel", "editable"):
            return
        build = _load_build(self.root)
        native = Path(self.root) / NATIVE
        try:
            build.compiler()
        except build.BuildError as err:
            print(f"l2norm: {err}; the kernel builds on first use, or framework ops are used")
            return
        include_dir = _ffi_include_dir()
        libraries = {"capi": None, "xla": include_dir} if include_dir else {"capi": None}
        if include_dir is None:
            print("l2norm: no jaxlib headers here; the JAX kernel builds on first use")
        included: list[Path] = []
        for name, include in libraries.items():
            built = []
            for level, march, _ in build.portable_levels():
                target = native / build.portable_name(name, level)
                try:
                    build.compile_library(
                        name, target, march=march, include_dirs=(include,) if include else ()
                    )
                    built.append(target)
                except build.BuildError as err:
                    print(f"l2norm: the native kernel ({name}, {level}) did not build:\n{err}")
            if built:
                stamp = native / build.stamp_name(name)
                stamp.write_text(build.stamp_text(name, native, include))
                included += [*built, stamp]
                print(f"l2norm: native kernel ({name}) built for {len(built)} levels")
        if included and self.target_name == "wheel":
            build_data["pure_python"] = False
            # The libraries use no Python API: one wheel serves every Python 3.
            build_data["tag"] = f"py3-none-{_platform_tag()}"
            for path in included:
                build_data["force_include"][str(path)] = str(NATIVE / path.name)


def _platform_tag() -> str:
    import sysconfig

    return sysconfig.get_platform().replace("-", "_").replace(".", "_")
