"""The layers :func:`~l2norm.torch.replace_peers` puts in place of a peer's: an
:class:`~l2norm.torch.L2Norm` sharing the peer's weight tensor, and the torchvision SSD
backbone whose inline normalization becomes such a layer."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from l2norm.torch._layer import L2Norm

__all__ = ["L2NormSSDFeatureExtractorVGG", "layer_sharing"]

# The peers' own defaults for the scale a reset restores (both projects use 20, SSD's value).
DEFAULT_SCALE = 20.0


class L2NormSSDFeatureExtractorVGG(nn.Module):
    """torchvision's ``SSDFeatureExtractorVGG`` with its inline normalization as an
    :class:`L2Norm` child (``l2_norm``, preset ``"torchvision"``).

    Built by :func:`replace_peers` from the torchvision module: it takes over that
    module's ``features`` and ``extra`` children (the same objects) and its
    ``scale_weight`` parameter (the same tensor, now ``l2_norm.weight``), and its forward
    is torchvision's with ``scale_weight.view(1, -1, 1, 1) * F.normalize(x)`` replaced
    by ``l2_norm(x)``.

    The ``state_dict`` keeps torchvision's keys in torchvision's order
    (``scale_weight``, ``features.*``, ``extra.*``), so torchvision checkpoints load
    into it and its checkpoints load into torchvision; a ``state_dict`` holding
    ``l2_norm.weight`` loads too. ``named_parameters()`` says ``l2_norm.weight``, and
    ``scale_weight`` stays readable as an attribute (the same tensor).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> features = nn.Conv2d(3, 8, 3, padding=1)
        >>> extra = nn.ModuleList([nn.Conv2d(8, 4, 3, stride=2, padding=1)])
        >>> backbone = L2NormSSDFeatureExtractorVGG(features, extra, torch.ones(8) * 20)
        >>> [k for k in backbone.state_dict()][:2]
        ['scale_weight', 'features.weight']
        >>> {k: tuple(v.shape) for k, v in backbone(torch.randn(1, 3, 8, 8)).items()}
        {'0': (1, 8, 8, 8), '1': (1, 4, 4, 4)}
    """

    # TorchScript would otherwise try to compile the read-only alias below.
    __jit_unused_properties__ = ["scale_weight"]

    def __init__(self, features: nn.Module, extra: nn.ModuleList, scale_weight: Tensor) -> None:
        super().__init__()
        self.features = features
        self.l2_norm = layer_sharing(scale_weight, "torchvision", scale_init=DEFAULT_SCALE)
        self.extra = extra
        # Saving writes scale_weight itself (_save_to_state_dict, so it comes first, where
        # torchvision has it); this hook then drops the child's copy of the same tensor.
        self.register_state_dict_post_hook(_drop_child_weight)

    @property
    def scale_weight(self) -> Tensor:
        """torchvision's name for the scale: the same tensor as ``l2_norm.weight``."""
        return self.l2_norm.weight

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # torchvision's SSDFeatureExtractorVGG.forward, with its normalization swapped.
        x = self.features(x)
        output = [self.l2_norm(x)]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(output)])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.l2_norm.weight
        destination[prefix + "scale_weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Renamed before the children load: nn.Module.load_state_dict hands each child
        # the keys of this very dict that start with the child's prefix.
        old, new = prefix + "scale_weight", prefix + "l2_norm.weight"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _drop_child_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any):
    # A module-level function (not a closure) so that the model still pickles.
    state_dict.pop(prefix + "l2_norm.weight", None)


def layer_sharing(weight: Tensor, preset: str | None, scale_init: float, **options) -> L2Norm:
    """An L2Norm (dim=1) whose weight is ``weight`` itself, not a copy: the bits are
    trivially the same, and an optimizer built before the swap still updates it."""
    kwargs = {"preset": preset} if preset is not None else options
    layer = L2Norm(
        int(weight.shape[0]),
        dim=1,
        scale_init=scale_init,
        learnable=isinstance(weight, nn.Parameter),
        device=weight.device,
        dtype=weight.dtype,
        **kwargs,
    )
    # nn.Module.__setattr__ re-registers a Parameter as a parameter and a plain tensor as
    # the buffer L2Norm(learnable=False) declared.
    layer.weight = weight
    return layer
