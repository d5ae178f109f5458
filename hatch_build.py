"""Build hook: compile the native CPU kernel's C-ABI library into the package at install.

With it, ``pip install l2norm`` (and ``pip install -e .``) leaves a kernel that loads with
no compiler at run time and no pause at the first call. The library is built for any CPU
of the architecture (``-DL2NORM_PORTABLE``: the entry points are cloned for AVX-512, AVX2
and the baseline and picked at load time) and stamped with a hash of its sources, which
``l2norm._native`` checks before loading it. Where no compiler works at install time the
hook says so and installs the pure-Python package: ``l2norm._native`` then builds the
library on first use, or the adapters fall back to their framework's ops.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

NATIVE = Path("l2norm") / "_native"
LIBRARY = "libl2norm_capi_portable.so"
STAMP = "libl2norm_capi_portable.sha256"
SOURCES = ("capi.cpp", "kernel.h")


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
        target = native / LIBRARY
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            print("l2norm: no C++ compiler at install time; the kernel builds on first use")
            return
        cmd = [
            cxx,
            "-O3",
            "-fno-trapping-math",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-DL2NORM_PORTABLE",
            str(native / "capi.cpp"),
            "-o",
            str(target),
        ]
        for extra in (["-fopenmp"], []):  # OpenMP where the compiler has it
            run = subprocess.run(cmd[:1] + extra + cmd[1:], capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            print(f"l2norm: the native kernel did not build at install time:\n{run.stderr[-1500:]}")
            return
        (native / STAMP).write_text(source_digest(native))
        if self.target_name == "wheel":
            build_data["pure_python"] = False
            build_data["infer_tag"] = True
            build_data["force_include"][str(target)] = str(NATIVE / LIBRARY)
            build_data["force_include"][str(native / STAMP)] = str(NATIVE / STAMP)
        print(f"l2norm: native kernel built for this platform ({sys.platform})")
