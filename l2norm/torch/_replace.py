r"""Swap the L2 normalizations of an existing PyTorch model for :class:`L2Norm`, in place.

:func:`replace_peers` finds the three SSD normalizations PyTorch users already have in
their models and replaces each with an :class:`l2norm.torch.L2Norm` that computes the
same function (the peer's eps placement, through its preset) with the same weight
tensor:

* ``"ssd.pytorch"``: ssd.pytorch's ``L2Norm(n_channels, scale)`` becomes
  ``L2Norm(C, preset="ssd.pytorch")``;
* ``"mmdet"``: mmdetection's ``L2Norm(n_dims, scale, eps)`` becomes
  ``L2Norm(C, preset="mmdet")``;
* ``"torchvision"``: torchvision's ``SSDFeatureExtractorVGG`` (the backbone of
  ``ssd300_vgg16``, whose forward applies ``scale_weight`` to ``F.normalize`` inline)
  becomes an :class:`L2NormSSDFeatureExtractorVGG`, whose ``l2_norm`` child is
  ``L2Norm(C, preset="torchvision")``.

What changes is what the peers got wrong, nothing else: the gradient at an all-zero
pixel (NaN in ssd.pytorch's and mmdetection's autodiff, ``gamma * g / eps`` here) and
the overflow of the sum of squares for float16 inputs in ssd.pytorch (computed in float32
here, as mmdetection does).

The real ``torchvision`` package was not tested where this was written: its PyPI wheels
link CUDA and fail to import beside the CPU-only torch this project installs
(``operator torchvision::nms does not exist``). The torchvision case is tested against a
re-implementation of ``SSDFeatureExtractorVGG``'s documented structure and forward
(``tests/test_replace.py``); that file also tests the real ``ssd300_vgg16`` wherever
torchvision imports.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from l2norm.core.spec import PRESETS
from l2norm.torch._layer import L2Norm
from l2norm.torch._peer_layers import DEFAULT_SCALE, L2NormSSDFeatureExtractorVGG, layer_sharing

__all__ = ["KINDS", "L2NormSSDFeatureExtractorVGG", "Replacement", "replace_peers"]

#: What :func:`replace_peers` recognises; each is also the preset it gives the new layer.
KINDS: tuple[str, ...] = ("ssd.pytorch", "mmdet", "torchvision")


class Replacement(NamedTuple):
    """One module :func:`replace_peers` swapped out.

    Attributes:
        name: its qualified name in the model (as in ``model.named_modules()``).
        old_class: the class name of the module that was there.
        preset: the preset of the new :class:`L2Norm` (``"ssd.pytorch"``, ``"mmdet"`` or
            ``"torchvision"``), or None when the peer had an eps other than its
            project's default (the new layer then has ``eps_mode="add_norm"`` and that eps).
    """

    name: str
    old_class: str
    preset: str | None


# ------------------------------------------------------------------ recognition


class _Match(NamedTuple):
    kind: str
    preset: str | None
    build: Any  # () -> nn.Module


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _per_channel(value: Any) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() == 1
        and value.shape[0] >= 1
        and value.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    )


def _looks_like_l2norm(module: nn.Module) -> bool:
    """Structure of ssd.pytorch's and mmdetection's L2Norm: a leaf whose only state is a
    ``weight`` of shape (C,), with a numeric ``eps``. (torch's own BatchNorm, LayerNorm,
    GroupNorm and RMSNorm fail this: running stats, a bias, or an eps that may be None.)"""
    if isinstance(module, L2Norm) or next(module.children(), None) is not None:
        return False
    state = [n for n, _ in module.named_parameters(recurse=False)]
    state += [n for n, _ in module.named_buffers(recurse=False)]
    eps = _number(getattr(module, "eps", None))
    return state == ["weight"] and _per_channel(module.weight) and eps is not None and eps > 0


def _claims_to_be_l2norm(module: nn.Module) -> bool:
    """Whether a module that fails the behaviour probe is worth a warning: it has the
    attributes of one of the peers, or their class name (a fork that changed the maths)."""
    return type(module).__name__ == "L2Norm" or any(
        hasattr(module, name) for name in ("n_channels", "n_dims")
    )


def _probe_input(channels: int, eps: float, dtype: torch.dtype, device: Any) -> Tensor:
    """NCHW data that tells the peers' ``x / (||x|| + eps)`` apart from the other eps
    placements: ordinary pixels, an all-zero pixel, a pixel whose norm is eps (the add
    placement halves it, a clamp would not) and a large one."""
    gen = torch.Generator().manual_seed(0)
    # W=3 rather than C: a module normalizing the last axis (RMSNorm-like) then fails.
    x = torch.randn(2, channels, 2, 3, generator=gen, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0
    x[1, :, 1, 2] *= 1e3 / x[1, :, 1, 2].norm()
    # The eps pixel only where its squares stay normal numbers in the probe dtype.
    if (eps / math.sqrt(channels)) ** 2 > 16 * torch.finfo(dtype).tiny:
        x[0, :, 0, 1] *= eps / x[0, :, 0, 1].norm()
    return x.to(device=device, dtype=dtype)


def _behaves_like_add_norm(module: nn.Module, eps: float) -> bool:
    """Run a copy of ``module`` (so nothing of the model changes) with a known weight on
    the probe input and compare with ``w * x / (||x||_dim1 + eps)`` in float64."""
    weight = module.weight
    if weight.is_meta:
        return True  # nothing to run on: the structure has to do
    channels = int(weight.shape[0])
    # Half weights are probed with float32 input: the peers promote (ssd.pytorch) or
    # compute in float32 (mmdetection), and eps = 1e-10 is below float16's range.
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    x = _probe_input(channels, eps, dtype, weight.device)
    pattern = 0.5 + 0.25 * (torch.arange(channels, dtype=torch.float64) % 7)  # exact in half
    try:
        probe = copy.deepcopy(module)
        with torch.no_grad():
            probe.weight.copy_(pattern.to(weight.dtype))
            got = probe.forward(x)  # forward, not __call__: the user's hooks stay out of it
    except Exception:  # a module that cannot run this is not one of the peers
        return False
    if not isinstance(got, Tensor) or got.shape != x.shape:
        return False
    x64 = x.detach().to("cpu", torch.float64)
    want = pattern[None, :, None, None] * x64 / (x64.norm(dim=1, keepdim=True) + eps)
    return bool(torch.allclose(got.detach().to("cpu", torch.float64), want, 1e-4, 1e-5))


def _l2norm_kind(module: nn.Module) -> str:
    # Both compute the same function; their constructor arguments tell them apart.
    if hasattr(module, "n_dims") and not hasattr(module, "n_channels"):
        return "mmdet"
    return "ssd.pytorch"


def _match_l2norm(module: nn.Module) -> _Match:
    kind = _l2norm_kind(module)
    eps = float(module.eps)
    # ssd.pytorch keeps the init as `gamma`, mmdetection as `scale`: reset_parameters
    # restores what the peer's reset would.
    init = _number(getattr(module, "gamma" if kind == "ssd.pytorch" else "scale", None))
    init = DEFAULT_SCALE if init is None else init
    preset = kind if eps == PRESETS[kind][1] else None

    def build() -> nn.Module:
        layer = layer_sharing(module.weight, preset, init, eps_mode="add_norm", eps=eps)
        layer.train(module.training)
        return layer

    return _Match(kind, preset, build)


def _looks_like_torchvision(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "SSDFeatureExtractorVGG"
        and _per_channel(getattr(module, "scale_weight", None))
        and isinstance(getattr(module, "features", None), nn.Module)
        and isinstance(getattr(module, "extra", None), nn.ModuleList)
    )


def _match_torchvision(module: nn.Module) -> _Match:
    def build() -> nn.Module:
        new = L2NormSSDFeatureExtractorVGG(module.features, module.extra, module.scale_weight)
        # Not .train(): that would also reset the flags of the children it took over.
        new.training = module.training
        new.l2_norm.training = module.training
        return new

    return _Match("torchvision", "torchvision", build)


def _identify(module: nn.Module, near_misses: list[str], name: str) -> _Match | None:
    if type(module).__name__ == "SSDFeatureExtractorVGG":
        if _looks_like_torchvision(module):
            return _match_torchvision(module)
        near_misses.append(
            f"{name or '<model>'} ({type(module).__name__}): not torchvision's structure "
            "(a 1-D float scale_weight, a features module and an extra ModuleList)"
        )
        return None
    if _looks_like_l2norm(module):
        if _behaves_like_add_norm(module, float(module.eps)):
            return _match_l2norm(module)
        if _claims_to_be_l2norm(module):
            near_misses.append(
                f"{name or '<model>'} ({type(module).__name__}): has the structure of "
                "ssd.pytorch's / mmdetection's L2Norm, but its forward does not compute "
                f"weight * x / (||x||_dim1 + eps) with eps={module.eps!r}"
            )
    return None


def _parse_kinds(kinds: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if kinds is None:
        return None
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ValueError(
            f"unknown kinds {unknown if unknown else wanted!r}; expected one or more of "
            f"{list(KINDS)}, or None for all"
        )
    return wanted


def replace_peers(model: nn.Module, kinds: str | Iterable[str] | None = None) -> list[Replacement]:
    """Swap the ssd.pytorch, mmdetection and torchvision SSD normalizations in ``model``
    for :class:`L2Norm`, in place, keeping their weights and checkpoints.

    Recognised, by structure and behaviour rather than by class name alone:

    * ``"ssd.pytorch"``, ``"mmdet"``: a module without children whose only parameter
      (or buffer) is a ``weight`` of shape ``(C,)``, with a numeric ``eps``, whose
      forward on a 4-D probe input computes ``weight * x / (||x||_dim1 + eps)`` (checked
      on a copy, on data where the eps placements differ). ssd.pytorch's
      ``L2Norm(n_channels, scale)`` and mmdetection's ``L2Norm(n_dims, scale, eps)`` are
      told apart by ``n_dims``. An eps other than 1e-10 is kept (preset None, see
      :class:`Replacement`). A module that has their attributes or class name but fails
      the probe (a fork with other maths) is left alone with a warning.
    * ``"torchvision"``: a module of class ``SSDFeatureExtractorVGG`` (torchvision's
      ``ssd300_vgg16`` backbone) with a 1-D ``scale_weight``, ``features`` and an
      ``extra`` ModuleList; it becomes an :class:`L2NormSSDFeatureExtractorVGG`. Its
      forward is torchvision's and is not probed (it runs a VGG). This case was tested
      against a re-implementation of torchvision's documented structure, not the real
      package, which did not import beside the CPU-only torch where this was written.

    The new layers hold the very weight tensors of the old modules (bit for bit, and an
    optimizer built before the swap keeps training them), on their device and in their
    dtype, in the old module's train/eval mode. ``state_dict`` keys do not change
    (``L2Norm.weight``, ``neck.l2_norm.weight``, ``backbone.scale_weight``), so
    checkpoints saved before the swap load after it and the reverse. Hooks registered
    on a replaced module are not carried over.

    Args:
        model: the model to change in place; ``model`` itself is never replaced (pass
            the module that holds it).
        kinds: None (default) replaces every kind found; a kind or a list of kinds
            replaces only those, and requires each of them to be present.

    Returns:
        One :class:`Replacement` ``(name, old_class, preset)`` per replaced module, in
        ``model.named_modules()`` order (a module registered under two names counts
        twice; both names get the same new module). **Empty** when ``kinds`` is None and
        the model holds none of them: a second call on the same model returns ``[]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown kind; a kind asked for in ``kinds`` that the model does not
            hold (the message lists what was found and any near misses; nothing is
            changed); or ``model`` itself is one of the peers.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from l2norm.torch import replace_peers
        >>> class L2Norm(nn.Module):  # ssd.pytorch's layer, as its source computes it
        ...     def __init__(self, n_channels, scale):
        ...         super().__init__()
        ...         self.n_channels, self.gamma, self.eps = n_channels, scale, 1e-10
        ...         self.weight = nn.Parameter(torch.full((n_channels,), float(scale)))
        ...     def forward(self, x):
        ...         norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        ...         return self.weight[None, :, None, None] * (x / norm)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), L2Norm(8, 20))
        >>> replace_peers(model)
        [Replacement(name='2', old_class='L2Norm', preset='ssd.pytorch')]
        >>> model[2]
        L2Norm(8, dim=1, eps_mode=add_norm, eps=1e-10, preset=ssd.pytorch)
        >>> list(model.state_dict())[-1], replace_peers(model)
        ('2.weight', [])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = _parse_kinds(kinds)
    near_misses: list[str] = []
    matches: dict[int, _Match | None] = {}  # by id: a module under two names is probed once
    found: list[tuple[str, nn.Module, _Match]] = []
    other_kinds: list[str] = []  # peers of a kind not asked for, named in an error
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in matches:
            matches[id(module)] = _identify(module, near_misses, name)
        match = matches[id(module)]
        if match is None:
            continue
        if wanted is not None and match.kind not in wanted:
            other_kinds.append(f"{name or '(the model)'} ({type(module).__name__}, {match.kind})")
            continue
        if module is model:
            raise ValueError(
                f"the model itself is a {match.kind} {type(model).__name__}: replace_peers "
                "swaps submodules in place and cannot replace the object you hold; pass the "
                "module that contains it"
            )
        found.append((name, module, match))

    if wanted is not None:
        missing = [k for k in wanted if k not in {m.kind for _, _, m in found}]
        if missing:
            seen = [f"{n} ({type(m).__name__}, {t.kind})" for n, m, t in found] or ["nothing"]
            detail = f"; near misses: {'; '.join(near_misses)}" if near_misses else ""
            if other_kinds:
                detail += (
                    f"; of other kinds: {', '.join(other_kinds)} (pass kinds=None, or name "
                    "those kinds, to replace them)"
                )
            raise ValueError(
                f"replace_peers found no {' / '.join(missing)} module in "
                f"{type(model).__name__} (found: {', '.join(seen)}){detail}"
            )
    for miss in near_misses:
        warnings.warn(f"replace_peers left {miss}", stacklevel=2)

    new_modules: dict[int, nn.Module] = {}
    replaced = []
    for name, module, match in found:
        if id(module) not in new_modules:
            new_modules[id(module)] = match.build()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new_modules[id(module)])
        replaced.append(Replacement(name, type(module).__name__, match.preset))
    return replaced
