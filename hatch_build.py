"""Build hook: compile the native CPU kernel's C-ABI library into the package at install.

With it, ``pip install l2norm`` (and ``pip install -e .``) leaves a kernel that loads with
no compiler at run time and no pause at the first call. On x86-64 the library is built
three times, for the x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and baseline levels, and
``l2norm._native`` loads the best one this CPU runs; elsewhere once, for the baseline.
The libraries are stamped with a hash of their sources, which the loader checks. Where no
compiler works at install time the hook says so and installs the pure-Python package:
``l2norm._native`` then builds the library on first use, or the adapters fall back to
their framework's ops.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NATIVE = Path("l2norm") / "_native"
STAMP = "libl2norm_capi_portable.sha256"
SOURCES = ("capi.cpp", "kernel.h")
#: (library name, -march flag) per x86-64 level; one baseline build elsewhere.
X86_LEVELS = (("v4", "-march=x86-64-v4"), ("v3", "-march=x86-64-v3"), ("v1", "-march=x86-64"))


def source_digest(native: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((native / name).read_bytes())
    return digest.hexdigest()


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name not in ("wheel", "editable"):
            return
        native = Path(self.root) / NATIVE
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            print("l2norm: no C++ compiler at install time; the kernel builds on first use")
            return
        levels = X86_LEVELS if platform.machine() in ("x86_64", "AMD64") else (("v1", None),)
        built = []
        for level, march in levels:
            target = native / f"libl2norm_capi_portable_{level}.so"
            flags = ["-O3", "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]
            flags += [march] if march else []
            cmd = [cxx, *flags, str(native / "capi.cpp"), "-o", str(target)]
            for extra in (["-fopenmp"], []):  # OpenMP where the compiler has it
                run = subprocess.run(cmd[:1] + extra + cmd[1:], capture_output=True, text=True)
                if run.returncode == 0:
                    built.append(target)
                    break
            else:
                print(f"l2norm: the native kernel ({level}) did not build:\n{run.stderr[-1500:]}")
        if not built:
            return
        (native / STAMP).write_text(source_digest(native))
        if self.target_name == "wheel":
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            for path in [*built, native / STAMP]:
                build_data["force_include"][str(path)] = str(NATIVE / path.name)
        print(f"l2norm: native kernel built for {sys.platform} ({len(built)} levels)")
