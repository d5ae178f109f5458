"""Model-level parity: one small SSD-like head in PyTorch (NCHW), Keras (NHWC) and Flax NNX
(NHWC), the L2Norm ported from the PyTorch model by :mod:`l2norm.convert` and the
convolution kernels transposed here. Outputs and input gradients are measured against
the same PyTorch model in float64.

The head is ``conv3x3(64 -> 256) -> ReLU -> L2Norm (ssd.pytorch preset) -> conv3x3(256 -> 16)``.
The first convolution's bias is negative and the input has a zero 3x3 patch, so one
pixel reaching the L2Norm is all zeros: ssd.pytorch's own formula has a NaN input gradient
there, l2norm a finite one (killed by the ReLU, as it should be).

Runs under the ``keras`` marker, so once per Keras backend (tensorflow, jax, torch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch
from flax import nnx
from keras import ops

from l2norm import convert
from l2norm.keras import L2Norm as KerasL2Norm  # noqa: F401  (registers the layer)
from l2norm.torch import L2Norm

pytestmark = pytest.mark.keras

C_IN, C_MID, C_OUT, H, W, N = 64, 256, 16, 8, 8, 2
ZERO_PIXEL = (0, 3, 3)  # (n, h, w) at the centre of the input's zero patch

# Bounds on max |float32 result - float64 result| / max |float64 result|, for the output
# and for the input gradient (a float32 eps is 1.19e-7; the convolutions sum 576 and 2304
# products per output). Measured: torch 3.1e-7 / 2.8e-7, nnx 5.2e-7 / 4.9e-7, Keras on
# jax 5.0e-7 / 4.7e-7, on tensorflow 8.8e-7 / 1.1e-6, on torch 9.3e-7 / 1.1e-6 (oneDNN's
# convolution algorithms). The bound leaves ~10x; a mis-ported weight, a permuted scale
# or a wrong layout is off by O(1).
OUTPUT_BOUND = 1e-5
GRAD_BOUND = 1e-5


class TorchHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(C_IN, C_MID, 3, padding=1)
        self.norm = L2Norm(C_MID, preset="ssd.pytorch")
        self.conv2 = torch.nn.Conv2d(C_MID, C_OUT, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(torch.relu(self.conv1(x))))


class NnxHead(nnx.Module):
    def __init__(self, norm: nnx.Module) -> None:
        rngs = nnx.Rngs(0)
        self.conv1 = nnx.Conv(C_IN, C_MID, (3, 3), padding="SAME", rngs=rngs)
        self.norm = norm
        self.conv2 = nnx.Conv(C_MID, C_OUT, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(self.norm(nnx.relu(self.conv1(x))))


def nchw_kernel_to_hwio(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().numpy().transpose(2, 3, 1, 0)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def torch_head():
    torch.manual_seed(0)
    head = TorchHead()
    with torch.no_grad():
        head.conv1.bias.copy_(-head.conv1.bias.abs() - 1e-3)
        head.norm.weight.uniform_(10.0, 30.0)
    x = torch.randn(N, C_IN, H, W)
    n, h, w = ZERO_PIXEL
    x[n, :, h - 1 : h + 2, w - 1 : w + 2] = 0.0
    g = torch.randn(N, C_OUT, H, W)
    return head, x, g


@pytest.fixture(scope="module")
def truth(torch_head):
    """Output and input gradient of the same model in float64 (NCHW)."""
    head, x, g = torch_head
    head64 = TorchHead().double()
    head64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    return run_torch(head64, x.double(), g.double())


def run_torch(head, x, g):
    x = x.clone().requires_grad_(True)
    y = head(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach().numpy(), dx.numpy()


def keras_head(head: TorchHead) -> keras.Model:
    params = convert.from_torch(head.norm)
    model = keras.Sequential(
        [
            keras.Input((H, W, C_IN)),
            keras.layers.Conv2D(C_MID, 3, padding="same"),
            keras.layers.ReLU(),
            convert.to_keras(params, input_shape=(None, H, W, C_MID)),
            keras.layers.Conv2D(C_OUT, 3, padding="same"),
        ]
    )
    for layer, conv in ((model.layers[0], head.conv1), (model.layers[3], head.conv2)):
        layer.set_weights([nchw_kernel_to_hwio(conv.weight), conv.bias.detach().numpy()])
    return model


def nnx_head(head: TorchHead) -> NnxHead:
    model = NnxHead(convert.to_nnx(convert.from_torch(head.norm)))
    for conv, source in ((model.conv1, head.conv1), (model.conv2, head.conv2)):
        conv.kernel.set_value(jnp.asarray(nchw_kernel_to_hwio(source.weight)))
        conv.bias.set_value(jnp.asarray(source.bias.detach().numpy()))
    return model


def keras_output_and_input_grad(model: keras.Model, x: np.ndarray, g: np.ndarray):
    backend = keras.backend.backend()
    xt, gt = ops.convert_to_tensor(x), ops.convert_to_tensor(g)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = model(xt)
        dx = tape.gradient(y, xt, output_gradients=gt)
    elif backend == "jax":
        y, pullback = jax.vjp(lambda v: model(v), xt)
        (dx,) = pullback(gt)
    else:
        xt = xt.detach().requires_grad_(True)
        y = model(xt)
        (dx,) = torch.autograd.grad(y, xt, gt)
    return ops.convert_to_numpy(y), ops.convert_to_numpy(dx)


def nnx_output_and_input_grad(model: NnxHead, x: np.ndarray, g: np.ndarray):
    y, pullback = jax.vjp(lambda v: model(v), jnp.asarray(x))
    (dx,) = pullback(jnp.asarray(g))
    return np.asarray(y), np.asarray(dx)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and np.isfinite(got).all()
    return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


def test_the_head_has_an_all_zero_pixel_at_the_l2norm(torch_head):
    head, x, _ = torch_head
    hidden = torch.relu(head.conv1(x))
    n, h, w = ZERO_PIXEL
    assert (hidden[n, :, h, w] == 0).all()


@pytest.fixture(scope="module")
def results(torch_head):
    """Each framework's float32 output and input gradient, NCHW, computed once."""
    head, x, g = torch_head
    xs, gs = nhwc(x.numpy()), nhwc(g.numpy())
    out = {"torch": run_torch(head, x, g)}
    out["keras"] = keras_output_and_input_grad(keras_head(head), xs, gs)
    out["nnx"] = nnx_output_and_input_grad(nnx_head(head), xs, gs)
    for name in ("keras", "nnx"):
        out[name] = tuple(a.transpose(0, 3, 1, 2) for a in out[name])
    return out


@pytest.mark.parametrize("framework", ["torch", "keras", "nnx"])
def test_outputs_and_input_gradients_agree_with_the_float64_model(framework, results, truth):
    y, dx = results[framework]
    y64, dx64 = truth
    assert y.dtype == np.float32 and dx.dtype == np.float32
    out_err, grad_err = relative_error(y, y64), relative_error(dx, dx64)
    assert out_err <= OUTPUT_BOUND, f"{framework}: output error {out_err:.3g}"
    assert grad_err <= GRAD_BOUND, f"{framework}: input-gradient error {grad_err:.3g}"


def test_the_three_frameworks_agree_with_each_other(results):
    y_ref, dx_ref = (a.astype(np.float64) for a in results["torch"])
    for name in ("keras", "nnx"):
        y, dx = results[name]
        # Twice the bound against float64: both sides may err in opposite directions.
        assert relative_error(y, y_ref) <= 2 * OUTPUT_BOUND, f"{name} vs torch output"
        assert relative_error(dx, dx_ref) <= 2 * GRAD_BOUND, f"{name} vs torch gradient"


def test_a_misported_scale_is_caught(torch_head, truth):
    # The bound is tight enough to see a scale loaded in the wrong channel order.
    head, x, g = torch_head
    params = convert.from_torch(head.norm)
    reversed_params = convert.L2NormParams(
        params.scale[::-1].copy(), params.eps, params.eps_mode, params.preset
    )
    model = nnx_head(head)
    model.norm = convert.to_nnx(reversed_params)
    y, _ = nnx_output_and_input_grad(model, nhwc(x.numpy()), nhwc(g.numpy()))
    assert relative_error(y.transpose(0, 3, 1, 2), truth[0]) > 100 * OUTPUT_BOUND
