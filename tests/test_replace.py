"""l2norm.torch.replace_peers: one-line upgrades of models that use ssd.pytorch's,
mmdetection's or torchvision's SSD normalization.

The peers are written here as their published sources compute them (formulas, not their
code): ssd.pytorch's ``L2Norm(n_channels, scale)``, mmdetection's ``L2Norm(n_dims, scale,
eps)`` and a small re-implementation of torchvision's ``SSDFeatureExtractorVGG`` (its
``scale_weight`` of shape (512,) initialised to 20, ``features`` and ``extra`` children,
and a forward applying ``scale_weight.view(1, -1, 1, 1) * F.normalize(features(x))``).
The real torchvision is tested only where it imports: its PyPI wheels link CUDA and
fail to import beside the CPU torch this project installs.

Each model is deep-copied, one copy swapped, and both must agree: outputs, one training
step's loss, gradients and updated parameters (float32 bounds below), ``state_dict`` keys
and values both ways; except at an all-zero pixel, where the peers' autodiff gives NaN and
the swapped layer the finite ``gamma * g / eps``.
"""

from __future__ import annotations

import copy
import doctest
import pickle
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2norm.torch import L2Norm, _replace, replace_peers
from l2norm.torch._replace import L2NormSSDFeatureExtractorVGG, Replacement

# Bound on max |swapped - peer| / max |peer| for float32 outputs, gradients and updated
# parameters. The two differ only inside the normalization (a few float32 ULPs from the
# order of the operations), carried through a 3x3 convolution over 64 channels; measured
# at most 3e-7 for all three models. A permuted, lost or detached weight is off by O(1).
# The eps placement shows only for tiny norms, which the convolutions here do not produce:
# test_the_layer_matches_the_peer_where_eps_placements_differ checks it on such data.
BOUND = 1e-5
C, C_IN, C_OUT = 64, 8, 4
TV_CHANNELS = 512  # torchvision's scale_weight is (512,)


# ------------------------------------------------------------------ the peers, as formulas


class ssd_pytorch:  # noqa: N801  (a namespace, so that the class is called L2Norm as there)
    class L2Norm(nn.Module):
        """ssd.pytorch layers/modules/l2norm.py: ``weight * (x / (||x|| + 1e-10))``, dim 1."""

        def __init__(self, n_channels: int, scale: float) -> None:
            super().__init__()
            self.n_channels = n_channels
            self.gamma = scale or None
            self.eps = 1e-10
            self.weight = nn.Parameter(torch.empty(n_channels))
            nn.init.constant_(self.weight, self.gamma)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
            return self.weight.view(1, -1, 1, 1).expand_as(x) * (x / norm)


class mmdet:  # noqa: N801
    class L2Norm(nn.Module):
        """mmdetection's SSD L2Norm: ``(weight * x) / (||x|| + eps)`` computed in float32,
        cast back to the input's dtype. (mmdetection fills the weight with ``scale`` in the
        neck's init_weights; done here in the constructor.)"""

        def __init__(self, n_dims: int, scale: float = 20.0, eps: float = 1e-10) -> None:
            super().__init__()
            self.n_dims = n_dims
            self.weight = nn.Parameter(torch.full((n_dims,), float(scale)))
            self.eps = eps
            self.scale = scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x32 = x.float()
            norm = x32.pow(2).sum(1, keepdim=True).sqrt() + self.eps
            return (self.weight[None, :, None, None].float() * x32 / norm).type_as(x)


class SSDFeatureExtractorVGG(nn.Module):
    """torchvision.models.detection.ssd.SSDFeatureExtractorVGG's structure and forward,
    with a one-convolution ``features`` instead of VGG16 up to conv4_3."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_weight = nn.Parameter(torch.ones(TV_CHANNELS) * 20)
        self.features = nn.Sequential(nn.Conv2d(3, TV_CHANNELS, 3, padding=1), nn.ReLU(True))
        self.extra = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(TV_CHANNELS, 32, 3, stride=2, padding=1), nn.ReLU(True)),
                nn.Sequential(nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.ReLU(True)),
            ]
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.features(x)
        rescaled = self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)
        output = [rescaled]
        for block in self.extra:
            x = block(x)
            output.append(x)
        return OrderedDict([(str(i), v) for i, v in enumerate(output)])


# ------------------------------------------------------------------ small models


def zero_pixel_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3x3 convolution whose biases are all negative: a zero input patch gives an
    all-zero pixel after the ReLU, as in a real network."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(-conv.bias.abs() - 0.01)
    return conv


class SsdPytorchHead(nn.Module):
    """conv -> ReLU -> L2Norm -> conv, the L2Norm at ssd.pytorch's attribute name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = zero_pixel_conv(C_IN, C)
        self.L2Norm = ssd_pytorch.L2Norm(C, 20)
        self.conv2 = nn.Conv2d(C, C_OUT, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.L2Norm(torch.relu(self.conv1(x))))


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l2_norm = mmdet.L2Norm(C, 20.0)


class MmdetHead(nn.Module):
    """The L2Norm at mmdetection's place, ``neck.l2_norm``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = zero_pixel_conv(C_IN, C)
        self.neck = Neck()
        self.conv2 = nn.Conv2d(C, C_OUT, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.neck.l2_norm(torch.relu(self.conv1(x))))


class TinySSD(nn.Module):
    """torchvision's SSD keeps the extractor as ``backbone`` and reads its feature dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SSDFeatureExtractorVGG()
        with torch.no_grad():
            self.backbone.features[0].bias.copy_(-self.backbone.features[0].bias.abs() - 0.01)
        self.head = nn.ModuleList(
            [nn.Conv2d(ch, C_OUT, 3, padding=1) for ch in (TV_CHANNELS, 32, 16)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return torch.cat(
            [h(f).flatten(1) for h, f in zip(self.head, feats.values(), strict=True)], 1
        )


def norm_of(model: nn.Module) -> nn.Module:
    """The normalization module: the peer before the swap, the L2Norm after."""
    if isinstance(model, SsdPytorchHead):
        return model.L2Norm
    if isinstance(model, MmdetHead):
        return model.neck.l2_norm
    return model.backbone


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Scales away from their init (5 to 30), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("L2Norm.weight", "l2_norm.weight", "scale_weight")):
                p.copy_(torch.rand(p.shape, generator=gen) * 25 + 5)
    return model


def model_input(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """A batch with a zero 3x3 patch around (0, 3, 3): one all-zero pixel at the norm."""
    c = 3 if isinstance(model, TinySSD) else C_IN
    x = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[0, :, 2:5, 2:5] = 0.0
    return x


MODELS = {
    "ssd.pytorch": (lambda: trained_like(SsdPytorchHead(), 1), "L2Norm", "L2Norm"),
    "mmdet": (lambda: trained_like(MmdetHead(), 2), "neck.l2_norm", "L2Norm"),
    "torchvision": (lambda: trained_like(TinySSD(), 3), "backbone", "SSDFeatureExtractorVGG"),
}


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-30)
    return float((got.double() - want.double()).abs().max() / scale)


# ------------------------------------------------------------------ what replace_peers does


@pytest.mark.parametrize("kind", list(MODELS))
def test_returns_what_it_replaced_and_keeps_the_weight_tensor(kind):
    build, name, old_class = MODELS[kind]
    model = build()
    peer = norm_of(model)
    weight = peer.scale_weight if kind == "torchvision" else peer.weight
    bits = weight.detach().clone()

    replaced = replace_peers(model)

    assert replaced == [(name, old_class, kind)]
    assert replaced == [Replacement(name=name, old_class=old_class, preset=kind)]
    new = model.get_submodule(name)
    layer = new.l2_norm if kind == "torchvision" else new
    assert isinstance(layer, L2Norm)
    assert layer.spec.preset == kind and layer.spec.axis == 1
    # The very Parameter: bit for bit, and an optimizer built before the swap still has it.
    assert layer.weight is weight and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, bits)
    if kind == "torchvision":
        assert isinstance(new, L2NormSSDFeatureExtractorVGG)
        assert new.scale_weight is weight
        assert new.features is peer.features and new.extra is peer.extra
    assert replace_peers(model) == []  # nothing left to replace


@pytest.mark.parametrize("kind", list(MODELS))
def test_outputs_and_one_training_step_are_unchanged(kind):
    build, _, _ = MODELS[kind]
    peer_model = build()
    model = copy.deepcopy(peer_model)
    replace_peers(model)
    x = model_input(model)
    target = torch.randn(peer_model(x).shape, generator=torch.Generator().manual_seed(9))

    results = {}
    for label, m in (("peer", peer_model), ("swapped", model)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        out = m(x)
        loss = F.mse_loss(out, target)
        loss.backward()
        # By state_dict key with keep_vars: the same names before and after the swap.
        params = m.state_dict(keep_vars=True)
        grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
        opt.step()
        results[label] = (out.detach(), loss.detach(), grads, m.state_dict(), m(x).detach())

    p_out, p_loss, p_grads, p_state, p_out2 = results["peer"]
    s_out, s_loss, s_grads, s_state, s_out2 = results["swapped"]
    assert torch.isfinite(p_out).all() and torch.isfinite(s_out).all()
    assert relative(s_out, p_out) <= BOUND
    assert relative(s_loss, p_loss) <= BOUND
    assert list(s_grads) == list(p_grads) and len(p_grads) == len(list(model.parameters()))
    for key in p_grads:
        assert torch.isfinite(s_grads[key]).all(), key
        assert relative(s_grads[key], p_grads[key]) <= BOUND, key
    for key in p_state:
        assert relative(s_state[key], p_state[key]) <= BOUND, key
    assert relative(s_out2, p_out2) <= BOUND


def eps_data(channels: int) -> torch.Tensor:
    """Pixels with norms 0, 1e-13 ... 1e4: on both sides of every peer's eps threshold,
    so that any other eps placement or eps value shows (a convolution's output in a
    model seldom goes there)."""
    x = torch.randn(1, channels, 3, 3, generator=torch.Generator().manual_seed(5))
    norms = [0.0, 1e-13, 1e-11, 1e-10, 3e-10, 1e-9, 1e-7, 1.0, 1e4]
    for i, target in enumerate(norms):
        pixel = x[0, :, i // 3, i % 3]
        x[0, :, i // 3, i % 3] = pixel / pixel.norm() * target
    return x


def layer_pair(kind: str, peer_model: nn.Module, model: nn.Module):
    """(peer's normalization, swapped normalization) as functions of the norm's input."""
    if kind == "torchvision":
        backbone = peer_model.backbone
        return (
            lambda z: backbone.scale_weight.view(1, -1, 1, 1) * F.normalize(z),
            model.backbone.l2_norm,
        )
    name = MODELS[kind][1]
    return peer_model.get_submodule(name), model.get_submodule(name)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_layer_matches_the_peer_where_eps_placements_differ(kind):
    peer_model = MODELS[kind][0]()
    model = copy.deepcopy(peer_model)
    replace_peers(model)
    peer, layer = layer_pair(kind, peer_model, model)
    z = eps_data(TV_CHANNELS if kind == "torchvision" else C)
    want = peer(z).detach()
    # A few float32 roundings apart (measured: 2 ULPs for ssd.pytorch and mmdetection,
    # 6 ULPs or 4.2e-7 relative for torchvision, whose norm sums 512 squares).
    torch.testing.assert_close(layer(z).detach(), want, rtol=1e-6, atol=0)
    # The data tells the placements apart: the other peer's preset is far off.
    other = L2Norm(z.shape[1], preset="ssd.pytorch" if kind == "torchvision" else "torchvision")
    with torch.no_grad():
        other.weight.copy_(layer.weight)
    assert relative(other(z).detach(), want) > 0.1


@pytest.mark.parametrize("kind", list(MODELS))
def test_state_dicts_load_both_ways(kind):
    build, _, _ = MODELS[kind]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_peers(model)
    after = model.state_dict()

    assert list(after) == list(before)  # the same keys, in the same order
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key

    # A checkpoint saved before the swap loads after it (strict), values and all.
    fresh = build()
    trained_like(fresh, 11)
    swapped = copy.deepcopy(fresh)
    replace_peers(swapped)
    assert not torch.equal(swapped.state_dict()[key_of(kind)], before[key_of(kind)])
    swapped.load_state_dict(before)
    for key, value in swapped.state_dict().items():
        assert torch.equal(value, before[key]), key

    # And a checkpoint saved after the swap loads into the unswapped model.
    fresh.load_state_dict(after)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, after[key]), key


def key_of(kind: str) -> str:
    return {
        "ssd.pytorch": "L2Norm.weight",
        "mmdet": "neck.l2_norm.weight",
        "torchvision": "backbone.scale_weight",
    }[kind]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchvision_checkpoint_with_the_child_key_loads_and_the_model_pickles():
    model = MODELS["torchvision"][0]()
    replace_peers(model)
    sd = model.state_dict()
    renamed = OrderedDict(
        (k.replace("backbone.scale_weight", "backbone.l2_norm.weight"), v.clone() * 2)
        for k, v in sd.items()
    )
    assert model.load_state_dict(renamed).missing_keys == []
    assert torch.equal(model.backbone.l2_norm.weight, sd["backbone.scale_weight"])
    assert dict(model.named_parameters())["backbone.l2_norm.weight"] is model.backbone.scale_weight
    x = model_input(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(clone.state_dict()) == list(sd)
        assert clone.backbone.scale_weight is clone.backbone.l2_norm.weight
        assert torch.equal(clone(x), model(x))
    scripted = torch.jit.script(model.backbone)
    assert torch.equal(scripted(x)["0"], model.backbone(x)["0"])


# ------------------------------------------------------------------ the zero pixel


@pytest.mark.parametrize("kind", ["ssd.pytorch", "mmdet"])
def test_zero_pixel_gradient_is_finite_after_the_swap_and_nan_before(kind):
    build, name, _ = MODELS[kind]
    peer_model = build()
    model = copy.deepcopy(peer_model)
    replace_peers(model)
    x = model_input(model)
    seen = {}

    def keep_input(label):
        def hook(module, inputs, output):
            inputs[0].retain_grad()
            seen[label] = inputs[0]

        return hook

    for label, m in (("peer", peer_model), ("swapped", model)):
        m.get_submodule(name).register_forward_hook(keep_input(label))
        m(x).sum().backward()
    peer_in, new_in = seen["peer"], seen["swapped"]
    assert (peer_in[0, :, 3, 3] == 0).all()  # the all-zero pixel reaching the norm
    assert torch.isnan(peer_in.grad[0, :, 3, 3]).all()  # the peer's autodiff
    assert torch.isfinite(new_in.grad).all()
    # Both pass the ReLU, which kills the pixel's gradient: the parameters agree.
    for (key, p), q in zip(peer_model.named_parameters(), model.parameters(), strict=True):
        assert torch.isfinite(p.grad).all() and relative(q.grad, p.grad) <= BOUND, key

    # On the layer alone: the peer's gradient at the zero pixel is NaN, the swapped
    # layer's is gamma * g / eps (g = 1 here), the limit the add_norm formula has there.
    peer, layer = peer_model.get_submodule(name), model.get_submodule(name)
    z = torch.randn(1, C, 2, 2)
    z[0, :, 0, 0] = 0.0
    grads = []
    for m in (peer, layer):
        zz = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(zz).sum(), zz)
        grads.append(g)
    assert torch.isnan(grads[0][0, :, 0, 0]).all()
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1][0, :, 0, 0], layer.weight.detach() / 1e-10)
    torch.testing.assert_close(grads[1][0, :, 1:], grads[0][0, :, 1:])


def test_torchvision_zero_pixel_gradient_is_finite_both_ways():
    # F.normalize clamps the norm: torchvision's own gradient is finite there too.
    peer_model = MODELS["torchvision"][0]()
    model = copy.deepcopy(peer_model)
    replace_peers(model)
    for m in (peer_model, model):
        z = torch.zeros(1, TV_CHANNELS, 2, 2)
        z[0, :, 1, 1] = 1.0
        z.requires_grad_(True)
        out = m.backbone.scale_weight.view(1, -1, 1, 1) * F.normalize(z)
        if m is model:
            out = m.backbone.l2_norm(z)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert torch.isfinite(g).all()


def test_mmdet_half_inputs_match_its_float32_computation():
    peer = trained_like(MmdetHead(), 4).half()
    model = copy.deepcopy(peer)
    replace_peers(model)
    x = torch.randn(2, C, 4, 4, dtype=torch.float16) * 30  # sum of squares overflows float16
    got = model.neck.l2_norm(x)
    want = peer.neck.l2_norm(x)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    # Both compute in float32 and round once to float16: equal to 1 float16 ULP.
    torch.testing.assert_close(got, want, rtol=2**-10, atol=0)


# ------------------------------------------------------------------ recognition


def test_recognition_is_by_structure_and_behaviour_not_the_class_name():
    class Normalize2d(nn.Module):  # a fork of ssd.pytorch's layer under another name
        def __init__(self) -> None:
            super().__init__()
            self.n_channels, self.gamma, self.eps = 16, 10.0, 1e-10
            self.weight = nn.Parameter(torch.full((16,), 10.0))

        def forward(self, x):
            return self.weight[None, :, None, None] * x / (x.norm(dim=1, keepdim=True) + 1e-10)

    class ClampingFork(ssd_pytorch.L2Norm):  # ssd.pytorch's name, but it clamps the norm
        def forward(self, x):
            return self.weight[None, :, None, None] * F.normalize(x)

    ClampingFork.__name__ = "L2Norm"
    model = nn.Sequential(Normalize2d(), nn.Sequential(ClampingFork(16, 20)))
    with pytest.warns(UserWarning, match=r"left 1\.0 \(L2Norm\).*does not compute"):
        assert replace_peers(model) == [("0", "Normalize2d", "ssd.pytorch")]
    assert isinstance(model[0], L2Norm) and isinstance(model[1][0], ClampingFork)
    assert model[0].spec.preset == "ssd.pytorch"
    assert model[0]._scale_init[0] == 10.0  # reset_parameters restores the peer's gamma
    with pytest.raises(ValueError, match=r"found no ssd\.pytorch.*near misses: 1\.0"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replace_peers(model, kinds="ssd.pytorch")


def test_torch_normalization_layers_are_left_alone_untouched():
    bn = nn.BatchNorm2d(C)
    model = nn.Sequential(
        bn,
        nn.LayerNorm(C),
        nn.GroupNorm(4, C),
        nn.InstanceNorm2d(C, affine=True),
        nn.RMSNorm(C, eps=1e-6),
        nn.Conv2d(C, C, 1),
        L2Norm(C),
    )
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert replace_peers(model) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # no running-stat update from a probe
    assert bn.num_batches_tracked == 0


def test_mmdet_with_its_own_eps_keeps_it():
    model = nn.Sequential(nn.ReLU(), mmdet.L2Norm(C, scale=8.0, eps=1e-6))
    peer = copy.deepcopy(model)
    assert replace_peers(model) == [("1", "L2Norm", None)]
    layer = model[1]
    assert (layer.spec.eps_mode, layer.spec.eps, layer.spec.preset) == ("add_norm", 1e-6, None)
    x = torch.randn(2, C, 3, 3)
    x[0, :, 0, 0] *= 1e-6 / x[0, :, 0, 0].norm()  # where eps shows
    torch.testing.assert_close(model(x), peer(x), rtol=1e-6, atol=0)
    assert layer._scale_init[0] == 8.0


def test_kinds_train_mode_and_shared_modules():
    norm = ssd_pytorch.L2Norm(C, 20)
    model = nn.Module()
    model.a = norm
    model.b = nn.Sequential(norm)  # the same module under two names
    model.ssd = TinySSD()
    model.eval()
    assert replace_peers(model, kinds=["torchvision"]) == [
        ("ssd.backbone", "SSDFeatureExtractorVGG", "torchvision")
    ]
    assert model.a is norm and not model.ssd.backbone.training
    assert not model.ssd.backbone.l2_norm.training
    assert replace_peers(model, kinds="ssd.pytorch") == [
        ("a", "L2Norm", "ssd.pytorch"),
        ("b.0", "L2Norm", "ssd.pytorch"),
    ]
    assert model.a is model.b[0] and isinstance(model.a, L2Norm) and not model.a.training


def test_errors_are_clear():
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got Tensor"):
        replace_peers(torch.ones(3))
    with pytest.raises(ValueError, match=r"unknown kinds \['caffe'\]"):
        replace_peers(nn.ReLU(), kinds=["ssd.pytorch", "caffe"])
    with pytest.raises(ValueError, match="unknown kinds"):
        replace_peers(nn.ReLU(), kinds=[])
    with pytest.raises(ValueError, match="model itself is a ssd.pytorch L2Norm"):
        replace_peers(ssd_pytorch.L2Norm(4, 20))
    model = SsdPytorchHead()
    found = r"found no mmdet module in SsdPytorchHead \(found: L2Norm \(L2Norm, ssd\.pytorch\)\)"
    with pytest.raises(ValueError, match=found):
        replace_peers(model, kinds=("ssd.pytorch", "mmdet"))
    assert isinstance(model.L2Norm, ssd_pytorch.L2Norm)  # nothing changed
    with pytest.raises(ValueError, match=r"no torchvision module in Sequential \(found: nothing"):
        replace_peers(nn.Sequential(nn.ReLU()), kinds="torchvision")


def test_docstring_examples():
    result = doctest.testmod(_replace, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ the real torchvision


def test_real_torchvision_ssd300_vgg16():
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as err:
        # The only skip allowed here. When torchvision imports, this test must pass.
        pytest.skip(
            f"torchvision does not import here ({type(err).__name__}: {err}); its PyPI "
            "wheels link CUDA and fail beside a CPU-only torch ('operator torchvision::nms "
            "does not exist'), so the torchvision case is tested on SSDFeatureExtractorVGG's "
            "re-implementation above"
        )
    model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None)
    peer = copy.deepcopy(model).eval()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_peers(model) == [("backbone", "SSDFeatureExtractorVGG", "torchvision")]
    assert list(model.state_dict()) == list(before)
    model.load_state_dict(before)
    peer.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        got, want = model.backbone(x), peer.backbone(x)
    assert list(got) == list(want)
    for key in want:
        assert relative(got[key], want[key]) <= BOUND, key


def test_asking_for_a_kind_the_model_lacks_names_the_kinds_it_holds():
    model = nn.Sequential(nn.Conv2d(3, C, 3), ssd_pytorch.L2Norm(C, 20))
    with pytest.raises(
        ValueError, match=r"no mmdet module.*of other kinds: 1 \(L2Norm, ssd\.pytorch\)"
    ):
        replace_peers(model, kinds="mmdet")
    assert isinstance(model[1], ssd_pytorch.L2Norm)  # nothing changed
