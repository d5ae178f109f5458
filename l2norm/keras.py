r"""L2 normalization with a learnable per-channel scale for Keras 3 (ParseNet / SSD).

One layer, :class:`L2Norm`, and one function, :func:`l2_normalize`, that run on the
TensorFlow, JAX and PyTorch Keras backends with the maths of :mod:`l2norm.reference`.
Everything is written with ``keras.ops``; the gradient is the exact backward formula of
the reference (see its module docstring), attached with ``keras.ops.custom_gradient`` so
that it is finite for every finite input, also where autodiff of the textbook formula
gives NaN (a zero slice) or zeros (squares that overflow).

How a call is computed, in float32 for float16 / bfloat16 / float32 input and in float64
for float64 input:

* Fast path: ``S = sum(x**2)`` per slice. When every slice's ``S`` is finite and far
  enough above the underflow range that no square lost precision, ``y = s * x / d(n)``
  directly: the same memory traffic as ``tf.math.l2_normalize``.
* Otherwise (a batch holding a zero, tiny, huge, NaN or Inf slice) every slice is
  rescaled by the power of two at its largest magnitude before squaring, as the
  reference does. CPU kernels of TensorFlow and XLA read subnormal inputs as zero, so
  the rescaling reads tiny slices from their bits (``keras.ops.view``) and stays exact.

Importing this module registers the conformance backend ``keras-<backend>``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from l2norm import conformance
from l2norm._spec import (
    FLOAT_DTYPES,
    Axes,
    Spec,
    check_float_dtype,
    check_scale_shape,
    scale_init_values,
)

__all__ = ["L2Norm", "l2_normalize"]


# --------------------------------------------------------------------------- the maths

# Bit layout of the two working dtypes: (int view, mantissa bits, exponent bias,
# exponent mask, the power K tiny slices are pre-multiplied by).
_BITS = {
    "float32": ("int32", 23, 127, 0x7F800000, 64),
    "float64": ("int64", 52, 1023, 0x7FF0000000000000, 512),
}


def _exponent_field(x: Any, work: str) -> Any:
    int_dtype, nmant, bias, _, _ = _BITS[work]
    shifted = ops.right_shift(ops.view(x, int_dtype), _const(nmant, int_dtype))
    return ops.bitwise_and(shifted, _const(2 * bias + 1, int_dtype))


def _working_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _const(value: float | int, dtype: str) -> Any:
    # Not ops.cast: with a Python number it converts to float32 / int32 first, which
    # turns 2.0**512 into Inf and 1e-300 into 0.
    return ops.convert_to_tensor(value, dtype=dtype)


def _maximum(a: Any, b: Any) -> Any:
    # Not ops.maximum: on the torch backend (Keras 3.15) it returns float32 for two
    # float64 tensors. A NaN in ``a`` is kept, so a NaN slice stays NaN.
    return ops.where(b > a, b, a)


def _pow2_floor(v: Any, work: str) -> Any:
    """The power of two at or below each positive normal ``v``, exactly, from its bits."""
    int_dtype, _, _, exp_mask, _ = _BITS[work]
    bits = ops.bitwise_and(ops.view(v, int_dtype), _const(exp_mask, int_dtype))
    return ops.view(bits, work)


def _exact_upscale(x: Any, small: Any, work: str) -> Any:
    """``x * 2**K`` in the slices flagged ``small``, ``x`` elsewhere, exact for subnormals.

    Subnormal entries are rebuilt from their integer mantissa, because the CPU kernels
    of TensorFlow and XLA treat a subnormal operand as zero (denormals-are-zero).
    """
    int_dtype, nmant, bias, _, k = _BITS[work]
    bits = ops.view(x, int_dtype)
    mant_mask = _const((1 << nmant) - 1, int_dtype)
    exponent = _exponent_field(x, work)
    mantissa = ops.cast(ops.bitwise_and(bits, mant_mask), work)
    sign = ops.where(bits < 0, _const(-1.0, work), _const(1.0, work))
    subnormal = ops.equal(exponent, 0)
    # mantissa * 2**(1 - bias - nmant) is the subnormal's value; times 2**K it is normal.
    rebuilt = sign * mantissa * _const(2.0 ** (k + 1 - bias - nmant), work)
    upscaled = ops.where(subnormal, rebuilt, x * _const(2.0**k, work))
    return ops.where(small, upscaled, x)


def _denominator(
    ns: Any, s_sq: Any, thr_s: Any, eps_s: Any, mode: str, work: str
) -> tuple[Any, Any]:
    """``(d(n), c)`` per slice from the norm ``ns``, its square ``s_sq`` and the eps
    threshold / eps in the same units; ``c = r / (n / d)**2`` as in :func:`_slice_parts`."""
    one = _const(1.0, work)
    zero = _const(0.0, work)
    if mode == "add_sumsq":
        return ops.sqrt(s_sq + thr_s * thr_s), ops.ones_like(ns)
    if mode == "add_norm":
        ds = ns + eps_s
        return ds, ops.where(ns > 0, ds / ops.where(ns > 0, ns, one), zero)
    return _maximum(ns, thr_s), ops.where(ns >= thr_s, one, zero)


def _slice_parts(
    x: Any, norm: Any | None, s_b: Any | None, spec: Spec, axes: Axes, work: str, rescale: bool
) -> tuple[Any, Any, Any, Any]:
    """``(y, u, q, c)``: ``y = s * x / d(n)``, ``u = x / d(n)``, ``q = 1 / d(n)`` per slice
    (0 in ±Inf slices) and ``c = r / (n / d)**2`` per slice, the factor of the backward
    formula below. ``s_b`` is the scale broadcast against ``x``, or None.

    With ``rescale`` each slice is first brought to ``[1, 2)`` by an exact power of two
    (after the ±Inf limit substitution); without it ``norm`` is the plain norm.
    """
    norm_axes = axes.norm
    one = _const(1.0, work)
    zero = _const(0.0, work)
    thr = spec.threshold
    if rescale:
        is_inf = ops.isinf(x)
        has_nan = ops.any(ops.isnan(x), axis=norm_axes, keepdims=True)
        inf_slice = ops.logical_and(
            ops.any(is_inf, axis=norm_axes, keepdims=True), ops.logical_not(has_nan)
        )
        x = ops.where(inf_slice, ops.where(is_inf, ops.sign(x), zero), x)
        _, _, bias, _, k = _BITS[work]
        exponent = _exponent_field(x, work)
        # Slices whose largest magnitude is below 1 are pre-multiplied by 2**K.
        small = ops.max(exponent, axis=norm_axes, keepdims=True) < bias
        x_pre = _exact_upscale(x, small, work)
        pre = ops.where(small, _const(2.0**k, work), one)
        thr_pre = _const(thr, work) * pre
        # p: the power of two at max(|x|, threshold), so both x / p and threshold / p
        # stay below 2 and the scaled denominator lies in [1, 2 sqrt(size) + 2].
        p = _pow2_floor(
            _maximum(ops.max(ops.abs(x_pre), axis=norm_axes, keepdims=True), thr_pre), work
        )
        xs = x_pre / p
        s_sq = _sum(xs * xs, norm_axes)
        ns = ops.sqrt(s_sq)
        # 1 / p_true where x = xs * p_true; <= 2 / threshold for pre-multiplied slices,
        # and it may flush to 0 for huge slices, where eps is negligible anyway.
        inv_p = pre / p
        thr_s = _const(thr, work) * inv_p
    else:
        xs = x
        inv_p = None
        inf_slice = small = None
        ns = norm
        s_sq = ns * ns
        thr_s = _const(thr, work)
    eps_s = _const(spec.eps, work) if inv_p is None else _const(spec.eps, work) * inv_p
    ds, c = _denominator(ns, s_sq, thr_s, eps_s, spec.eps_mode, work)
    fs = one / ds
    q = fs if inv_p is None else fs * inv_p
    if inf_slice is not None:
        # The ±Inf limit: direction sign(x) / sqrt(k) whatever eps, input gradient 0.
        fs = ops.where(inf_slice, one / ops.where(inf_slice, ns, one), fs)
        q = ops.where(inf_slice, zero, q)
    u = xs * fs
    if s_b is None:
        return u, u, q, c
    if small is None:
        return u * s_b, u, q, c
    # Where eps dominates a tiny slice, x / p and u may fall below the normal range (and
    # be flushed to zero) while s * u does not: apply the scale before dividing by p.
    y = ops.where(small, (x_pre * s_b) / p, xs * s_b) * fs
    return y, u, q, c


def _cond(pred: Any, true_fn, false_fn) -> Any:
    """``ops.cond``, or a plain ``if`` when ``pred`` has a value (eager execution): it
    skips tracing both branches, which under JAX means compiling them on every call."""
    try:
        flag = bool(pred)
    except Exception:  # a symbolic tensor: tf.function graphs, JAX tracers
        return ops.cond(pred, true_fn, false_fn)
    return true_fn() if flag else false_fn()


def _split_factor(size: int) -> int | None:
    """A divisor of ``size`` near its square root, for :func:`_reduce_in_two`."""
    if size < 128:
        return None
    for k in range(int(size**0.5), 7, -1):
        if size % k == 0:
            return k
    return None


def _reduce_in_two(reduce: Any, v: Any, norm_axes: tuple[int, ...]) -> Any:
    """``reduce(v, axes, keepdims=True)`` over the normalized axes, in two stages when it
    is one long axis that is not the last.

    TensorFlow's kernels add along a strided axis one term after another, so the
    rounding error grows with its length (7 ULP on the norm of 2048 channels in NCHW,
    against 3 for the two stages). Splitting the axis ``C`` into ``(C / k, k)`` (a free
    reshape) and reducing each part in turn bounds it by about ``C / k + k`` additions;
    a length without a divisor between 8 and its square root keeps one stage.
    ``reduce`` is a sum or a Euclidean norm: both compose.
    """
    shape = tuple(v.shape)
    if len(norm_axes) == 1 and norm_axes[0] != len(shape) - 1 and None not in shape:
        axis = norm_axes[0]
        k = _split_factor(int(shape[axis]))
        if k is not None:
            split = ops.reshape(v, (*shape[:axis], shape[axis] // k, k, *shape[axis + 1 :]))
            kept = (*shape[:axis], 1, *shape[axis + 1 :])
            return ops.reshape(reduce(reduce(split, (axis + 1,)), (axis,)), kept)
    return reduce(v, norm_axes)


def _sum(v: Any, norm_axes: tuple[int, ...]) -> Any:
    """Sum over the normalized axes (kept), accurately on every backend."""
    return _reduce_in_two(lambda t, a: ops.sum(t, axis=a, keepdims=True), v, norm_axes)


def _plain_norm(x: Any, axes: Axes) -> Any:
    """``sqrt(sum(x**2))`` over the normalized axes, without scaling; one fused kernel on
    eager TensorFlow (XLA fuses the plain formula by itself)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # EuclideanNorm has no XLA kernel, and a traced graph may be compiled by XLA.
        if tf.executing_eagerly():
            return _reduce_in_two(
                lambda t, a: tf.math.reduce_euclidean_norm(t, axis=a, keepdims=True),
                x,
                axes.norm,
            )
    # Not torch.linalg.vector_norm: it adds term after term (6 ULP on a 36864-entry
    # slice), where torch.sum adds pairwise.
    return ops.sqrt(_sum(x * x, axes.norm))


def _fast_path_ok(norm: Any, axes: Axes, shape: Sequence[int | None], work: str) -> Any:
    """True when every plain norm is finite, its square too, and clear of underflow."""
    info = np.finfo(work)
    size = 1
    for a in axes.norm:
        dim = shape[a]
        size = size * int(dim) if dim is not None else 2**30
    # A flushed or subnormal square errs by at most smallest_normal; 2**30 such errors
    # per element of the slice stay below 2**-30 relative to a sum of at least lo.
    lo = float(info.smallest_normal) * size * 2.0**30
    hi = float(np.sqrt(info.max)) / 2
    ok = ops.logical_and(norm >= _const(np.sqrt(lo), work), norm <= _const(hi, work))
    return ops.all(ok)


def _broadcast_scale(scale: Any, axes: Axes) -> Any:
    shape = [1] * axes.ndim
    if tuple(scale.shape) not in ((), (1,)):
        shape[axes.channel] = scale.shape[0]
    return ops.reshape(scale, shape)


# --------------------------------------------------------------------------- eager TensorFlow

#: From this many elements on, the eager TensorFlow path runs its three elementwise
#: passes as XLA-compiled functions (one fused pass each instead of two to four eager
#: ops, each of which allocates a full-size tensor). Smaller inputs are dominated by
#: dispatch overhead and run the same formulas op by op, skipping a compilation per shape.
TF_XLA_MIN_SIZE = 1 << 16


def _tf_scale(x: Any, q: Any, s: Any) -> Any:
    """``y = (x / d) * s``: the forward's one full-size pass."""
    import tensorflow as tf

    return tf.cast((tf.cast(x, q.dtype) * q) * s, x.dtype)


def _tf_g_u(g: Any, x: Any, q: Any) -> Any:
    """``g * u`` with ``u = x / d``: what both gradient contractions read."""
    import tensorflow as tf

    return tf.cast(g, q.dtype) * (tf.cast(x, q.dtype) * q)


def _tf_input_grad(g: Any, x: Any, s: Any, q: Any, k: Any) -> Any:
    """``dx = (s g - k x) / d`` with ``k = c <s g, u> / d`` per slice."""
    import tensorflow as tf

    return tf.cast((tf.cast(g, q.dtype) * s - k * tf.cast(x, q.dtype)) * q, x.dtype)


@functools.cache
def _tf_xla(fn: Any) -> Any:
    import tensorflow as tf

    # reduce_retracing: one trace for every shape (XLA still compiles per shape) and no
    # retracing warnings for a model fed several image sizes.
    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=True)


def _tf_contract(
    gu: Any, s: Any, scale_shape: tuple | None, axes: Axes, on_cpu: bool
) -> tuple[Any, Any]:
    """``(<s g, u>`` per slice, ``dscale)`` from ``gu = g * u``.

    Where only the channel axis is normalized both sums are matrix products over a
    reshaped view (one read of ``gu`` each, no temporary) on CPU; elsewhere, and on GPUs
    (whose matmuls may run in TF32), plain reductions.
    """
    import tensorflow as tf

    if scale_shape is None or int(np.prod(scale_shape)) == 1:
        inner = _sum(gu, axes.norm) * s
        dscale = None if scale_shape is None else tf.reshape(tf.reduce_sum(gu), scale_shape)
        return inner, dscale
    shape = tuple(gu.shape)
    if axes.norm == (axes.channel,) and on_cpu:
        channels = shape[axes.channel]
        prefix = int(np.prod(shape[: axes.channel]))
        suffix = int(np.prod(shape[axes.channel + 1 :]))
        kept = [1 if a == axes.channel else d for a, d in enumerate(shape)]
        s_vec = tf.reshape(s, (channels,))
        if suffix == 1:  # channels last: rows of C
            rows = tf.reshape(gu, (prefix, channels))
            inner = tf.linalg.matvec(rows, s_vec)
            dscale = tf.linalg.matvec(rows, tf.ones((prefix,), gu.dtype), transpose_a=True)
        else:  # channels first: (prefix, C, suffix) blocks
            blocks = tf.reshape(gu, (prefix, channels, suffix))
            inner = tf.linalg.matmul(tf.reshape(s_vec, (1, channels)), blocks)
            dscale = tf.reduce_sum(blocks, axis=(0, 2))
        return tf.reshape(inner, kept), dscale
    inner = _sum(gu * s, axes.norm)
    return inner, tf.reduce_sum(gu, axis=axes.reduced)


def _tf_eager_normalize(x: Any, scale: Any | None, spec: Spec, axes: Axes) -> Any | None:
    """Eager TensorFlow, fast path: the result, or None where the generic path must run
    (a traced graph, or a batch with a slice that needs the exact rescaling).

    Same maths as :func:`_slice_parts` without rescaling and the same backward formula;
    the norm comes from one fused kernel, every full-size pass is one kernel, and the
    residuals are ``x`` and two per-slice factors.
    """
    import tensorflow as tf

    if not tf.executing_eagerly():
        return None
    x_dtype = keras.backend.standardize_dtype(x.dtype)
    work = _working_dtype(x_dtype)
    x_in = tf.stop_gradient(x)  # nothing below is recorded on an active tape
    norm = _plain_norm(tf.cast(x_in, work), axes)
    if not bool(_fast_path_ok(norm, axes, tuple(x.shape), work)):
        return None
    d, c = _denominator(
        norm,
        norm * norm,
        _const(spec.threshold, work),
        _const(spec.eps, work),
        spec.eps_mode,
        work,
    )
    q = 1.0 / d
    big = int(np.prod(x.shape)) >= TF_XLA_MIN_SIZE

    def kernel(fn: Any) -> Any:
        return _tf_xla(fn) if big else fn

    on_cpu = "GPU" not in x_in.device.upper()
    if scale is None:
        s_b, scale_shape, s_dtype = tf.ones((), work), None, None
    else:
        s_b = tf.stop_gradient(_broadcast_scale(tf.cast(scale, work), axes))
        scale_shape = tuple(scale.shape)
        s_dtype = scale.dtype

    def backward(g: Any) -> tuple[Any, Any]:
        gu = kernel(_tf_g_u)(g, x_in, q)
        inner, dscale = _tf_contract(gu, s_b, scale_shape, axes, on_cpu)
        dx = kernel(_tf_input_grad)(g, x_in, s_b, q, c * inner * q)
        return dx, None if dscale is None else tf.cast(dscale, s_dtype)

    y = kernel(_tf_scale)(x_in, q, s_b)
    if scale is None:

        @tf.custom_gradient
        def unscaled(xv: Any) -> Any:
            return y, lambda g: backward(g)[0]

        return unscaled(x)

    @tf.custom_gradient
    def scaled(xv: Any, sv: Any) -> Any:
        return y, backward

    return scaled(x, scale)


def _normalize(x: Any, scale: Any | None, spec: Spec, axes: Axes) -> Any:
    """The forward pass with the reference's exact gradient attached."""
    x_dtype = keras.backend.standardize_dtype(x.dtype)
    work = _working_dtype(x_dtype)
    if keras.backend.backend() == "tensorflow":
        y = _tf_eager_normalize(x, scale, spec, axes)
        if y is not None:
            return y

    def forward(xv: Any, s_b: Any | None) -> tuple[Any, Any, Any, Any]:
        xw = ops.cast(xv, work)
        norm = _plain_norm(xw, axes)
        return _cond(
            _fast_path_ok(norm, axes, tuple(xv.shape), work),
            lambda: _slice_parts(xw, norm, s_b, spec, axes, work, rescale=False),
            lambda: _slice_parts(xw, None, s_b, spec, axes, work, rescale=True),
        )

    # The backward formula of l2norm.reference (its module docstring), with u = x / d:
    #   dx = (sigma - c * u * <sigma, u>) / d,  c = r / (n / d)**2,  sigma = s * g,
    #   dscale_c = sum over all axes but c of g * u.
    def input_grad(sigma: Any, u: Any, q: Any, c: Any) -> Any:
        inner = _sum(sigma * u, axes.norm)
        return ops.cast((sigma - (c * inner) * u) * q, x_dtype)

    if scale is None:

        @ops.custom_gradient
        def unscaled(xv):
            y, u, q, c = forward(xv, None)

            def grad(*args, upstream=None):
                g = args[0] if upstream is None else upstream
                return input_grad(ops.cast(g, work), u, q, c)

            return ops.cast(y, x_dtype), grad

        return unscaled(x)

    s_dtype = keras.backend.standardize_dtype(scale.dtype)

    @ops.custom_gradient
    def scaled(xv, sv):
        s_b = _broadcast_scale(ops.cast(sv, work), axes)
        y, u, q, c = forward(xv, s_b)

        def grad(*args, upstream=None):
            g = ops.cast(args[0] if upstream is None else upstream, work)
            gu = g * u
            if tuple(sv.shape) in ((), (1,)):
                dscale = ops.reshape(ops.sum(gu), tuple(sv.shape))
            else:
                dscale = ops.sum(gu, axis=axes.reduced)
            return input_grad(g * s_b, u, q, c), ops.cast(dscale, s_dtype)

        return ops.cast(y, x_dtype), grad

    return scaled(x, scale)


def _check_input(x: Any, spec: Spec) -> Axes:
    dtype = keras.backend.standardize_dtype(x.dtype)
    check_float_dtype(dtype, what="L2Norm input")
    return spec.resolve(len(x.shape))


def l2_normalize(
    x: Any,
    scale: Any = None,
    *,
    axis: int | Sequence[int] = -1,
    across_spatial: bool = False,
    eps: float | None = None,
    eps_mode: str | None = None,
    preset: str | None = None,
) -> Any:
    """L2-normalize ``x`` along ``axis`` and multiply by ``scale``, with ``keras.ops``.

    The functional form of :class:`L2Norm`, with the same maths and gradient.

    Args:
        x: a float16, bfloat16, float32 or float64 tensor of the current backend.
        scale: None, one shared value (shape ``()`` or ``(1,)``), or one value per
            channel of the channel axis.
        axis: the normalized axis, or a list of axes whose first entry is the channel
            axis.
        across_spatial: one norm per sample over every axis but the first.
        eps, eps_mode, preset: see :class:`L2Norm`.

    Returns:
        A tensor of ``x``'s shape and dtype.

    Example:
        >>> import numpy as np
        >>> from l2norm.keras import l2_normalize
        >>> x = np.array([[3.0, 4.0]], dtype="float32")
        >>> np.asarray(keras.ops.convert_to_numpy(l2_normalize(x, np.float32([10.0]))))
        array([[6., 8.]], dtype=float32)
    """
    spec = Spec.create(
        axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
    )
    x = ops.convert_to_tensor(x)
    axes = _check_input(x, spec)
    if scale is not None:
        scale = ops.convert_to_tensor(scale)
        check_float_dtype(keras.backend.standardize_dtype(scale.dtype), what="scale")
        check_scale_shape(tuple(scale.shape), x.shape[axes.channel], axes)
    return _normalize(x, scale, spec, axes)


# --------------------------------------------------------------------------- the layer


@keras.saving.register_keras_serializable(package="l2norm")
class L2Norm(keras.layers.Layer):
    r"""L2 normalization with a learnable scale (ParseNet, SSD's ``conv4_3_norm``).

    Each slice along the normalized axes is divided by its L2 norm and multiplied by a
    learnable per-channel scale ``gamma`` (initialised to 20 as in SSD):

    .. math::

        y = \gamma \cdot \frac{x}{d(\lVert x \rVert)}

    where ``d`` places ``eps`` as ``eps_mode`` says (default ``max(||x||, eps)``, as
    ``keras.ops.normalize``). The norm is computed without overflow or underflow for
    every finite input, a slice holding NaN is NaN, a slice holding ±Inf takes its
    limit direction, and the gradient is the exact one, finite for every finite input
    (also at an all-zero slice, where autodiff of ``x / (||x|| + eps)`` gives NaN).

    float16 and bfloat16 inputs are normalized in float32 and the output is rounded
    once; under the ``mixed_float16`` / ``mixed_bfloat16`` policies ``gamma`` stays
    float32 and is applied in float32 too.

    Example:

    >>> import numpy as np
    >>> x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype="float32")
    >>> layer = L2Norm(scale_init=10.0)
    >>> keras.ops.convert_to_numpy(layer(x))
    array([[6., 8.],
           [0., 0.]], dtype=float32)

    Args:
        axis: Integer or list of integers. The axis to normalize (and the channel
            axis ``gamma`` runs along); with a list, all of them are normalized and the
            first one is the channel axis. A channels_first model passes ``axis=1``.
            Defaults to ``-1``.
        scale_init: Initial ``gamma``: a float, a list with one value per channel, or
            any Keras initializer (name, instance or config dict). Defaults to ``20.0``.
        channel_shared: One scalar ``gamma`` (shape ``(1,)``) instead of one per
            channel, as Caffe's ``channel_shared``. Defaults to ``False``.
        across_spatial: One norm per sample over every axis but the first (Caffe's
            ``across_spatial``); ``axis`` then names only the channel axis.
            Defaults to ``False``.
        learnable: Whether ``gamma`` is trainable. Defaults to ``True``.
        eps: Positive epsilon. Defaults to ``1e-12`` (or the preset's).
        eps_mode: ``"clamp_norm"`` (``max(n, eps)``, the default), ``"clamp_sumsq"``
            (``sqrt(max(n**2, eps))``, ``tf.math.l2_normalize``), ``"add_norm"``
            (``n + eps``, ssd.pytorch) or ``"add_sumsq"`` (``sqrt(n**2 + eps)``, Caffe).
        preset: A peer's eps and eps_mode: ``"caffe"``, ``"ssd.pytorch"``, ``"mmdet"``,
            ``"torchvision"``, ``"tensorflow"``, ``"ssd_keras"`` or ``"keras"``.
        **kwargs: Base layer keyword arguments, e.g. ``name`` and ``dtype``.

    Input shape:
        Arbitrary, with rank high enough for ``axis``.

    Output shape:
        Same shape as the input.
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        *,
        scale_init: Any = 20.0,
        channel_shared: bool = False,
        across_spatial: bool = False,
        learnable: bool = True,
        eps: float | None = None,
        eps_mode: str | None = None,
        preset: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = Spec.create(
            axis=axis, across_spatial=across_spatial, eps=eps, eps_mode=eps_mode, preset=preset
        )
        for name, value in (("channel_shared", channel_shared), ("learnable", learnable)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else axis
        self.channel_shared = bool(channel_shared)
        self.across_spatial = bool(across_spatial)
        self.learnable = bool(learnable)
        self.eps = eps
        self.eps_mode = eps_mode
        self.preset = preset
        self.scale_init = self._check_scale_init(scale_init)
        self.supports_masking = True

    def _check_scale_init(self, scale_init: Any) -> Any:
        if isinstance(scale_init, (str, dict, keras.initializers.Initializer)):
            try:
                return keras.initializers.get(scale_init)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"scale_init={scale_init!r} is not a Keras initializer; pass a float, a "
                    "list with one value per channel, or an initializer name / instance"
                ) from err
        if isinstance(scale_init, numbers.Real) and not isinstance(scale_init, bool):
            scale_init_values(scale_init, 1, True)  # finiteness
            return float(scale_init)
        if callable(scale_init):
            return scale_init
        values = scale_init_values(scale_init, None, False)
        if self.channel_shared and values.shape != (1,):
            raise ValueError(
                f"scale_init has shape {values.shape} but channel_shared=True takes one "
                "value; pass a float or a list of length 1"
            )
        return [float(v) for v in values]

    def build(self, input_shape: Sequence[int | None]) -> None:
        axes = self.spec.resolve(len(input_shape))
        channels = input_shape[axes.channel]
        if channels is None:
            raise ValueError(
                f"L2Norm needs a known size on the channel axis {axes.channel}, got input "
                f"shape {tuple(input_shape)}"
            )
        size = 1 if self.channel_shared else int(channels)
        init = self.scale_init
        if isinstance(init, (float, list)):
            values = scale_init_values(init, int(channels), self.channel_shared)

            def init(shape, dtype=None, values=values):
                return ops.cast(values.reshape(shape), dtype)

        self._channels = int(channels)
        self.gamma = self.add_weight(
            name="gamma",
            shape=(size,),
            initializer=init,
            trainable=self.learnable,
            # Under mixed precision gamma stays float32 and is applied in float32.
            autocast=False,
        )

    def call(self, inputs: Any) -> Any:
        axes = _check_input(inputs, self.spec)
        channels = inputs.shape[axes.channel]
        if channels is not None and channels != self._channels:
            raise ValueError(
                f"L2Norm was built for {self._channels} channels on axis {axes.channel}, "
                f"got an input of shape {tuple(inputs.shape)} with {channels}"
            )
        gamma = self.gamma.value
        if hasattr(gamma, "read_value"):
            # A tf.Variable: tf.custom_gradient wants tensors in, not variables read inside.
            gamma = gamma.read_value()
        return _normalize(inputs, gamma, self.spec, axes)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple:
        self.spec.resolve(len(input_shape))
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        init = self.scale_init
        if not isinstance(init, (float, list)):
            init = keras.initializers.serialize(init)
        config.update(
            {
                "axis": self.axis,
                "scale_init": init,
                "channel_shared": self.channel_shared,
                "across_spatial": self.across_spatial,
                "learnable": self.learnable,
                "eps": self.eps,
                "eps_mode": self.eps_mode,
                "preset": self.preset,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> L2Norm:
        try:
            return cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot rebuild L2Norm from config {config!r}: {err}") from err


# --------------------------------------------------------------------------- conformance


def _to_tensor(a: np.ndarray) -> Any:
    # bfloat16 goes through float32 (exact) because not every backend converts
    # ml_dtypes arrays.
    name = a.dtype.name
    if name == "bfloat16":
        return ops.cast(ops.convert_to_tensor(a.astype(np.float32)), "bfloat16")
    return ops.convert_to_tensor(a, dtype=name)


def _to_numpy(t: Any, dtype: np.dtype) -> np.ndarray:
    if keras.backend.standardize_dtype(t.dtype) == "bfloat16":
        t = ops.cast(t, "float32")
    return np.asarray(ops.convert_to_numpy(t)).astype(dtype)


def _backend_vjp(fn, args: list, g: Any) -> list:
    """The gradient of ``fn(*args)`` for cotangent ``g``, by the backend's own autodiff."""
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for a in args:
                tape.watch(a)
            y = fn(*args)
        return tape.gradient(y, args, output_gradients=g)
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


def _conformance_forward(x: np.ndarray, scale: np.ndarray | None, options: dict) -> np.ndarray:
    s = None if scale is None else _to_tensor(scale)
    return _to_numpy(l2_normalize(_to_tensor(x), s, **options), x.dtype)


def _conformance_vjp(x, scale, g, options):
    args = [_to_tensor(x)] + ([] if scale is None else [_to_tensor(scale)])
    grads = _backend_vjp(lambda *a: l2_normalize(*a, **options), args, _to_tensor(g))
    dx = _to_numpy(grads[0], x.dtype)
    return dx, None if scale is None else _to_numpy(grads[1], scale.dtype)


def _register() -> conformance.Backend:
    name = keras.backend.backend()
    dtypes = FLOAT_DTYPES
    if name == "jax":
        import jax

        # Without jax_enable_x64 JAX has no float64 arrays at all.
        if not jax.config.jax_enable_x64:
            dtypes = tuple(d for d in FLOAT_DTYPES if d != "float64")
    return conformance.register(
        conformance.Backend(
            name=f"keras-{name}",
            forward=_conformance_forward,
            vjp=_conformance_vjp,
            # TensorFlow's and XLA's CPU kernels flush subnormal results to zero.
            flushes_subnormals=name in ("tensorflow", "jax"),
            dtypes=dtypes,
        )
    )


BACKEND = _register()
