"""Moving arrays between NumPy and the frameworks without losing a bit, and a VJP helper.

Shared by the conformance backends (:mod:`l2norm.conformance`) and the adapters' tests, so
that both convert exactly alike. Each function imports its framework when called: this
module itself imports none.

* PyTorch: :func:`numpy_to_torch`, :func:`torch_to_numpy` (bfloat16 through its bits:
  NumPy has no bfloat16 of its own and torch does not read ml_dtypes arrays),
  :func:`torch_kwargs` (``axis`` becomes ``dim``).
* Keras 3, on whichever backend the process runs: :func:`numpy_to_keras`,
  :func:`keras_to_numpy`, :func:`keras_vjp` (the gradient by the backend's own autodiff).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "triton_interpreter_without_gpu",
    "keras_to_numpy",
    "keras_vjp",
    "numpy_to_keras",
    "numpy_to_torch",
    "torch_kwargs",
    "torch_to_numpy",
]


def triton_interpreter_without_gpu() -> bool:
    """Switch Triton's interpreter on (``TRITON_INTERPRET=1``) where Triton is installed and
    no CUDA device is, so that the Triton lowering runs on CPU tensors; it must happen
    before anything imports ``triton``. Returns whether the interpreter is on."""
    if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        if importlib.util.find_spec("torch") is not None:
            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def numpy_to_torch(a: np.ndarray) -> Any:
    """A CPU tensor with ``a``'s values, dtype (bfloat16 included) and shape."""
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def torch_to_numpy(t: Any) -> np.ndarray:
    """A NumPy array with the tensor's values and dtype (bfloat16 as ml_dtypes')."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_kwargs(options: dict) -> dict:
    """:func:`l2norm.l2_normalize` keywords as :func:`l2norm.torch.l2_normalize` takes them
    (``axis`` is called ``dim``; its default there is 1, so it is always passed)."""
    kwargs = dict(options)
    kwargs["dim"] = kwargs.pop("axis", -1)
    return kwargs


def numpy_to_keras(a: np.ndarray) -> Any:
    """A tensor of the current Keras backend with ``a``'s values and dtype."""
    from keras import ops

    # bfloat16 goes through float32 (exact): not every backend converts ml_dtypes arrays.
    if a.dtype.name == "bfloat16":
        return ops.cast(ops.convert_to_tensor(a.astype(np.float32)), "bfloat16")
    return ops.convert_to_tensor(a, dtype=a.dtype.name)


def keras_to_numpy(t: Any, dtype: Any = None) -> np.ndarray:
    """A NumPy array of a Keras tensor, in ``dtype`` (default: the tensor's)."""
    import keras
    from keras import ops

    name = keras.backend.standardize_dtype(t.dtype)
    if name == "bfloat16":
        t = ops.cast(t, "float32")
    out = np.asarray(ops.convert_to_numpy(t))
    if dtype is None:
        dtype = ml_dtypes.bfloat16 if name == "bfloat16" else out.dtype
    return out.astype(dtype)


def keras_vjp(fn: Callable[..., Any], args: Sequence[Any], g: Any) -> list:
    """The gradient of ``fn(*args)`` with respect to each of ``args`` for the cotangent
    ``g``, by the Keras backend's own autodiff (``GradientTape``, ``jax.vjp`` or
    ``torch.autograd``)."""
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for a in args:
                tape.watch(a)
            y = fn(*args)
        return tape.gradient(y, list(args), output_gradients=g)
    if name == "jax":
        import jax

        _, pullback = jax.vjp(fn, *args)
        return list(pullback(g))
    if name == "torch":
        import torch

        args = [a.detach().requires_grad_(True) for a in args]
        y = fn(*args)
        return list(torch.autograd.grad(y, args, g))
    raise RuntimeError(f"no vjp helper for the Keras backend {name!r}")
