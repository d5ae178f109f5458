"""l2norm.convert: bitwise round trips between every pair of formats, and imports from
the peers' conventions that reproduce each peer's own formula.

The Keras rows carry the ``keras`` marker (they run once per Keras backend); the rest
run in the plain process.
"""

from __future__ import annotations

import doctest
import itertools
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from l2norm import conformance, convert
from l2norm.core.spec import Spec

F32 = np.dtype(np.float32)
DTYPES = ["float16", "bfloat16", "float32", "float64"]
OPTIONS = [
    {"preset": "ssd.pytorch"},
    {"eps": 3e-7, "eps_mode": "add_sumsq", "across_spatial": True},
]


def random_bits_scale(dtype: str, size: int, seed: int) -> np.ndarray:
    """A scale drawn from every finite bit pattern of ``dtype``: subnormals, -0.0,
    the largest values, so that a conversion that rounds or flushes anything shows."""
    dt = conformance.numpy_dtype(dtype)
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** (8 * dt.itemsize), size=4 * size + 8, dtype=np.uint64)
    values = bits.astype({2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]).view(dt)
    values = values[np.isfinite(values.astype(np.float64))][:size]
    values[0] = -0.0 if size > 1 else values[0]
    if size > 2:
        values[1] = ml_dtypes.finfo(dt).smallest_subnormal
    return values


def make_params(dtype: str, shared: bool, learnable: bool, options: dict) -> convert.L2NormParams:
    seed = DTYPES.index(dtype) * 8 + 4 * shared + 2 * learnable + len(options)
    spec = Spec.create(**options)
    return convert.L2NormParams(
        scale=random_bits_scale(dtype, 1 if shared else 12, seed),
        eps=spec.eps,
        eps_mode=spec.eps_mode,
        preset=spec.preset,
        across_spatial=spec.across_spatial,
        learnable=learnable,
    )


# A format: (to, from) with the layout each framework uses by default.
FORMATS = {
    "numpy": (convert.to_numpy, convert.from_numpy),
    "torch": (lambda p: convert.to_torch(p, num_channels=12), convert.from_torch),
    "nnx": (lambda p: convert.to_nnx(p, num_features=12), convert.from_nnx),
    "linen": (convert.to_linen, lambda mv: convert.from_linen(*mv)),
    "keras": (
        lambda p: convert.to_keras(p, input_shape=(None, 3, 12)),
        convert.from_keras,
    ),
}


def round_trip_pairs(names: list[str], params: convert.L2NormParams) -> None:
    for a, b in itertools.permutations(names, 2):
        to_a, from_a = FORMATS[a]
        to_b, from_b = FORMATS[b]
        via_a = from_a(to_a(params))
        assert via_a == params, f"{a}: {via_a} != {params}"
        via_b = from_b(to_b(via_a))
        assert via_b == params, f"{a} -> {b}: {via_b} != {params}"
        back = from_a(to_a(via_b))
        assert back == params, f"{a} -> {b} -> {a}: {back} != {params}"
        assert back.scale.tobytes() == params.scale.tobytes()


CONFIGS = [
    pytest.param(dtype, shared, learnable, options, id=f"{dtype}-{shared=}-{learnable=}-{i}")
    for dtype in DTYPES
    for shared in (False, True)
    for learnable in (True, False)
    for i, options in enumerate(OPTIONS)
]


@pytest.mark.parametrize("dtype, shared, learnable, options", CONFIGS)
def test_every_pair_round_trips_bit_for_bit(dtype, shared, learnable, options):
    params = make_params(dtype, shared, learnable, options)
    # float64 on JAX needs x64 (see test_float64_without_x64_is_refused).
    with jax.enable_x64(dtype == "float64"):
        round_trip_pairs(["numpy", "torch", "nnx", "linen"], params)


@pytest.mark.keras
@pytest.mark.parametrize("dtype, shared, learnable, options", CONFIGS)
def test_every_pair_with_keras_round_trips_bit_for_bit(dtype, shared, learnable, options):
    import keras

    params = make_params(dtype, shared, learnable, options)
    x64 = dtype == "float64"
    if x64 and keras.backend.backend() == "jax" and not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="bit for bit"):
            convert.to_keras(params, input_shape=(None, 3, 12))
        return
    with jax.enable_x64(x64):
        round_trip_pairs(["keras", "numpy", "torch", "nnx", "linen"], params)
    layer = convert.to_keras(params, input_shape=(None, 3, 12))
    assert layer.gamma.trainable is params.learnable
    assert layer.channel_shared is params.channel_shared


def test_the_layers_get_the_options_and_parameter_kinds():
    from flax import nnx

    from l2norm.nnx import Constant

    params = make_params("float32", False, False, OPTIONS[1])
    module = convert.to_torch(params)
    assert module.spec == params.spec(axis=1) and module.dim == 1
    assert not isinstance(module.weight, torch.nn.Parameter)
    assert "weight" in module.state_dict()
    assert isinstance(convert.to_nnx(params).scale, Constant)
    linen_module, variables = convert.to_linen(params)
    assert set(variables) == {"constants"} and linen_module.spec == params.spec(axis=-1)
    learnable = make_params("bfloat16", False, True, OPTIONS[0])
    assert isinstance(convert.to_torch(learnable).weight, torch.nn.Parameter)
    assert isinstance(convert.to_nnx(learnable).scale, nnx.Param)
    assert convert.to_torch(learnable).weight.dtype == torch.bfloat16
    assert convert.to_nnx(learnable, axis=1).spec.axis == 1


def test_npz_file_round_trip_keeps_bfloat16_bits(tmp_path):
    params = make_params("bfloat16", False, True, OPTIONS[0])
    np.savez(tmp_path / "norm.npz", **convert.to_numpy(params))
    with np.load(tmp_path / "norm.npz", allow_pickle=False) as arrays:
        assert convert.from_numpy(arrays) == params


def test_equality_is_bitwise():
    params = make_params("float32", False, True, OPTIONS[0])
    zero = params.scale.copy()
    zero[0] = 0.0  # +0.0 == -0.0 numerically, not bitwise
    assert np.array_equal(zero, params.scale)
    assert convert.L2NormParams(zero, params.eps, params.eps_mode, params.preset) != params
    widened = params.scale.astype(np.float64)
    assert convert.L2NormParams(widened, params.eps, params.eps_mode, params.preset) != params


def test_bad_params_and_arguments_raise_clear_errors():
    good = np.full(4, 20.0, np.float32)
    with pytest.raises(TypeError, match="got dtype int64"):
        convert.L2NormParams(np.arange(4), 1e-12, "clamp_norm")
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        convert.L2NormParams(good.reshape(2, 2), 1e-12, "clamp_norm")
    with pytest.raises(ValueError, match="finite, got nan at index 2"):
        convert.L2NormParams(np.array([1, 2, np.nan, 3], np.float32), 1e-12, "clamp_norm")
    with pytest.raises(ValueError, match="conflicts"):
        convert.L2NormParams(good, 1e-12, "clamp_norm", preset="caffe")
    with pytest.raises(ValueError, match="eps must be a positive"):
        convert.L2NormParams(good, -1.0, "clamp_norm")
    shared = convert.L2NormParams(good[:1], 1e-12, "clamp_norm")
    with pytest.raises(ValueError, match="pass num_channels="):
        convert.to_torch(shared)
    with pytest.raises(ValueError, match="pass num_features="):
        convert.to_nnx(shared)
    with pytest.raises(ValueError, match="num_channels=8 disagrees"):
        convert.to_torch(convert.L2NormParams(good, 1e-12, "clamp_norm"), num_channels=8)
    assert convert.to_torch(shared, num_channels=7).num_channels == 7
    with pytest.raises(ValueError, match="one value per channel"):
        convert.from_ssd_pytorch(torch.ones(2, 3))
    module, variables = convert.to_linen(convert.L2NormParams(good, 1e-12, "clamp_norm"))
    with pytest.raises(ValueError, match=r"variables\['params'\]\['scale'\]"):
        convert.from_linen(module, {"constants": variables["params"]})


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float64_without_x64_is_refused_not_rounded():
    params = make_params("float64", False, True, OPTIONS[0])
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        convert.to_nnx(params)


def test_convert_imports_no_framework():
    code = (
        "import sys, l2norm.convert\n"
        "print([m for m in ('torch', 'tensorflow', 'keras', 'jax', 'flax') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples():
    result = doctest.testmod(convert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ peers
# Each peer's formula, written out as its source computes it (NCHW, float64, one rounding).


def ssd_pytorch_formula(x, w):  # ssd.pytorch layers/modules/l2norm.py; mmdet's L2Norm
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True)) + 1e-10
    return w[None, :, None, None] * x / norm


def torchvision_formula(x, w):  # scale_weight.view(1, -1, 1, 1) * F.normalize(x)
    norm = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return w[None, :, None, None] * (x / np.maximum(norm, 1e-12))


def ssd_keras_formula(x, w):  # K.l2_normalize(x, axis=3) * gamma on NHWC (= NCHW axis 1)
    square_sum = (x * x).sum(axis=1, keepdims=True)
    return x / np.sqrt(np.maximum(square_sum, 1e-12)) * w[None, :, None, None]


def caffe_formula(across_spatial, eps):  # normalize_layer.cpp, Forward_cpu
    def formula(x, w):
        axes = (1, 2, 3) if across_spatial else (1,)
        norm = np.sqrt((x * x).sum(axis=axes, keepdims=True) + eps)
        return x / norm * w.reshape(-1)[None, :, None, None] if w.size > 1 else x / norm * w[0]

    return formula


PEERS = {
    "ssd.pytorch": (convert.from_ssd_pytorch, False, ssd_pytorch_formula, ("add_norm", 1e-10)),
    "mmdet": (convert.from_mmdet, False, ssd_pytorch_formula, ("add_norm", 1e-10)),
    "torchvision": (convert.from_torchvision, False, torchvision_formula, ("clamp_norm", 1e-12)),
    "ssd_keras": (convert.from_ssd_keras, False, ssd_keras_formula, ("clamp_sumsq", 1e-12)),
    "caffe-ssd-prototxt": (
        lambda s: convert.from_caffe(s, across_spatial=False, channel_shared=False),
        False,
        caffe_formula(False, 1e-10),
        ("add_sumsq", 1e-10),
    ),
    "caffe-proto-defaults": (
        lambda s: convert.from_caffe(s[:1]),
        True,
        caffe_formula(True, 1e-10),
        ("add_sumsq", 1e-10),
    ),
    "caffe-parsed-float-eps": (
        # A parsed prototxt gives the float32 value of 1e-10: still Caffe's preset.
        lambda s: convert.from_caffe(
            s, across_spatial=False, channel_shared=False, eps=float(np.float32(1e-10))
        ),
        False,
        caffe_formula(False, 1e-10),
        ("add_sumsq", 1e-10),
    ),
    "caffe-eps-1e-6-across-spatial": (
        lambda s: convert.from_caffe(s, across_spatial=True, channel_shared=False, eps=1e-6),
        False,
        caffe_formula(True, 1e-6),
        ("add_sumsq", 1e-6),
    ),
}


def peer_data() -> tuple[np.ndarray, np.ndarray]:
    """NCHW float32: random pixels, an all-zero pixel, pixels with norms from 1e-13 up
    (on both sides of every peer's eps threshold), a tiny sample and an all-zero sample
    (for Caffe's across_spatial), and a large-norm pixel."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 16, 3, 4))
    norms = [0.0, 1e-13, 1e-11, 1e-10, 1e-9, 1e-7, 1e-6, 1e-5, 1e-3, 3e-6, 1e4]
    for i, target in enumerate(norms):
        h, w = divmod(i, 4)
        pixel = x[0, :, h, w]
        x[0, :, h, w] = pixel / np.linalg.norm(pixel) * target
    x[1] *= 1e-7 / np.linalg.norm(x[1])
    x[2] = 0.0
    x[3] *= 1e-11 / np.linalg.norm(x[3])
    scale = rng.uniform(5.0, 30.0, 16).astype(np.float32)
    return x.astype(np.float32), scale


def nchw_outputs(params: convert.L2NormParams, x: np.ndarray) -> dict[str, np.ndarray]:
    """The converted layer's output in every non-Keras adapter (Flax in NHWC)."""
    nhwc = x.transpose(0, 2, 3, 1)
    shared = params.channel_shared
    out = {
        "torch": convert.to_torch(params, num_channels=x.shape[1] if shared else None)(
            torch.from_numpy(x)
        )
        .detach()
        .numpy()
    }
    nnx_layer = convert.to_nnx(params, num_features=x.shape[1] if shared else None)
    out["nnx"] = np.asarray(nnx_layer(nhwc)).transpose(0, 3, 1, 2)
    module, variables = convert.to_linen(params)
    out["linen"] = np.asarray(module.apply(variables, nhwc)).transpose(0, 3, 1, 2)
    return out


def assert_reproduces(name: str, got: np.ndarray, want64: np.ndarray) -> None:
    want = want64.astype(np.float32)
    ulps = conformance.forward_error(got, want, F32, flushes=True)
    assert got.dtype == np.float32 and np.isfinite(got).all(), name
    assert ulps <= 4.0, f"{name}: {ulps} ULP from the peer's formula"


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_import_chooses_the_preset_and_reproduces_the_formula(peer):
    importer, shared, formula, (mode, eps) = PEERS[peer]
    x, scale = peer_data()
    params = importer(torch.from_numpy(scale) if peer == "mmdet" else scale)
    assert (params.eps_mode, params.eps) == (mode, eps)
    assert params.channel_shared is shared and params.learnable
    want = formula(x.astype(np.float64), params.scale.astype(np.float64))
    for adapter, got in nchw_outputs(params, x).items():
        assert_reproduces(f"{peer} via {adapter}", got, want)


def test_the_data_tells_every_eps_placement_apart():
    # Otherwise the test above would pass with any preset.
    x, scale = peer_data()
    x64, s64 = x.astype(np.float64), scale.astype(np.float64)
    formulas = {
        "add_norm": ssd_pytorch_formula(x64, s64),
        "clamp_norm": torchvision_formula(x64, s64),
        "clamp_sumsq": ssd_keras_formula(x64, s64),
        "add_sumsq": caffe_formula(False, 1e-10)(x64, s64),
        "add_sumsq across_spatial": caffe_formula(True, 1e-10)(x64, s64),
    }
    for (a, ya), (b, yb) in itertools.combinations(formulas.items(), 2):
        ulps = conformance.forward_error(ya.astype(np.float32), yb.astype(np.float32), F32, True)
        assert ulps > 1e3, f"{a} and {b} agree on the peer data ({ulps} ULP)"


def test_caffe_proto_defaults_are_a_trap():
    scale = np.full(512, 20.0, np.float32)
    with pytest.raises(ValueError, match="SSD's prototxt sets channel_shared: false"):
        convert.from_caffe(scale)
    with pytest.raises(ValueError, match="one scale per channel"):
        convert.from_caffe(np.float32(20.0), across_spatial=False, channel_shared=False)
    defaults = convert.from_caffe(np.array(20.0, np.float32))  # a 0-d blob, as Caffe stores it
    assert defaults.across_spatial and defaults.channel_shared and defaults.preset == "caffe"
    ssd = convert.from_caffe(scale, across_spatial=False, channel_shared=False)
    assert not ssd.across_spatial and not ssd.channel_shared and ssd.preset == "caffe"
    other = convert.from_caffe(scale, across_spatial=False, channel_shared=False, eps=1e-6)
    assert other.preset is None and (other.eps_mode, other.eps) == ("add_sumsq", 1e-6)


def test_peer_weights_keep_their_dtype_and_bits():
    half = torch.tensor([20.0, 19.5, -0.0], dtype=torch.bfloat16)
    params = convert.from_ssd_pytorch(half)
    assert params.scale.dtype == ml_dtypes.bfloat16
    assert (
        params.scale.view(np.uint16).tolist()
        == half.view(torch.int16).numpy().view(np.uint16).tolist()
    )
    assert convert.to_torch(params).weight.dtype == torch.bfloat16
    assert convert.from_torchvision(torch.ones(4, dtype=torch.float16) * 20).scale.dtype == (
        np.float16
    )


def test_the_converted_layer_has_a_finite_gradient_at_the_zero_pixel():
    # Where ssd.pytorch's own autodiff gives NaN.
    x, scale = peer_data()
    layer = convert.to_torch(convert.from_ssd_pytorch(scale))
    xt = torch.from_numpy(x).requires_grad_(True)
    (dx,) = torch.autograd.grad(layer(xt).sum(), xt)
    assert torch.isfinite(dx).all()
    xt = torch.from_numpy(x).requires_grad_(True)
    norm = xt.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
    (dx_peer,) = torch.autograd.grad(
        (torch.from_numpy(scale)[None, :, None, None] * xt / norm).sum(), xt
    )
    assert torch.isnan(dx_peer[0, :, 0, 0]).all()


# ------------------------------------------------------------------ ssd_keras .h5 files


def write_ssd_keras_h5(path, gamma: np.ndarray, whole_model: bool, chunked: bool = False):
    """The layout Keras 2 writes for ssd_keras' SSD300 (a few of its layers).

    ``model.save_weights``: at the root, the attribute ``layer_names`` and one group per
    layer whose attribute ``weight_names`` lists its weights, each a dataset at that path
    inside the group. ``model.save``: the same under ``model_weights/``, next to the
    model's config and ``optimizer_weights/``. ``chunked``: ``layer_names`` split into
    ``layer_names0``, ``layer_names1`` (what Keras 2 does past HDF5's 64 KiB limit).
    """
    import h5py

    rng = np.random.default_rng(3)
    layers = {
        "conv4_3": {
            "conv4_3/kernel:0": rng.standard_normal((3, 3, 4, gamma.size)).astype(np.float32),
            "conv4_3/bias:0": np.zeros(gamma.size, np.float32),
        },
        "pool4": {},
        "conv4_3_norm": {"conv4_3_norm/conv4_3_norm_gamma:0": gamma},
        "conv4_3_norm_mbox_conf": {
            "conv4_3_norm_mbox_conf/kernel:0": np.ones((3, 3, gamma.size, 8), np.float32),
        },
    }
    with h5py.File(path, "w") as f:
        if whole_model:
            f.attrs["model_config"] = b'{"class_name": "Model", "config": {}}'
            f.create_group("optimizer_weights")
            root = f.create_group("model_weights")
        else:
            root = f
        names = np.array([name.encode() for name in layers])
        if chunked:
            root.attrs["layer_names0"], root.attrs["layer_names1"] = names[:2], names[2:]
        else:
            root.attrs["layer_names"] = names
        root.attrs["backend"], root.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        for name, weights in layers.items():
            group = root.create_group(name)
            group.attrs["weight_names"] = [w.encode() for w in weights]
            for weight_name, value in weights.items():
                group.create_dataset(weight_name, data=value)


@pytest.mark.parametrize("whole_model", [False, True], ids=["save_weights", "model.save"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_ssd_keras_h5_reads_the_gamma_bit_for_bit(tmp_path, whole_model, dtype):
    import h5py

    gamma = random_bits_scale(dtype, 16, seed=DTYPES.index(dtype))
    path = tmp_path / "ssd300_weights.h5"
    write_ssd_keras_h5(path, gamma, whole_model)
    params = convert.from_ssd_keras_h5(path)  # a pathlib.Path
    assert params.scale.dtype == gamma.dtype and params.scale.tobytes() == gamma.tobytes()
    assert params == convert.from_ssd_keras(gamma)
    assert (params.preset, params.eps_mode, params.eps) == ("ssd_keras", "clamp_sumsq", 1e-12)
    assert convert.from_ssd_keras_h5(str(path), layer="conv4_3_norm") == params
    with h5py.File(path, "r") as f:  # an open file
        assert convert.from_ssd_keras_h5(f) == params
    assert convert.to_torch(params).weight.detach().numpy().tobytes() == gamma.tobytes()


def test_ssd_keras_h5_reproduces_ssd_keras_formula(tmp_path):
    x, scale = peer_data()
    path = tmp_path / "ssd300_weights.h5"
    write_ssd_keras_h5(path, scale, whole_model=True, chunked=True)
    params = convert.from_ssd_keras_h5(path)
    want = ssd_keras_formula(x.astype(np.float64), scale.astype(np.float64))
    for adapter, got in nchw_outputs(params, x).items():
        assert_reproduces(f"ssd_keras .h5 via {adapter}", got, want)


def test_ssd_keras_h5_errors_are_clear(tmp_path):
    import h5py

    gamma = np.full(8, 20.0, np.float32)
    path = tmp_path / "weights.h5"
    write_ssd_keras_h5(path, gamma, whole_model=False)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.h5"):
        convert.from_ssd_keras_h5(tmp_path / "missing.h5")
    (tmp_path / "notes.h5").write_text("not HDF5")
    with pytest.raises(ValueError, match="is not an HDF5 file"):
        convert.from_ssd_keras_h5(tmp_path / "notes.h5")
    layers = r"\['conv4_3', 'pool4', 'conv4_3_norm', 'conv4_3_norm_mbox_conf'\]"
    with pytest.raises(ValueError, match=f"no layer 'conv5_3_norm'; the layers in it: {layers}"):
        convert.from_ssd_keras_h5(path, layer="conv5_3_norm")
    with pytest.raises(
        ValueError, match=r"layer 'conv4_3' .* holds no gamma weight; its weights: "
    ):
        convert.from_ssd_keras_h5(path, layer="conv4_3")
    with pytest.raises(ValueError, match=r"'pool4' .* no gamma weight; its weights: \[\]"):
        convert.from_ssd_keras_h5(path, layer="pool4")
    with pytest.raises(TypeError, match="file path or an open h5py.File"):
        convert.from_ssd_keras_h5(gamma)
    with h5py.File(path, "a") as f:  # a listed weight whose dataset is missing
        del f["conv4_3_norm/conv4_3_norm"]
    with pytest.raises(ValueError, match="no dataset at /conv4_3_norm/conv4_3_norm/"):
        convert.from_ssd_keras_h5(path)


@pytest.mark.keras
@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_import_reproduces_the_formula_in_keras(peer):
    from keras import ops

    importer, shared, formula, _ = PEERS[peer]
    x, scale = peer_data()
    params = importer(scale)
    layer = convert.to_keras(params, input_shape=(None, 3, 4, 16))
    # A Keras variable is accepted where an array is.
    assert convert.from_ssd_keras(layer.gamma).scale.tobytes() == params.scale.tobytes()
    got = ops.convert_to_numpy(layer(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    want = formula(x.astype(np.float64), params.scale.astype(np.float64))
    assert_reproduces(f"{peer} via keras", got, want)


@pytest.mark.keras
def test_keras_dtype_override_must_hold_the_scale_exactly():
    params = make_params("bfloat16", False, True, OPTIONS[0])
    layer = convert.to_keras(params, input_shape=(None, 12), dtype="mixed_bfloat16")
    widened = convert.from_keras(layer)
    assert widened.scale.dtype == np.float32
    assert widened.scale.astype(ml_dtypes.bfloat16).tobytes() == params.scale.tobytes()
    lossy = make_params("float32", False, True, OPTIONS[0])
    with pytest.raises(ValueError, match="bit for bit"):
        convert.to_keras(lossy, input_shape=(None, 12), dtype="bfloat16")


@pytest.mark.keras
def test_ssd_keras_h5_reproduces_ssd_keras_formula_in_keras(tmp_path):
    from keras import ops

    x, scale = peer_data()
    path = tmp_path / "ssd300_weights.h5"
    write_ssd_keras_h5(path, scale, whole_model=False)
    layer = convert.to_keras(convert.from_ssd_keras_h5(path), input_shape=(None, 3, 4, 16))
    assert ops.convert_to_numpy(layer.gamma).tobytes() == scale.tobytes()
    got = ops.convert_to_numpy(layer(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    want = ssd_keras_formula(x.astype(np.float64), scale.astype(np.float64))
    assert_reproduces("ssd_keras .h5 via keras", got, want)


def test_from_torch_on_a_model_names_the_layer_to_pass():
    from torch import nn

    from l2norm.torch import L2Norm

    model = nn.Sequential(nn.ReLU(), L2Norm(4))
    with pytest.raises(TypeError, match=r"got Sequential; it holds '1': pass that module"):
        convert.from_torch(model)
    with pytest.raises(TypeError, match=r"got ReLU \(e\.g\."):
        convert.from_torch(nn.ReLU())
    params = convert.from_torch(model.get_submodule("1"))
    np.testing.assert_array_equal(params.scale, model[1].weight.detach().numpy())
