"""float16 training with exactly-zero pixels reaching the normalization unmasked.

A small SSD-like model, ``conv -> L2Norm -> head``, on zero-padded images: the first
convolution (no bias) gives exactly-zero pixels in the padded band, and nothing between
it and the normalization masks their gradient (no ReLU). Under float16 autocast with
``torch.amp.GradScaler`` (on the CPU here), the exact input gradient at such a pixel,
``scale * g / eps``, is far above float16's largest value: l2norm saturates it at 65504
(``l2norm.reference.saturate``), so the scaler keeps its scale and the loss goes down.
The peers' idioms, run through the same loop, produce NaN (eps rounds to 0 in float16, or
autodiff of ``sqrt`` at 0), so every step is skipped and the scale collapses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2norm.torch import L2Norm

STEPS = 30


class TorchvisionIdiom(nn.Module):  # scale_weight.view(1, -1, 1, 1) * F.normalize(x)
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), 20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.weight.view(1, -1, 1, 1)


class SSDPytorchIdiom(nn.Module):  # x / (sqrt(sum x**2) + 1e-10) * weight
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), 20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


class MMDetIdiom(SSDPytorchIdiom):  # the same in float32 for half inputs, cast back
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


NORMS = {
    "l2norm": L2Norm,
    "torchvision": TorchvisionIdiom,
    "ssd.pytorch": SSDPytorchIdiom,
    "mmdet": MMDetIdiom,
}


def train(norm: str) -> tuple[list[float], int, float, torch.Tensor]:
    """``(losses, skipped steps, final loss scale, gradient at a zero pixel)``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), NORMS[norm](16), nn.Conv2d(16, 4, 1)
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 12, 12, generator=gen)
    x[:, :, :4, :] = 0.0  # the padded band: the first convolution gives exact zeros there
    target = torch.randn(8, 4, 12, 12, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    losses, skipped = [], 0
    for _ in range(STEPS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            hidden = model[0](x)
            hidden.retain_grad()
            loss = F.mse_loss(model[2](model[1](hidden)).float(), target)
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
        losses.append(loss.item())
    assert hidden.dtype == torch.float16 and bool((hidden[:, :, 1, 5] == 0).all())
    return losses, skipped, scaler.get_scale(), hidden.grad[:, :, 1, 5]


def test_l2norm_trains_in_float16_with_zero_pixels():
    losses, skipped, scale, zero_pixel_grad = train("l2norm")
    # The loss goes down and the scaler settles (a couple of steps halve the initial
    # 65536 scale, as for any model); the zero pixels' gradient is finite, saturated.
    assert losses[-1] < 0.25 * losses[0], losses
    assert skipped <= 3 and scale >= 2.0**12, (skipped, scale)
    assert torch.isfinite(zero_pixel_grad).all()
    assert zero_pixel_grad.abs().max() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("peer", ["torchvision", "ssd.pytorch", "mmdet"])
def test_the_peers_idioms_fail_the_same_loop(peer):
    losses, skipped, scale, _ = train(peer)
    # NaN or Inf in every step: every update skipped, the scale halved to nothing.
    assert skipped == STEPS and scale < 1.0, (peer, skipped, scale)
    assert not losses[-1] < losses[0], losses
