"""The PyTorch backends: ``torch`` (the default dispatch: the native CPU kernel wherever it
applies), ``torch-cuda`` (the same on CUDA) and one per other lowering of
:mod:`l2norm.core.lowering`, forced: ``torch-ops`` (the pure-torch lowering) and
``torch-triton`` (the Triton lowering; without a GPU in Triton's interpreter).

Only the public API of :mod:`l2norm.torch` is used: :func:`~l2norm.torch.l2_normalize`,
:func:`~l2norm.torch.use_lowering` and :func:`~l2norm.torch.cpu_kernel_available`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

import l2norm.torch as l2torch
from l2norm.conformance._registry import Backend, BackendUnavailable
from l2norm.testing.frameworks import (
    numpy_to_torch,
    torch_kwargs,
    torch_to_numpy,
    triton_interpreter_without_gpu,
)


def probe(name: str) -> str | None:
    """Why ``name`` cannot run here: ``torch-cuda`` without a CUDA device, ``torch-triton``
    where Triton's kernels cannot run (see :func:`_triton_device`)."""
    if name == "torch-cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if name == "torch-triton":
        return _triton_device()[1]
    return None


def _triton_device() -> tuple[str, str | None]:
    """``(device, why not)`` for the Triton lowering: CUDA where present, else the CPU in
    Triton's interpreter, which must be switched on before the kernels are first loaded."""
    from l2norm.torch import _triton

    if torch.cuda.is_available():
        return "cuda", None
    triton_interpreter_without_gpu()
    if not _triton.available(torch.device("cpu")):
        return "cpu", (
            "no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1 must be set "
            "before triton is first imported)"
        )
    return "cpu", None


def build(name: str, lowering: str | None = None) -> Backend:
    """The backend ``name``: ``lowering`` forced (:func:`l2norm.torch.use_lowering`), or
    the default dispatch for None; on CUDA for ``torch-cuda``."""
    reason = probe(name)
    if reason is not None:
        raise BackendUnavailable(name, reason)
    device = "cuda" if name == "torch-cuda" else "cpu"
    if lowering == "triton":
        device = _triton_device()[0]
    notes: tuple[str, ...] = ()
    if name == "torch":
        # Load (on the first run ever: build, about a minute) the kernel now rather than
        # inside the first case, and say so when the row will not exercise it.
        if os.environ.get("L2NORM_CPU_KERNEL") == "0":
            notes = ("L2NORM_CPU_KERNEL=0: the torch row ran the pure-torch lowering",)
        elif not l2torch.cpu_kernel_available():
            notes = (
                "the native CPU kernel could not be built (it needs a C++ compiler and ninja, "
                'which pip install "l2norm[torch]" brings), so the torch row ran the pure-torch '
                "lowering",
            )

    def forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
        w = None if scale is None else numpy_to_torch(scale).to(device)
        with l2torch.use_lowering(lowering):
            y = l2torch.l2_normalize(numpy_to_torch(x).to(device), w, **torch_kwargs(options))
        return torch_to_numpy(y)

    def vjp(
        x: np.ndarray, scale: np.ndarray | None, g: np.ndarray, options: dict
    ) -> tuple[np.ndarray, np.ndarray | None]:
        xt = numpy_to_torch(x).to(device).requires_grad_(True)
        wt = None if scale is None else numpy_to_torch(scale).to(device).requires_grad_(True)
        with l2torch.use_lowering(lowering):
            y = l2torch.l2_normalize(xt, wt, **torch_kwargs(options))
            inputs = (xt,) if wt is None else (xt, wt)
            grads = torch.autograd.grad(y, inputs, numpy_to_torch(g).to(device))
        return torch_to_numpy(grads[0]), (None if wt is None else torch_to_numpy(grads[1]))

    return Backend(name=name, forward=forward, vjp=vjp, notes=notes)
