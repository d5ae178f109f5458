"""Moving :class:`~l2norm.convert.L2NormParams` into and out of the l2norm layers of each
framework (``to_torch`` / ``from_torch``, Keras, NNX, Linen); re-exported by
:mod:`l2norm.convert`. Framework imports happen inside the functions, so this module stays
importable with NumPy alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from l2norm.interop.params import _BFLOAT16, L2NormParams, _as_numpy, _check_stored, _from_spec

__all__ = [
    "from_keras",
    "from_linen",
    "from_nnx",
    "from_torch",
    "to_keras",
    "to_linen",
    "to_nnx",
    "to_torch",
]


def _channels(params: L2NormParams, num_channels: int | None, argument: str) -> int:
    if num_channels is None:
        if params.channel_shared:
            raise ValueError(
                f"a channel-shared scale does not say how many channels the layer has: "
                f"pass {argument}="
            )
        return params.scale.shape[0]
    if not params.channel_shared and num_channels != params.scale.shape[0]:
        raise ValueError(
            f"{argument}={num_channels} disagrees with the scale, which has "
            f"{params.scale.shape[0]} values"
        )
    return num_channels


def from_torch(module: Any) -> L2NormParams:
    """From an :class:`l2norm.torch.L2Norm`.

    Raises:
        TypeError: ``module`` is not an ``l2norm.torch.L2Norm`` (for a model holding one,
            the message names the submodules to pass instead).
    """
    from l2norm.torch import L2Norm

    if not isinstance(module, L2Norm):
        held = []
        if hasattr(module, "named_modules"):
            held = [name for name, m in module.named_modules() if isinstance(m, L2Norm)]
        hint = f"; it holds {', '.join(repr(n) for n in held)}: pass that module" if held else ""
        raise TypeError(
            f"from_torch takes an l2norm.torch.L2Norm, got {type(module).__name__}{hint} "
            "(e.g. model.get_submodule(name))"
        )
    return _from_spec(_as_numpy(module.weight), module.spec, module.learnable)


def to_torch(
    params: L2NormParams,
    *,
    dim: int | tuple[int, ...] = 1,
    num_channels: int | None = None,
    device: Any = None,
) -> Any:
    """An :class:`l2norm.torch.L2Norm` (NCHW by default) with ``params``' scale and dtype.

    Args:
        params: what to load.
        dim: the channel axis of the model (``1`` for NCHW).
        num_channels: needed only for a channel-shared scale.
        device: where the parameter lives.
    """
    import torch

    from l2norm.torch import L2Norm

    scale = params.scale
    if scale.dtype == _BFLOAT16:
        tensor = torch.from_numpy(scale.view(np.int16).copy()).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(scale.copy())
    module = L2Norm(
        _channels(params, num_channels, "num_channels"),
        dim=dim,
        channel_shared=params.channel_shared,
        learnable=params.learnable,
        device=device,
        dtype=tensor.dtype,
        **params.options(),
    )
    with torch.no_grad():
        module.weight.copy_(tensor)
    _check_stored(params, module.weight, "the torch module")
    return module


def from_keras(layer: Any) -> L2NormParams:
    """From a built :class:`l2norm.keras.L2Norm`."""
    if getattr(layer, "gamma", None) is None:
        raise ValueError("the Keras layer is not built yet: call it once or build(input_shape)")
    return _from_spec(_keras_numpy(layer.gamma), layer.spec, layer.learnable)


def _keras_numpy(variable: Any) -> np.ndarray:
    from keras import ops

    return np.array(ops.convert_to_numpy(variable.value), copy=True)


def to_keras(
    params: L2NormParams,
    *,
    input_shape: tuple[int | None, ...],
    axis: int | list[int] = -1,
    **kwargs: Any,
) -> Any:
    """An :class:`l2norm.keras.L2Norm` built for ``input_shape`` (channels last by default).

    ``kwargs`` go to the layer (``name``, ...). The layer's dtype policy is the scale's
    dtype unless ``dtype`` is passed, so that ``gamma`` keeps its bits; a bfloat16 or
    float16 scale therefore gives a layer that computes in that dtype, as any Keras layer
    with that policy does. With ``dtype="mixed_bfloat16"`` (say) ``gamma`` is float32
    and holds a bfloat16 scale exactly; a ``dtype`` that cannot hold the scale's values
    exactly is refused.
    """
    from l2norm.keras import L2Norm

    widen = "dtype" in kwargs
    kwargs.setdefault("dtype", params.scale.dtype.name)
    layer = L2Norm(
        axis,
        channel_shared=params.channel_shared,
        learnable=params.learnable,
        **params.options(),
        **kwargs,
    )
    layer.build(tuple(input_shape))
    layer.gamma.assign(params.scale)
    _check_stored(params, _keras_numpy(layer.gamma), "the Keras layer", widen)
    return layer


def from_nnx(module: Any) -> L2NormParams:
    """From an :class:`l2norm.nnx.L2Norm` (a learnable ``nnx.Param`` or a
    non-learnable :class:`l2norm.nnx.Constant` scale)."""
    return _from_spec(_as_numpy(module.scale), module.spec, module.learnable)


def to_nnx(
    params: L2NormParams,
    *,
    axis: int | tuple[int, ...] = -1,
    num_features: int | None = None,
) -> Any:
    """An :class:`l2norm.nnx.L2Norm` (channels last by default) with ``params``' scale.

    Args:
        params: what to load.
        axis: the channel axis of the model (``-1`` for NHWC).
        num_features: needed only for a channel-shared scale.
    """
    import jax.numpy as jnp

    from l2norm.nnx import L2Norm

    module = L2Norm(
        _channels(params, num_features, "num_features"),
        axis=axis,
        scale_init=1.0,
        channel_shared=params.channel_shared,
        learnable=params.learnable,
        param_dtype=params.scale.dtype,
        **params.options(),
    )
    module.scale.set_value(jnp.asarray(params.scale))
    _check_stored(params, module.scale, "the nnx module")
    return module


def from_linen(module: Any, variables: Mapping[str, Any]) -> L2NormParams:
    """From an :class:`l2norm.linen.L2Norm` and its variables: ``{"params": {"scale": ...}}``,
    or ``{"constants": {"scale": ...}}`` for a non-learnable scale."""
    collection = "params" if module.learnable else "constants"
    try:
        scale = variables[collection]["scale"]
    except KeyError:
        raise ValueError(
            f"a learnable={module.learnable} linen L2Norm keeps its scale in "
            f"variables[{collection!r}]['scale'], not found in {list(variables)}"
        ) from None
    return _from_spec(_as_numpy(scale), module.spec, module.learnable)


def to_linen(
    params: L2NormParams, *, axis: int | tuple[int, ...] = -1
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """``(module, variables)`` for :class:`l2norm.linen.L2Norm` (channels last by default):
    ``module.apply(variables, x)`` runs it."""
    import jax.numpy as jnp

    from l2norm.linen import L2Norm

    module = L2Norm(
        axis=axis,
        channel_shared=params.channel_shared,
        learnable=params.learnable,
        param_dtype=params.scale.dtype,
        **params.options(),
    )
    collection = "params" if params.learnable else "constants"
    variables = {collection: {"scale": jnp.asarray(params.scale)}}
    _check_stored(params, variables[collection]["scale"], "the linen variables")
    return module, variables
