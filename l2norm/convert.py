"""Move an L2Norm's parameters and configuration between frameworks and peer conventions.

Everything goes through :class:`L2NormParams`, a framework-free record of the scale
(its values and dtype kept bit for bit) and the options that decide the maths. The
layout (which axis is the channel axis) is not part of it: it belongs to the model the
layer goes into, so each ``to_*`` function takes it (``dim=1`` for PyTorch's NCHW,
``axis=-1`` for Keras and Flax's NHWC by default).

Porting an SSD's ``conv4_3_norm`` from Caffe to PyTorch, Keras and Flax::

    params = convert.from_caffe(scale_blob, across_spatial=False, channel_shared=False)
    torch_layer = convert.to_torch(params)                      # NCHW, dim=1
    keras_layer = convert.to_keras(params, input_shape=(None, 38, 38, 512))
    nnx_layer = convert.to_nnx(params)                          # NHWC, axis=-1
    assert convert.from_nnx(nnx_layer) == params                # bit for bit

Each ``from_<peer>`` import picks the preset that reproduces that peer's eps placement
exactly, and says which in its docstring. Every ``to_*`` reads the scale back from the
layer it built and raises if it is not bit for bit the one given (a float64 scale on JAX
without ``jax_enable_x64``, for instance, would otherwise be rounded silently).
Framework imports happen inside the functions that need them, so this module stays
importable with NumPy alone.

Example (plain NumPy, e.g. to keep the layer in an ``.npz`` next to other weights):

    >>> import numpy as np
    >>> from l2norm import convert
    >>> params = convert.from_caffe(
    ...     np.full(512, 20.0, np.float32), across_spatial=False, channel_shared=False
    ... )
    >>> params.preset, params.eps_mode, params.eps
    ('caffe', 'add_sumsq', 1e-10)
    >>> convert.from_numpy(convert.to_numpy(params)) == params
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from l2norm.core.spec import Spec

__all__ = [
    "L2NormParams",
    "from_caffe",
    "from_keras",
    "from_linen",
    "from_mmdet",
    "from_nnx",
    "from_numpy",
    "from_ssd_keras",
    "from_ssd_keras_h5",
    "from_ssd_pytorch",
    "from_torch",
    "from_torchvision",
    "to_keras",
    "to_linen",
    "to_nnx",
    "to_numpy",
    "to_torch",
]

from l2norm.interop.frameworks import (
    from_keras,
    from_linen,
    from_nnx,
    from_torch,
    to_keras,
    to_linen,
    to_nnx,
    to_torch,
)
from l2norm.interop.params import _BFLOAT16, L2NormParams, _as_numpy, _from_spec

# ------------------------------------------------------------------ peers


def _peer(weight: Any, preset: str, name: str) -> L2NormParams:
    scale = _as_numpy(weight)
    if scale.ndim != 1:
        raise ValueError(f"{name} must hold one value per channel (1-D), got shape {scale.shape}")
    return _from_spec(scale, Spec.create(preset=preset), learnable=True)


def from_ssd_pytorch(weight: Any) -> L2NormParams:
    """ssd.pytorch's ``L2Norm.weight`` (shape ``(512,)``, NCHW, ``dim=1``).

    Preset ``"ssd.pytorch"``: eps 1e-10 added to the norm, ``x / (||x|| + 1e-10)``.
    """
    return _peer(weight, "ssd.pytorch", "ssd.pytorch L2Norm.weight")


def from_mmdet(weight: Any) -> L2NormParams:
    """mmdetection's ``L2Norm.weight`` (NCHW, ``dim=1``).

    Preset ``"mmdet"``: eps 1e-10 added to the norm, ``x / (||x|| + 1e-10)``, computed in
    float32 for half inputs (as l2norm always does).
    """
    return _peer(weight, "mmdet", "mmdetection L2Norm.weight")


def from_torchvision(scale_weight: Any) -> L2NormParams:
    """torchvision SSD's ``SSDFeatureExtractorVGG.scale_weight`` (NCHW, ``dim=1``).

    Preset ``"torchvision"``: the norm clamped at 1e-12 (``F.normalize``),
    ``x / max(||x||, 1e-12)``.
    """
    return _peer(scale_weight, "torchvision", "torchvision scale_weight")


def from_ssd_keras(gamma: Any) -> L2NormParams:
    """ssd_keras' ``L2Normalization`` gamma (channels last, ``axis=-1``).

    Preset ``"ssd_keras"``: the sum of squares clamped at 1e-12 (Keras 2
    ``K.l2_normalize``, i.e. ``tf.math.l2_normalize``), ``x / sqrt(max(sum(x**2), 1e-12))``.
    """
    return _peer(gamma, "ssd_keras", "ssd_keras L2Normalization gamma")


def from_ssd_keras_h5(path: str | os.PathLike | Any, layer: str = "conv4_3_norm") -> L2NormParams:
    """ssd_keras' trained gamma, read from the Keras 2 HDF5 file its weights ship in.

    Preset ``"ssd_keras"`` (as :func:`from_ssd_keras`); the values keep the file's dtype
    and bits. Both Keras 2 layouts are read: ``model.save_weights(...)`` (a group per
    layer at the root) and ``model.save(...)`` (the same under ``model_weights/``). In a
    layer's group the attribute ``weight_names`` lists its weights (e.g.
    ``b"conv4_3_norm/conv4_3_norm_gamma:0"``) and each is a dataset at that path; the
    gamma is the weight named ``<layer>_gamma`` (or the only one whose name ends in
    ``gamma``). Needs ``h5py`` (it comes with Keras), imported here only.

    Args:
        path: the ``.h5`` file, or an open ``h5py.File`` / ``h5py.Group``.
        layer: the ``L2Normalization`` layer's name (SSD300 and SSD512: ``"conv4_3_norm"``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not an HDF5 file; no layer of that name (the message lists the layer
            names present); a layer without a gamma (the message lists its weights).

    Examples:
        >>> import os, tempfile, h5py, numpy as np
        >>> from l2norm import convert
        >>> path = os.path.join(tempfile.mkdtemp(), "ssd300_weights.h5")
        >>> with h5py.File(path, "w") as f:  # what Keras 2's save_weights writes
        ...     f.attrs["layer_names"] = [b"conv4_3", b"conv4_3_norm"]
        ...     f.create_group("conv4_3").attrs["weight_names"] = []
        ...     g = f.create_group("conv4_3_norm")
        ...     g.attrs["weight_names"] = [b"conv4_3_norm/conv4_3_norm_gamma:0"]
        ...     gamma = np.full(4, 20.5, np.float32)
        ...     _ = g.create_dataset("conv4_3_norm/conv4_3_norm_gamma:0", data=gamma)
        >>> params = convert.from_ssd_keras_h5(path)
        >>> params.scale, params.preset
        (array([20.5, 20.5, 20.5, 20.5], dtype=float32), 'ssd_keras')
    """
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py comes with Keras
        raise ImportError("reading an .h5 file needs h5py: pip install h5py") from err

    if isinstance(path, h5py.Group):  # an open file is a Group too
        return _gamma_from_h5(h5py, path, layer, repr(path.file.filename))
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path or an open h5py.File, got {path!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path!r} is not an HDF5 file h5py can read ({err})") from err
    with handle:
        return _gamma_from_h5(h5py, handle, layer, repr(path))


def _h5_strings(group: Any, name: str) -> list[str] | None:
    """A Keras 2 list-of-names attribute as str. Keras 2 splits one longer than HDF5's
    64 KiB attribute limit into ``name0``, ``name1``, ...; those are joined back."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    elif f"{name}0" in group.attrs:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    values = [v for chunk in chunks for v in np.atleast_1d(np.asarray(chunk)).tolist()]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _gamma_from_h5(h5py: Any, root: Any, layer: str, where: str) -> L2NormParams:
    # model.save puts the weights under model_weights/; save_weights at the root.
    weights = root["model_weights"] if isinstance(root.get("model_weights"), h5py.Group) else root
    group = weights.get(layer)
    if not isinstance(group, h5py.Group):
        names = _h5_strings(weights, "layer_names")
        if names is None:
            names = [k for k, v in weights.items() if isinstance(v, h5py.Group)]
        hint = ""
        if "layers" in weights and "layers" not in names:
            hint = (
                "; this looks like a Keras 3 .weights.h5 file: load it with Keras and pass "
                "the layer's gamma to convert.from_ssd_keras"
            )
        raise ValueError(f"{where} has no layer {layer!r}; the layers in it: {names}{hint}")
    listed = _h5_strings(group, "weight_names")
    if listed is None:  # not written by Keras 2: every dataset under the layer's group
        listed = []
        group.visititems(lambda n, obj: listed.append(n) if isinstance(obj, h5py.Dataset) else None)
    base = {name: name.rsplit("/", 1)[-1].split(":", 1)[0] for name in listed}
    found = [n for n in listed if base[n] == f"{layer}_gamma"]
    found = found or [n for n in listed if base[n].endswith("gamma")]
    if len(found) != 1:
        what = "no gamma weight" if not found else f"several gamma weights {found}"
        raise ValueError(f"layer {layer!r} in {where} holds {what}; its weights: {listed}")
    dataset = group.get(found[0])
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(
            f"layer {layer!r} in {where} lists the weight {found[0]!r}, but there is no "
            f"dataset at {group.name}/{found[0]}"
        )
    # dataset[()] reads the stored values in the stored dtype: no conversion, no rounding.
    return _peer(np.asarray(dataset[()]), "ssd_keras", f"{where} {group.name}/{found[0]}")


_CAFFE_EPS = 1e-10


def from_caffe(
    scale: Any,
    *,
    across_spatial: bool = True,
    channel_shared: bool = True,
    eps: float = 1e-10,
) -> L2NormParams:
    """A Caffe SSD ``Normalize`` layer: its scale blob and its ``norm_param`` settings.

    The keyword defaults are **Caffe's proto defaults** (``across_spatial: true``,
    ``channel_shared: true``, ``eps: 1e-10``), not SSD's prototxt, which sets both flags
    to false: pass what the prototxt says (a missing line means the proto default).
    Caffe adds eps to the sum of squares, ``x / sqrt(sum(x**2) + eps)``: preset
    ``"caffe"`` when eps is 1e-10 (also as the float32 value ``1.00000001e-10`` that a
    parsed prototxt returns, since the proto field is a float), ``eps_mode="add_sumsq"``
    with the given eps otherwise. The channel axis is 1 (NCHW), as in Caffe.

    Args:
        scale: the blob (``net.params[name][0].data``): shape ``(C,)``, or one value
            (shape ``()`` or ``(1,)``) with ``channel_shared``.
        across_spatial: one norm per sample over C*H*W (True) or one per pixel over C.
        channel_shared: one scale for every channel.
        eps: ``norm_param.eps``.

    Raises:
        ValueError: a blob whose size disagrees with ``channel_shared``.
    """
    blob = _as_numpy(scale).reshape(-1)
    if channel_shared and blob.shape != (1,):
        raise ValueError(
            f"channel_shared=True (Caffe's proto default) expects a scale blob of one value, "
            f"got {blob.size} values; SSD's prototxt sets channel_shared: false"
        )
    if not channel_shared and blob.size == 1:
        raise ValueError(
            "channel_shared=False expects one scale per channel, got a blob of one value; "
            "pass channel_shared=True if the prototxt does not set it"
        )
    if isinstance(eps, (int, float, np.floating)) and math.isfinite(float(eps)):
        is_default = np.float32(eps) == np.float32(_CAFFE_EPS)
    else:
        is_default = False
    spec = (
        Spec.create(preset="caffe", across_spatial=across_spatial, axis=1)
        if is_default
        else Spec.create(eps=eps, eps_mode="add_sumsq", across_spatial=across_spatial, axis=1)
    )
    return _from_spec(blob, spec, learnable=True)


# ------------------------------------------------------------------ plain NumPy


def to_numpy(params: L2NormParams) -> dict[str, np.ndarray]:
    """The params as NumPy arrays only, ready for ``np.savez`` (no pickling needed).

    Keys: ``scale`` (its dtype kept), ``scale_dtype``, ``eps``, ``eps_mode``, ``preset``
    (``""`` for none), ``across_spatial``, ``learnable``.
    """
    return {
        "scale": params.scale.copy(),
        "scale_dtype": np.array(params.scale.dtype.name),
        "eps": np.array(params.eps, dtype=np.float64),
        "eps_mode": np.array(params.eps_mode),
        "preset": np.array(params.preset or ""),
        "across_spatial": np.array(params.across_spatial),
        "learnable": np.array(params.learnable),
    }


def from_numpy(arrays: Mapping[str, Any]) -> L2NormParams:
    """The inverse of :func:`to_numpy`; also reads the result of ``np.load`` on an
    ``.npz`` file (where a bfloat16 scale comes back as raw two-byte values)."""
    scale = np.array(arrays["scale"], copy=True)
    dtype_name = str(np.asarray(arrays["scale_dtype"]))
    if scale.dtype.kind == "V" and dtype_name == "bfloat16":
        scale = scale.view(_BFLOAT16)
    if scale.dtype.name != dtype_name:
        raise ValueError(f"scale has dtype {scale.dtype}, but scale_dtype says {dtype_name}")
    preset = str(np.asarray(arrays["preset"])) or None
    return L2NormParams(
        scale=scale,
        eps=float(np.asarray(arrays["eps"])),
        eps_mode=str(np.asarray(arrays["eps_mode"])),
        preset=preset,
        across_spatial=bool(np.asarray(arrays["across_spatial"])),
        learnable=bool(np.asarray(arrays["learnable"])),
    )
