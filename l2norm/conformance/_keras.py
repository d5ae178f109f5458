"""The Keras backends ``keras-tensorflow``, ``keras-jax`` and ``keras-torch``:
:func:`l2norm.keras.l2_normalize` on each Keras backend, the gradient by that backend's
own autodiff.

Keras picks its backend once per process, when it is imported. A process can therefore
build only one of these: ``l2norm check`` runs each in a child process with
``KERAS_BACKEND`` set; here, :func:`build` sets ``KERAS_BACKEND`` itself when Keras is not
imported yet and refuses (:class:`BackendUnavailable`) when it already runs another one.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from l2norm.conformance._registry import Backend, BackendUnavailable
from l2norm.core.spec import FLOAT_DTYPES
from l2norm.tensorflow._preload import triton_before_tensorflow


def _select(name: str, wanted: str) -> None:
    """Make sure this process's Keras runs on ``wanted``, or raise."""
    if "keras" not in sys.modules and os.environ.get("KERAS_BACKEND") in (None, wanted):
        os.environ["KERAS_BACKEND"] = wanted
    triton_before_tensorflow()
    import keras

    current = keras.backend.backend()
    if current != wanted:
        raise BackendUnavailable(
            name,
            f"this process runs Keras on {current!r}, and Keras picks its backend once per "
            f"process: run with KERAS_BACKEND={wanted} (l2norm check does so in a child "
            "process)",
        )


def build(name: str) -> Backend:
    """The backend ``keras-<backend>``; the process's Keras must run (or be free to run)
    on that backend."""
    wanted = name.removeprefix("keras-")
    _select(name, wanted)

    from l2norm.keras import l2_normalize
    from l2norm.testing.frameworks import keras_to_numpy, keras_vjp, numpy_to_keras

    def forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
        s = None if scale is None else numpy_to_keras(scale)
        return keras_to_numpy(l2_normalize(numpy_to_keras(x), s, **options), x.dtype)

    def vjp(x, scale, g, options):
        args = [numpy_to_keras(x)] + ([] if scale is None else [numpy_to_keras(scale)])
        grads = keras_vjp(lambda *a: l2_normalize(*a, **options), args, numpy_to_keras(g))
        dx = keras_to_numpy(grads[0], x.dtype)
        return dx, None if scale is None else keras_to_numpy(grads[1], scale.dtype)

    dtypes = FLOAT_DTYPES
    notes: tuple[str, ...] = ()
    if wanted == "jax":
        import jax

        # Without jax_enable_x64 JAX has no float64 arrays at all, and Keras offers no
        # per-call switch: the row skips float64 (l2norm.jax's own row covers it).
        if not jax.config.jax_enable_x64:
            dtypes = tuple(d for d in FLOAT_DTYPES if d != "float64")
            notes = ("float64 not checked: JAX runs without jax_enable_x64",)
    return Backend(
        name=name,
        forward=forward,
        vjp=vjp,
        # TensorFlow's and XLA's CPU kernels flush subnormal results to zero.
        flushes_subnormals=wanted in ("tensorflow", "jax"),
        dtypes=dtypes,
        notes=notes,
    )
