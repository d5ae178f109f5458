r"""PyTorch adapter: :class:`L2Norm` and :func:`l2_normalize`; :class:`RMSNorm` and
:func:`rms_norm`, the same op with the mean placement.

The maths, the options and the rules for NaN, Inf, zeros and extreme magnitudes are those
of :mod:`l2norm.reference`. How a call is computed (:mod:`l2norm.torch._dispatch`): the
native CPU kernel for CPU calls it applies to (built once on first use), plain torch ops
on the branch-free ladder of :mod:`l2norm.core.ladder` everywhere else (CUDA without Triton,
float64, several normalized axes, double backward), and plain aten ops of the max-scaled
formula (:mod:`l2norm.torch._export`) for ``torch.jit.trace``, ``torch.export`` and ONNX.
The kernels are registered ops (:mod:`l2norm.torch._function`) on every path, eager
included, with fake implementations, autograd, a forward-mode formula and vmap rules:
fake tensors, the meta device, ``make_fx``, ``torch.func``, forward AD,
``torch.compile`` (dynamic shapes too) and checkpointing work on them, and
``torch.fx.symbolic_trace`` records the layer as one node. No route reads a value back
to the host or looks at the rest of the batch.

Example:
    >>> import torch
    >>> from l2norm.torch import L2Norm
    >>> L2Norm(512)(torch.randn(2, 512, 38, 38)).shape
    torch.Size([2, 512, 38, 38])
"""

from l2norm.torch._cpu import available as cpu_kernel_available
from l2norm.torch._cpu import use_cpu_kernel
from l2norm.torch._dispatch import LOWERINGS, use_lowering
from l2norm.torch._layer import L2Norm, l2_normalize, lowering_for
from l2norm.torch._replace import replace_peers
from l2norm.torch._rms import RMSNorm, rms_norm

__all__ = [
    "LOWERINGS",
    "L2Norm",
    "RMSNorm",
    "cpu_kernel_available",
    "l2_normalize",
    "lowering_for",
    "replace_peers",
    "rms_norm",
    "use_cpu_kernel",
    "use_lowering",
]
