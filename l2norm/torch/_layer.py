"""The PyTorch adapter's user-facing layer and function, and their input checks.

The maths, the options and the rules for NaN, Inf, zeros and extreme magnitudes are
those of :mod:`l2norm.reference`; :mod:`l2norm.torch._dispatch` decides how a call is
computed.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from l2norm.core.spec import (
    Axes,
    Spec,
    check_scale_shape,
    compute_dtype,
    is_python_number,
    scale_compute_dtype,
    scale_init_values,
)
from l2norm.torch._dispatch import Plan, choose
from l2norm.torch._function import apply

__all__ = ["L2Norm", "l2_normalize", "lowering_for"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            "input must be a floating tensor (torch.float16, torch.bfloat16, torch.float32 "
            f"or torch.float64), got {x.dtype}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: The compute precision of each input dtype (``l2norm.core.spec.compute_dtype``).
_COMPUTE = {d: getattr(torch, compute_dtype(_dtype_name(d))) for d in _FLOATS}


def _weight_tensor(weight: Any, x: Any) -> Any:
    """A Python number as a 0-d tensor in the compute precision (weakly typed, as JAX, Keras
    and NumPy take it: ``L2Norm``'s ``20`` or ``l2_normalize(x, 20.0)``); a NumPy scalar as
    a tensor of its own dtype; anything else as given (the checks judge it)."""
    if not isinstance(x, Tensor) or x.dtype not in _COMPUTE:
        return weight
    if is_python_number(weight):
        return torch.tensor(weight, dtype=_COMPUTE[x.dtype], device=x.device)
    if isinstance(weight, np.generic):
        return torch.as_tensor(weight, device=x.device)
    return weight


def _kernel_weight(weight: Tensor | None, x: Tensor) -> Tensor | None:
    """The checked weight in a dtype every lowering takes: its own when it is ``x``'s or
    the compute precision, else widened to the compute precision (exact by the scale rule;
    the cast is differentiable, so the gradient comes back in the weight's dtype)."""
    if weight is None or weight.dtype == x.dtype:
        return weight
    wide = _COMPUTE[x.dtype]
    return weight if weight.dtype == wide else weight.to(wide)


def _check_weight(weight: Any, x: Tensor, axes: Axes) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"weight must be a torch.Tensor, a Python number or None, got {type(weight).__name__}"
        )
    # The one scale rule of every framework: a float weight no wider than the compute
    # precision (a float32 or bfloat16 weight with a half input, float32 with float64...).
    scale_compute_dtype(_dtype_name(x.dtype), _dtype_name(weight.dtype))
    if weight.device != x.device:
        raise ValueError(
            f"weight is on {weight.device} but the input is on {x.device}; move one of them"
        )
    # Compared size by size, never through int(): under torch.compile the channel count
    # may be a symbol (a comparison is a guard, int() a specialization or a graph break).
    shape, channels = weight.shape, x.shape[axes.channel]
    if len(shape) == 0 or (len(shape) == 1 and (shape[0] == 1 or shape[0] == channels)):
        return
    check_scale_shape(tuple(int(n) for n in shape), int(x.shape[axes.channel]), axes)


def _checked_plan(x: Any, weight: Any, spec: Spec, min_rank: int, num_channels: int | None) -> Plan:
    """The call's plan once its arguments pass the checks (TypeError / ValueError)."""
    if torch.jit.is_tracing():
        # torch.jit.trace sees sizes as tensors, and each check would warn that the trace
        # cannot record it: the checks validate the example input, which is all they mean.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _checks(x, weight, spec, min_rank, num_channels)
    return _checks(x, weight, spec, min_rank, num_channels)


def _checks(x: Any, weight: Any, spec: Spec, min_rank: int, num_channels: int | None) -> Plan:
    _check_tensor(x)
    if x.dim() < min_rank:
        raise ValueError(
            f"L2Norm expects an input of rank >= {min_rank} (batch, channels, ...), "
            f"got rank {x.dim()} with shape {tuple(x.shape)}"
        )
    axes = spec.resolve(x.dim())
    if num_channels is not None and x.shape[axes.channel] != num_channels:
        raise ValueError(
            f"L2Norm({num_channels}) got an input of shape {tuple(x.shape)} with "
            f"{x.shape[axes.channel]} channels along dim {axes.channel}; expected "
            f"{num_channels}"
        )
    _check_weight(weight, x, axes)
    return Plan.of(spec, axes, x.shape)


#: Eager plans of calls that passed the checks, by everything the checks and the plan
#: read; bounded, emptied when full. A small call spends a few microseconds here.
_PLANS: dict[tuple, Plan] = {}


def _apply(
    x: Tensor, weight: Tensor | None, spec: Spec, *, min_rank: int, num_channels: int | None = None
) -> Tensor:
    if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: one node, run later
        return _fx_l2_normalize(
            x, weight, spec.axis, spec.across_spatial, spec.eps_mode, spec.eps, num_channels
        )
    weight = _weight_tensor(weight, x)
    if (
        torch.compiler.is_compiling()  # symbolic sizes: no table
        or not isinstance(x, Tensor)
        or not (weight is None or isinstance(weight, Tensor))
    ):
        plan = _checked_plan(x, weight, spec, min_rank, num_channels)
        return apply(x, _kernel_weight(weight, x), plan)
    key = (
        spec,
        min_rank,
        num_channels,
        type(x),
        x.dtype,
        x.device,
        x.shape,
        None if weight is None else (type(weight), weight.dtype, weight.device, weight.shape),
    )
    try:
        plan = _PLANS.get(key)
    except TypeError:  # symbolic sizes (make_fx's symbolic tracing): no table
        plan = _checked_plan(x, weight, spec, min_rank, num_channels)
        return apply(x, _kernel_weight(weight, x), plan)
    if plan is None:
        plan = _checked_plan(x, weight, spec, min_rank, num_channels)
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return apply(x, _kernel_weight(weight, x), plan)


def _fx_l2_normalize(
    x: Tensor,
    weight: Tensor | None,
    dim: int | tuple[int, ...],
    across_spatial: bool,
    eps_mode: str,
    eps: float,
    num_channels: int | None,
) -> Tensor:
    """What :func:`torch.fx.symbolic_trace` records for the layer: one node (this function
    is ``torch.fx.wrap``-ed), since a ``Proxy`` has no rank, dtype or sizes to check or
    dispatch on. When the graph runs, it checks and dispatches as an eager call (the kernel;
    under ``torch.jit.trace`` / ``torch.export`` the recorded ops)."""
    spec = Spec.create(axis=dim, across_spatial=across_spatial, eps_mode=eps_mode, eps=eps)
    min_rank = 1 if num_channels is None else 2
    return _apply(x, weight, spec, min_rank=min_rank, num_channels=num_channels)


torch.fx.wrap("_fx_l2_normalize")


# --------------------------------------------------------------------------- public API


def l2_normalize(
    x: Tensor,
    weight: Tensor | float | None = None,
    *,
    dim: int | Sequence[int] = 1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> Tensor:
    r"""L2-normalize ``x`` along ``dim`` and multiply by ``weight`` (ParseNet / SSD).

    $$y = w \cdot \frac{x}{d\left(\lVert x \rVert_2\right)}$$

    with the norm over ``dim`` (or every axis but 0 with ``across_spatial``) and ``d`` the
    denominator of ``eps_mode`` (default ``max(n, 1e-12)``, as
    `torch.nn.functional.normalize`). Same maths as `l2norm.l2_normalize`.

    Args:
        x: float16, bfloat16, float32 or float64 tensor of rank >= 1. Half inputs are
            computed in float32 and the result is returned in ``x``'s dtype.
        weight: None; a Python number or a tensor of shape ``()`` or ``(1,)`` (one shared
            value); or one value per channel of the channel axis, on ``x``'s device. A
            number is taken in the compute precision (float32, float64 for a float64
            ``x``); a tensor has a float dtype no wider than it and is widened to it
            exactly (a bfloat16 weight with a float32 ``x`` is fine, a float64 one is
            refused): the scale dtype rule of the guarantees page.
        dim: the normalized axis, or a tuple of axes whose first entry is the channel axis.
        across_spatial: one norm per sample over every axis but 0 (Caffe); ``dim`` then
            names the channel axis only.
        eps: positive finite epsilon (default 1e-12, or the preset's).
        eps_mode: ``"add_sumsq"``, ``"add_norm"``, ``"clamp_sumsq"`` or ``"clamp_norm"``.
        preset: a peer's conventions: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``,
            ``"torchvision"``, ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``.

    Returns:
        A tensor of ``x``'s shape, dtype and memory format.

    Examples:
        >>> import torch
        >>> from l2norm.torch import l2_normalize
        >>> l2_normalize(torch.tensor([[3.0, 4.0]]), torch.tensor([20.0, 10.0]))
        tensor([[12.,  8.]])
    """
    spec = Spec.create(
        axis=dim, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    return _apply(x, weight, spec, min_rank=1)


def lowering_for(
    x: Tensor,
    *,
    dim: int | Sequence[int] = 1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> str:
    """Which lowering :func:`l2_normalize` would use for ``x`` here and now.

    Returns:
        ``"cpu-kernel"`` (the native CPU kernel), ``"triton"`` (the Triton kernels, CUDA),
        ``"ops"`` (plain torch ops) or ``"traced"`` (plain ops recorded for
        ``torch.jit.trace`` / ``torch.export``).

    Examples:
        >>> import torch
        >>> from l2norm.torch import lowering_for, use_lowering
        >>> with use_lowering("ops"):
        ...     lowering_for(torch.randn(2, 8, 4, 4))
        'ops'
    """
    spec = Spec.create(
        axis=dim, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    _check_tensor(x)
    return choose(x, Plan.of(spec, spec.resolve(x.dim()), x.shape)).lowering


def _check_layer_args(
    count_name: str, count: Any, flags: dict[str, Any], dtype: torch.dtype | None
) -> torch.dtype:
    """Check a layer's channel count (a positive int), its bool flags and its parameter
    dtype; return the dtype (the default dtype for None). Shared with RMSNorm."""
    if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{count_name} must be a positive int, got {count!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return dtype


def _layer_forward(x: Tensor, weight: Tensor, spec: Spec, num_channels: int) -> Tensor:
    return _apply(x, weight, spec, min_rank=2, num_channels=num_channels)


class L2Norm(nn.Module):
    r"""L2 normalization with a learnable per-channel scale (ParseNet, SSD's ``conv4_3``).

    $$y = \gamma \cdot \frac{x}{d\left(\lVert x \rVert_2\right)}$$

    The norm is taken over ``dim`` for every other position (per pixel over the channels
    for NCHW input), or over every axis but the batch axis with ``across_spatial``.
    $\gamma$ is a learnable vector of size ``num_channels`` (one value with
    ``channel_shared``) initialised to ``scale_init`` (SSD uses 20). ``d`` is the
    denominator of ``eps_mode``:

    | `eps_mode` | $d(n)$ | peers |
    |---|---|---|
    | `clamp_norm` | $\max(n, \epsilon)$ | torchvision (the default) |
    | `add_norm` | $n + \epsilon$ | ssd.pytorch, mmdetection |
    | `add_sumsq` | $\sqrt{n^2+\epsilon}$ | Caffe SSD |
    | `clamp_sumsq` | $\max(n, \sqrt{\epsilon})$ | TensorFlow, ssd_keras |

    Half-precision inputs (and inputs under `torch.autocast`) are computed in float32 and
    returned in their own dtype; each output is within 1 ULP of the exact result for every
    finite input (no overflow of the sum of squares, no NaN for all-zero pixels, a finite
    gradient everywhere).

    Args:
        num_channels: $C$, the size of the channel axis ``dim``.
        scale_init: initial $\gamma$: a number, or one value per channel (a sequence or
            a tensor). Default: 20. Positional too, as in ssd.pytorch's
            ``L2Norm(512, 20)``.
        dim: the channel axis (default 1, NCHW). A tuple normalizes over all its axes;
            its first entry is the channel axis. Negative values count from the end.
        channel_shared: one scalar $\gamma$ for all channels (Caffe's option).
        across_spatial: one norm per sample over every axis but 0 (Caffe's option).
        learnable: $\gamma$ is a parameter; if False, a buffer (still in the
            ``state_dict``). Default: True.
        eps: epsilon (default 1e-12 or the preset's).
        eps_mode: where eps goes (see the table).
        preset: a peer's (eps_mode, eps), e.g. ``"ssd.pytorch"``.
        device: the parameter's device (factory kwarg, as in `torch.nn.LayerNorm`).
        dtype: the parameter's dtype (factory kwarg).

    Attributes:
        weight: $\gamma$, shape $(C,)$ or $(1,)$ with ``channel_shared``.
            The name matches ssd.pytorch and mmdetection checkpoints (``L2Norm.weight``).

    Shape:
        - Input: $(N, C, *)$ for ``dim=1``; in general any rank >= 2 with
          $C$ entries along ``dim``.
        - Output: same shape, dtype and memory format as the input.

    Examples:

        >>> import torch
        >>> from l2norm.torch import L2Norm
        >>> norm = L2Norm(512)  # SSD conv4_3: per pixel over the channels, gamma = 20
        >>> x = torch.randn(2, 512, 38, 38)
        >>> y = norm(x)
        >>> torch.allclose(y.norm(dim=1), torch.full((2, 38, 38), 20.0))
        True
        >>> L2Norm(512, preset="ssd.pytorch")  # eps placement of ssd.pytorch's L2Norm
        L2Norm(512, dim=1, eps_mode=add_norm, eps=1e-10, preset=ssd.pytorch)
    """

    def __init__(
        self,
        num_channels: int,
        scale_init: float | Sequence[float] | Tensor = 20.0,
        *,
        dim: int | Sequence[int] = 1,
        channel_shared: bool = False,
        across_spatial: bool = False,
        learnable: bool = True,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dtype = _check_layer_args(
            "num_channels",
            num_channels,
            {"channel_shared": channel_shared, "learnable": learnable},
            dtype,
        )
        self.spec = Spec.create(
            axis=dim, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
        )
        if isinstance(scale_init, Tensor):
            scale_init = scale_init.detach().to("cpu", torch.float64).numpy()
        self._scale_init = scale_init_values(scale_init, int(num_channels), channel_shared)
        self.num_channels = int(num_channels)
        self.dim = self.spec.axis
        self.channel_shared = channel_shared
        self.across_spatial = self.spec.across_spatial
        self.learnable = learnable
        weight = torch.empty(self._scale_init.shape, device=device, dtype=dtype)
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.reset_parameters()

    @property
    def eps(self) -> float:
        return self.spec.eps

    @property
    def eps_mode(self) -> str:
        return self.spec.eps_mode

    def reset_parameters(self) -> None:
        """Set $\\gamma$ back to ``scale_init``."""
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(self._scale_init))

    def forward(self, x: Tensor) -> Tensor:
        return _layer_forward(x, self.weight, self.spec, self.num_channels)

    def extra_repr(self) -> str:
        parts = [f"{self.num_channels}", f"dim={self.dim}"]
        if self.across_spatial:
            parts.append("across_spatial=True")
        if self.channel_shared:
            parts.append("channel_shared=True")
        if not self.learnable:
            parts.append("learnable=False")
        parts.append(f"eps_mode={self.spec.eps_mode}, eps={self.spec.eps:g}")
        if self.spec.preset is not None:
            parts.append(f"preset={self.spec.preset}")
        return ", ".join(parts)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this (as for torchvision's ops): the scripted twin shares
        # the weight and calls the layer as a registered op, which TorchScript can call.
        return _ScriptableL2Norm(self)


class _ScriptableL2Norm(nn.Module):
    """What :func:`torch.jit.script` compiles in place of :class:`L2Norm`.

    ``torch.jit.script`` also puts it in place of the :class:`L2Norm` inside the model it
    was given, so run from Python (eagerly, traced, exported) it behaves as the layer.
    """

    __jit_ignored_attributes__ = ["spec"]

    def __init__(self, module: L2Norm) -> None:
        super().__init__()
        self.spec = module.spec
        if isinstance(module.weight, nn.Parameter):
            self.weight = module.weight
        else:
            self.register_buffer("weight", module.weight)
        axis = module.spec.axis
        self.axis = list(axis) if isinstance(axis, tuple) else [axis]
        self.across_spatial = module.spec.across_spatial
        self.num_channels = module.num_channels
        self.mode = module.spec.eps_mode
        self.eps = module.spec.eps

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._python_forward(x)
        ndim = x.dim()
        if ndim < 2:
            raise ValueError("L2Norm expects an input of rank >= 2, got rank " + str(ndim))
        for a in self.axis:
            if a < -ndim or a >= ndim:
                raise ValueError("L2Norm: dim " + str(a) + " is out of range for rank " + str(ndim))
        channel = self.axis[0] % ndim
        if x.shape[channel] != self.num_channels:
            raise ValueError(
                "L2Norm(" + str(self.num_channels) + ") got " + str(x.shape[channel]) + " channels"
            )
        # The scale rule (l2norm.core.spec.scale_compute_dtype), in what TorchScript runs
        # (str() of a dtype is a number there, so the message spells the dtypes out).
        if not self.weight.is_floating_point():
            raise TypeError("L2Norm: the weight has a non-float dtype; cast it to a float dtype")
        if self.weight.dtype == torch.float64 and x.dtype != torch.float64:
            raise TypeError(
                "L2Norm: the weight is float64, wider than the float32 a non-float64 input is "
                "computed in: cast the weight (weight.float()) or compute in float64"
            )
        return torch.ops.l2norm.l2_normalize(
            x, self.weight, self.axis, self.across_spatial, self.mode, self.eps
        )

    @torch.jit.unused
    def _python_forward(self, x: Tensor) -> Tensor:
        return _layer_forward(x, self.weight, self.spec, self.num_channels)
