"""RMSNorm for PyTorch: :func:`rms_norm` and :class:`RMSNorm`, the L2 op of
:mod:`l2norm.torch._layer` with the mean placement (``eps_mode="add_meansq"``).

The options and the peers' conventions (presets) are :class:`l2norm.core.spec.RMSSpec`'s; this
module gives them torch's arrays and the layer its parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from l2norm.core.spec import ArrayOps, RMSSpec, is_python_number
from l2norm.torch._layer import _apply, _check_layer_args, _weight_tensor

__all__ = ["RMSNorm", "rms_norm"]

TORCH_OPS = ArrayOps(
    normalize=lambda x, w, spec: _apply(x, w, spec, min_rank=1),
    cast=lambda t, name: t.to(getattr(torch, name)),
    dtype=lambda t: str(t.dtype).removeprefix("torch."),
    multiply=torch.mul,
    reshape=torch.reshape,
)


def _check_input(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")


def rms_norm(
    x: Tensor,
    weight: Tensor | float | None = None,
    *,
    dim: int | Sequence[int] = -1,
    eps: float | None = None,
    preset: str | None = None,
) -> Tensor:
    r"""RMSNorm: ``y = weight * x / sqrt(mean(x**2) + eps)`` over ``dim``.

    $$y = w \cdot \frac{x}{\sqrt{\frac{1}{N}\sum x^2 + \epsilon}}$$

    The same maths as :func:`l2norm.rms_norm` (the L2 op with ``eps_mode="add_meansq"``):
    half inputs computed in float32, each output rounded once (within 1 ULP of the exact
    value), no overflow of the squares, an exact and finite gradient.

    Args:
        x: float16, bfloat16, float32 or float64 tensor of rank >= 1.
        weight: None, a number or a tensor of shape ``()`` / ``(1,)`` (one shared value),
            or one value per channel of the channel axis (the first of ``dim``). A
            tensor's dtype follows the scale dtype rule of :func:`l2norm.torch.l2_normalize`
            (a float dtype no wider than the compute precision); the presets that
            promote or cast the weight themselves (``"flax"``, ``"gemma"``, ``"llama"``,
            ``"t5"``) take any float dtype, as their peer's formula does.
        dim: the normalized axis (default -1), or a tuple whose first entry is the
            channel axis.
        eps: positive finite epsilon; default 1e-6, or the preset's.
        preset: a peer's convention: ``"torch"`` (``torch.nn.RMSNorm``: eps None means
            ``torch.finfo(x.dtype).eps``), ``"keras"``, ``"flax"``, ``"llama"``,
            ``"gemma"`` or ``"t5"`` (:data:`l2norm.RMS_PRESETS`).

    Returns:
        A tensor of ``x``'s shape; its dtype is ``x``'s, or what the preset's peer gives.

    Examples:
        >>> import torch
        >>> from l2norm.torch import rms_norm
        >>> rms_norm(torch.tensor([[1.0, -1.0], [0.0, 0.0]]), torch.tensor([2.0, 3.0]), eps=1e-30)
        tensor([[ 2., -3.],
                [ 0.,  0.]])
    """
    _check_input(x)
    spec = RMSSpec.create(axis=dim, eps=eps, preset=preset)
    # A Python number stays one (weakly typed: the presets' promotions ignore it).
    weight = weight if is_python_number(weight) else _weight_tensor(weight, x)
    return spec.apply(x, weight, TORCH_OPS)


class RMSNorm(nn.Module):
    r"""Root-mean-square normalization with a learnable per-channel weight, a drop-in for
    ``torch.nn.RMSNorm(num_features)`` (same positional arguments, same ``weight``).

    $$y = w \cdot \frac{x}{\sqrt{\frac{1}{N}\sum x^2 + \epsilon}}$$

    over ``dim`` (default the last axis, ``N`` its size), computed as :func:`rms_norm`.

    Args:
        num_features: the size of the channel axis (``dim``, or its first entry).
        eps: epsilon; None takes the preset's, 1e-6 without one (``preset="torch"``:
            ``torch.finfo(x.dtype).eps`` at each call, as ``torch.nn.RMSNorm``).
        elementwise_affine: whether there is a learnable weight (else ``weight`` is None).
        dim: the normalized axis, or a tuple whose first entry is the channel axis.
        preset: a peer's convention (see :func:`rms_norm`); ``"gemma"`` starts the weight
            at 0 (the scale is ``1 + weight``), every other at 1.
        device: the weight's device (factory kwarg).
        dtype: the weight's dtype (factory kwarg).

    Examples:
        >>> import torch
        >>> from l2norm.torch import RMSNorm
        >>> norm = RMSNorm(8, preset="torch")
        >>> norm
        RMSNorm(8, dim=-1, eps=None, elementwise_affine=True, preset=torch)
        >>> y = norm(torch.randn(2, 8))
        >>> bool(torch.allclose(y.pow(2).mean(-1), torch.ones(2)))
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        elementwise_affine: bool = True,
        *,
        dim: int | Sequence[int] = -1,
        preset: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        flags = {"elementwise_affine": elementwise_affine}
        dtype = _check_layer_args("num_features", num_features, flags, dtype)
        self.spec = RMSSpec.create(axis=dim, eps=eps, preset=preset)
        self.num_features = int(num_features)
        self.normalized_shape = (self.num_features,)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    @property
    def eps(self) -> float | None:
        return self.spec.eps

    @property
    def dim(self) -> int | tuple[int, ...]:
        return self.spec.axis

    def reset_parameters(self) -> None:
        """Set the weight back to its start (1, or 0 for ``preset="gemma"``)."""
        if self.weight is not None:
            nn.init.constant_(self.weight, self.spec.convention.scale_init)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        axis = self.spec.axis if isinstance(self.spec.axis, int) else self.spec.axis[0]
        if -x.dim() <= axis < x.dim() and x.shape[axis] != self.num_features:
            raise ValueError(
                f"RMSNorm({self.num_features}) got an input of shape {tuple(x.shape)} with "
                f"{x.shape[axis]} features along dim {axis}; expected {self.num_features}"
            )
        return self.spec.apply(x, self.weight, TORCH_OPS)

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"dim={self.dim}", f"eps={self.eps}"]
        parts.append(f"elementwise_affine={self.elementwise_affine}")
        if self.spec.preset is not None:
            parts.append(f"preset={self.spec.preset}")
        return ", ".join(parts)
