"""The Triton lowering: fused forward and backward kernels for CUDA tensors.

One launch computes a forward (``x`` read once from memory, ``y`` written once), one a
backward (``x`` and ``g`` read, ``dx`` written, the scale's gradient as one row of
per-channel sums per program, summed in a fixed order afterwards). No value is read back
to the host and no second launch handles special slices, so the lowering runs inside CUDA
graphs and under ``torch.cuda.set_sync_debug_mode("error")``. The kernels
(:mod:`l2norm.torch._triton_kernels`) compute each entry in float32 (compensated sums,
float64 once per slice, the per-mode terms of :mod:`l2norm.core.modes`): within 1 ULP like
the CPU kernel, not always its bits.

Triton is an optional dependency (the ``torch`` extra brings it on Linux; CUDA builds of
torch bring it too). Without a GPU, Triton's interpreter runs the same kernels on CPU
tensors when ``TRITON_INTERPRET=1`` is set before this module is first used: that is how
the tests and ``l2norm check --backends torch-triton`` exercise them on a CPU machine.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import torch
from torch import Tensor

from l2norm.core.modes import EpsMode
from l2norm.torch._layout import Layout, dense_layout

__all__ = ["available", "backward", "forward", "layout", "require"]

#: Channels per chunk: a slice wider than this is walked in chunks of it, adding entry by
#: entry in registers and reducing across threads once per tile (few threads share a
#: slice, so the per-slice work, float64 included, is spread over many entries).
CHUNK = 32
#: Entries per tile (chunk x slices) at most: 16 per thread of 4 warps.
TILE = 2048
NUM_WARPS = 4


def installed() -> bool:
    """Whether the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> bool:
    """Whether the lowering can run on ``device``: Triton installed, and a CUDA device or
    (on the CPU) Triton's interpreter switched on before the kernels were loaded."""
    if not installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _kernels_interpreted()


def require(device: torch.device) -> None:
    """RuntimeError unless :func:`available`, saying what is missing."""
    if available(device):
        return
    if not installed():
        raise RuntimeError(
            "the l2norm Triton lowering needs the triton package "
            '(pip install "l2norm[torch]" on Linux, or a CUDA build of torch)'
        )
    raise RuntimeError(
        f"the l2norm Triton lowering runs on CUDA tensors, got a {device.type} tensor; on "
        "the CPU it runs in Triton's interpreter only, which TRITON_INTERPRET=1 in the "
        "environment switches on (set before triton is first imported)"
    )


#: Entries a sample (NCHW) or a tile of rows may hold: the kernels' offsets within a
#: program are 32-bit (one 64-bit base a program).
MAX_OFFSET = 2**31 - 1


def layout(x: Tensor, norm: tuple[int, ...], channel: int) -> Layout | None:
    """The kernels' view of ``x`` (dense float32 / float16 / bfloat16, one axis), or None
    (then the ``ops`` lowering runs), also for a sample of 2**31 entries or more."""
    view = dense_layout(x, norm, channel)
    if view is None:
        return None
    _, channels, inner = view.rows
    # A tile of rows spans at most TILE // BLOCK_C rows of C, at most TILE rows of C.
    span = TILE if inner == 1 else inner
    return view if span * channels <= MAX_OFFSET else None


@functools.cache
def _kernel_module() -> Any:
    from l2norm.torch import _triton_kernels

    return _triton_kernels


@functools.cache
def _kernels_interpreted() -> bool:
    """Whether the kernels, and Triton's own language functions they call, run in the
    interpreter: Triton decides that for each function when it is defined, so
    ``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    kernels = _kernel_module()
    return all(isinstance(f, InterpretedFunction) for f in (tl.zeros, kernels.forward_kernel))


@functools.cache
def _eps_tensor(eps: float, count: int, device: torch.device) -> Tensor:
    """``[count * eps, sqrt(count)]`` in float64: what the kernels' ``_placement`` reads.
    A mean placement passes its slice size (``sqrt(n**2 / N + eps)`` is
    ``sqrt(n**2 + N eps) / sqrt(N)``, and ``sqrt(N)`` is its ``EpsMode.inf_limit``), the
    others 1 (exact: their bits do not change).

    >>> _eps_tensor(1e-6, 4, torch.device("cpu")).tolist()
    [4e-06, 2.0]
    """
    # Through memory: Triton passes a Python float as float32, which would change eps
    # (1e-10 is not a float32).
    return torch.tensor([eps * count, math.sqrt(count)], dtype=torch.float64, device=device)


def _config(
    channels: int, rows: bool, backward: bool = False, vectors: bool = True
) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)``, a function of the channel count, the layout,
    whether rows load as vectors (``_alignment``) and the kernel only (never of the batch:
    a slice's reduction order never depends on it). The kernel keeps the tile in
    registers where ``channels <= BLOCK_C`` and walks chunks otherwise.

    >>> _config(512, rows=False)
    (32, 32, 4)
    >>> _config(8, rows=True)
    (8, 256, 4)
    """
    block_c = min(_next_power_of_2(channels), CHUNK)
    # Entries a tile, the most that compile without spills on sm_80 ... sm_100
    # (tests/test_triton_aot.py): 16 a thread for the forward over rows of vectors, half
    # that for the backward (x and g) and NCHW, half again for rows loaded entry by entry
    # and the NCHW backward of fewer channels than a chunk (several slices a thread).
    if rows:
        tile = (TILE if vectors else TILE // 4) // (2 if backward else 1)
    else:
        tile = TILE // 4 if backward and block_c < CHUNK else TILE // 2
    # Fewer than 4 channels put several whole slices in a thread, each with its own
    # per-slice work: at most 256 slices a tile keeps that within the registers.
    block_s = min(tile // block_c, 256) if rows else min(max(tile // CHUNK, tile // block_c), 256)
    return block_c, block_s, NUM_WARPS


def _alignment(view: Layout, itemsize: int) -> int:
    """How many entries every row of a tile starts a multiple of: for rows, a 16-byte
    vector where C allows it, else 1; for NCHW 1 (vector loads there hand each thread
    several slices, whose per-slice work then costs more than the wider loads save). A
    function of the shape and dtype only (torch allocates the base pointers 16-byte
    aligned, and Triton specializes a kernel on that)."""
    _, channels, inner = view.rows
    vector = 16 // itemsize
    return vector if inner == 1 and channels % vector == 0 else 1


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _launch_args(view: Layout, block_s: int) -> tuple[tuple[int, int], int, int]:
    """``(grid, channel stride, slices along the tile's axis)``."""
    import triton

    outer, _, inner = view.rows
    if inner == 1:
        return (triton.cdiv(outer, block_s), 1), 1, outer
    return (outer, triton.cdiv(inner, block_s)), inner, inner


def _scale_args(weight: Tensor | None, dummy: Tensor) -> tuple[Tensor, int]:
    """``(pointer, W_MODE)``: 0 no scale, 1 one shared value, 2 one per channel."""
    if weight is None:
        return dummy, 0
    w = weight.detach().reshape(-1)
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()  # the kernels compute in float32: a float64 scale is rounded once
    w = w.contiguous()
    return w, (1 if w.numel() == 1 else 2)


def _launch(kernel: Any, view: Layout, tensors: list, mode: EpsMode, eps: float, **meta) -> int:
    """Launch ``kernel`` over ``view``'s tiles with the arguments every kernel shares
    (``tensors`` first: inputs, outputs, the scale last); returns the number of programs.
    ``meta`` holds the backward's own constants (``NEED_DW``)."""
    channels = view.rows[1]
    rows = view.rows[2] == 1
    align = _alignment(view, tensors[0].element_size())
    block_c, block_s, num_warps = _config(channels, rows, "NEED_DW" in meta, align > 1)
    grid, stride_c, count = _launch_args(view, block_s)
    *arrays, weight = tensors
    w, w_mode = _scale_args(weight, arrays[0])
    is_add, power, mean = mode.kernel_code
    if mean and power != 2:  # the kernels' units: N eps meets the sum of squares
        raise NotImplementedError(f"eps_mode={mode.name!r}: a mean of the norms")
    kernel[grid](
        *arrays,
        w,
        channels,
        stride_c,
        count,
        _eps_tensor(eps, channels if mean else 1, arrays[0].device),
        IS_ADD=is_add,
        POWER=power,
        MEAN=mean,
        W_MODE=w_mode,
        ROWS=rows,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        SINGLE=channels <= block_c,
        ALIGN=align,
        EVEN=channels > block_c and channels % block_c == 0,  # walked chunks, all full
        BF16_BITS=_kernels_interpreted(),
        num_warps=num_warps,
        enable_fp_fusion=False,  # the only FMAs are the kernels' tl.fma
        **meta,
    )
    return grid[0] * grid[1]


def programs(view: Layout, itemsize: int, backward: bool = False) -> int:
    """How many programs (tiles) a launch over ``view`` of ``itemsize``-byte entries runs."""
    vectors = _alignment(view, itemsize) > 1
    _, block_s, _ = _config(view.rows[1], view.rows[2] == 1, backward, vectors)
    grid, _, _ = _launch_args(view, block_s)
    return grid[0] * grid[1]


def forward(x: Tensor, weight: Tensor | None, view: Layout, mode: EpsMode, eps: float) -> Tensor:
    """``y = weight * x / d(n)`` by one kernel launch."""
    x3 = view.to_kernel(x)
    y3 = torch.empty_like(x3)
    _launch(_kernel_module().forward_kernel, view, [x3, y3, weight], mode, eps)
    return view.from_kernel(y3, x.shape)


def backward(
    x: Tensor, weight: Tensor | None, g: Tensor, view: Layout, mode: EpsMode, eps: float
) -> tuple[Tensor, Tensor]:
    """``(dx, the scale's gradient per channel in float64)`` by one kernel launch and a
    sum of its per-program rows (zeros without a scale)."""
    x3, g3 = view.to_kernel(x), view.to_kernel(g.to(x.dtype))
    dx3 = torch.empty_like(x3)
    channels = view.rows[1]
    need_dw = weight is not None
    shares = (
        torch.empty(
            (programs(view, x3.element_size(), backward=True), channels),
            dtype=torch.float64,
            device=x.device,
        )
        if need_dw
        else x3  # not written
    )
    _launch(
        _kernel_module().backward_kernel,
        view,
        [x3, g3, dx3, shares, weight],
        mode,
        eps,
        NEED_DW=need_dw,
        OUT_MAX=float(torch.finfo(x.dtype).max),
    )
    if not need_dw:
        return view.from_kernel(dx3, x.shape), torch.zeros(
            channels, dtype=torch.float64, device=x.device
        )
    return view.from_kernel(dx3, x.shape), shares.sum(0)
