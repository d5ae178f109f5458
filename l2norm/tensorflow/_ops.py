r"""The TensorFlow lowering of :mod:`l2norm.keras`: the ladder of :mod:`l2norm.core.ladder` in
TensorFlow ops, compiled with XLA, with the exact gradient attached by
``tf.custom_gradient``.

Keras delegates to :mod:`l2norm.jax` and :mod:`l2norm.torch` on those backends;
TensorFlow has no adapter of its own, so this module is it: the hooks of the one ladder
driver (:mod:`l2norm.core.driver`) in TensorFlow ops, the forward and the backward each one
XLA program, the rungs' sums and the count of infinities one multi-output reduction in
stages of 8 terms (:func:`sum_plan`); the slice factors are the backward's residuals.

Every slice goes through the same selects whatever its neighbours hold: there is no
``tf.cond`` and no Python branch on data, so a sample's output and input gradient do not
depend on the rest of the batch, and the same code runs eagerly, inside ``tf.function``
graphs (``model.fit``) and inside an outer ``jit_compile=True`` function.

float16 and bfloat16 inputs are summed in float32, float32 and float64 in float64 (every
float32 square is exact there); float64 in a pair (:func:`l2norm.core.faithful.refined_pair`).
The output has the input's dtype, the scale's gradient the scale's dtype.

TensorFlow's and XLA's CPU kernels read subnormal operands as zero, so the ladder's top
rung (the one that serves slices of subnormals) builds ``x * 2**s`` from the bits of
``x`` (:func:`exact_upscale`), and bfloat16 is widened by moving its bits.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from l2norm.tensorflow import _preload  # noqa: F401  (before TensorFlow: see there)

# isort: split
import tensorflow as tf

try:  # XLA's own operations, reachable inside jit_compile functions (as jax2tf uses them)
    from tensorflow.compiler.tf2xla.ops.gen_xla_ops import xla_optimization_barrier as _barrier
    from tensorflow.compiler.tf2xla.python import xla as _tfxla
except ImportError:  # pragma: no cover - a TensorFlow without them: plain reductions
    _barrier = _tfxla = None

from tensorflow.python.eager import record as _record
from tensorflow.python.ops import control_flow_util as _control_flow

from l2norm.core import driver as _driver
from l2norm.core import ladder as _ladder
from l2norm.core import portable as _portable
from l2norm.core.ladder import FORMATS, Ladder, SliceFactors
from l2norm.core.modes import get_mode
from l2norm.core.spec import Axes, Spec

__all__ = ["normalize", "exact_upscale", "exporting", "portable"]

#: Slice length assumed when a normalized axis has no static size (a traced graph with
#: dynamic spatial axes): a ladder for longer slices is valid for shorter ones too.
UNKNOWN_SIZE = 2**31 - 1


class _TFNamespace:
    """The array namespace :mod:`l2norm.core.ladder` and :mod:`l2norm.core.modes` compute with:
    NumPy's names for TensorFlow's ops."""

    sqrt = staticmethod(tf.sqrt)
    where = staticmethod(tf.where)
    ones_like = staticmethod(tf.ones_like)
    zeros_like = staticmethod(tf.zeros_like)
    isinf = staticmethod(tf.math.is_inf)
    isfinite = staticmethod(tf.math.is_finite)
    isnan = staticmethod(tf.math.is_nan)
    sign = staticmethod(tf.sign)
    clip = staticmethod(tf.clip_by_value)

    @staticmethod
    def full_like(t: tf.Tensor, value: float) -> tf.Tensor:
        # tf.constant in t's dtype: 2.0**600 is exact in float64 (a float32 detour is not).
        return tf.fill(tf.shape(t), tf.constant(value, t.dtype))

    def __getattr__(self, name: str) -> Any:
        # Any other NumPy name with the same meaning in tf.math (abs, maximum, ...).
        try:
            return getattr(tf.math, name)
        except AttributeError:
            raise AttributeError(f"the TensorFlow namespace has no {name!r}") from None


XP = _TFNamespace()

_INT_OF = {tf.float32: tf.int32, tf.float64: tf.int64}


#: How TensorFlow reads and writes a float's bits (:class:`l2norm.core.driver.Bits`).
_BITS = _driver.Bits(
    lambda v: (tf.bitcast(v, _INT_OF[v.dtype]), FORMATS[v.dtype.name]),
    lambda bits, like: tf.bitcast(bits, like.dtype),
    lambda ints, like: tf.cast(ints, like.dtype),
)


def exact_upscale(x: tf.Tensor, shift: int) -> tf.Tensor:
    """``x * 2**shift``, exact also where ``x`` is subnormal and ``shift > 0``
    (:func:`l2norm.core.driver.exact_upscale`: TensorFlow's CPU kernels flush subnormals).

    Example:
        >>> import numpy as np
        >>> x = tf.constant(np.float32([1e-45, -3e-40, 2.0]))
        >>> exact_upscale(x, 100).numpy() / np.float32([2.0**100]) == x.numpy()
        array([ True,  True,  True])
    """
    return _driver.exact_upscale(XP, _BITS, x, shift)


def _widen(x: tf.Tensor, acc: tf.DType) -> tf.Tensor:
    """``x`` in the accumulator dtype, subnormals kept."""
    if x.dtype == tf.bfloat16:
        # A float conversion may flush a bfloat16 subnormal; moving its bits does not
        # (bfloat16 is the upper half of a float32).
        bits = tf.cast(tf.bitcast(x, tf.uint16), tf.uint32)
        return tf.bitcast(tf.bitwise.left_shift(bits, tf.constant(16, tf.uint32)), tf.float32)
    if x.dtype == tf.float32 and acc == tf.float64:
        # The conversion reads a float32 subnormal as 0 on a flushing CPU; its integer
        # significand times 2**-149 is exact and normal in float64.
        bits = tf.bitcast(x, tf.int32)
        magnitude = tf.bitwise.bitwise_and(bits, tf.constant(0x7FFFFFFF, tf.int32))
        rebuilt = tf.cast(magnitude, tf.float64) * tf.constant(2.0**-149, tf.float64)
        rebuilt = tf.where(bits < 0, -rebuilt, rebuilt)
        return tf.where(magnitude < (1 << 23), rebuilt, tf.cast(x, tf.float64))
    return tf.cast(x, acc)


def _widen_magnitude(x: tf.Tensor, acc: tf.DType) -> tf.Tensor:
    """``|x|`` in the accumulator dtype, subnormals kept: what a sum of squares reads, in
    fewer operations than :func:`_widen` (no sign to restore)."""
    if x.dtype == tf.float32 and acc == tf.float64:
        magnitude = tf.bitwise.bitwise_and(tf.bitcast(x, tf.int32), tf.constant(0x7FFFFFFF))
        rebuilt = tf.cast(magnitude, tf.float64) * tf.constant(2.0**-149, tf.float64)
        return tf.where(magnitude < (1 << 23), rebuilt, tf.cast(tf.abs(x), tf.float64))
    return tf.abs(_widen(x, acc))


def _acc_dtype(dtype: tf.DType) -> tf.DType:
    return tf.float64 if dtype in (tf.float32, tf.float64) else tf.float32


#: A reduction plan: the normalized axes in the order they are summed, each with the
#: lengths of its stages, innermost first (their product is the axis length; one entry,
#: None, for an axis of unknown length). See :func:`sum_plan`.
Plan = tuple[tuple[int, tuple["int | None", ...]], ...]

#: The length of a stage: short chains of additions, and XLA's CPU code for a
#: multi-output reduction of 8 contiguous terms is vectorized (it is 3-4 times slower
#: for 16 or 32).
STAGE = 8


def _stages(size: int | None) -> tuple[int | None, ...]:
    """Stage lengths for an axis of ``size`` entries: 8 at a time while it divides, then
    a divisor near the square root of a long remainder, then the rest."""
    if size is None:
        return (None,)
    stages = []
    while size > STAGE and size % STAGE == 0:
        stages.append(STAGE)
        size //= STAGE
    if size >= 128:
        for k in range(math.isqrt(size), STAGE - 1, -1):
            if size % k == 0:
                stages.append(k)
                size //= k
                break
    return (*stages, size)


def sum_plan(shape: tf.TensorShape, axes: Axes) -> Plan:
    """How :func:`staged_sums` sums a slice: one normalized axis at a time, innermost
    first, each in stages (:func:`_stages`; splitting an axis is a free reshape).

    XLA's CPU reductions add a slice's terms in a few sequential chains (a multi-output
    reduction: in one chain per output), so the rounding error grows with the chain's
    length: 8 ULP on ``y`` for one norm over 256 x 12 x 12 entries summed at once, 17 ULP
    on a sum of 512 squares by a multi-output reduction. Stages of 8 keep every chain
    short. The plan depends on the slice's shape only, never on the batch.
    """
    return tuple(
        (axis, _stages(None if shape[axis] is None else int(shape[axis])))
        for axis in sorted(axes.norm, reverse=True)
    )


@functools.cache
def _adder(count: int, dtype: tf.DType) -> Any:
    """The reducer of a ``count``-output sum: ``(a_1..a_n, b_1..b_n) -> (a_i + b_i)``."""
    with tf.init_scope():  # a graph-independent function, also when built during a trace

        def add(*args: tf.Tensor) -> tuple[tf.Tensor, ...]:
            return tuple(args[i] + args[i + count] for i in range(count))

        signature = [tf.TensorSpec([], dtype)] * (2 * count)
        return tf.function(add, input_signature=signature, autograph=False).get_concrete_function()


def _sum_over(terms: list[tf.Tensor], dim: int) -> list[tf.Tensor]:
    """Each of ``terms`` (one shape) summed over ``dim``, in one pass over them, each
    term after term, first to last, whatever the size of the array.

    One multi-output reduction where XLA is reachable: XLA on CPU does not fuse sibling
    reductions, and separate ones read the input once per rung. It also fixes the order:
    XLA's CPU reduction with a single output adds in an order that depends on the size
    of the whole array (in vector lanes once it holds some 2**15 entries; other orders for
    longer rows or along outer axes), so that a sample's sums, and its output, would
    change with the batch; the multi-output one adds term after term. A single term is
    therefore summed next to a zero operand. The barrier keeps XLA from merging the
    stages of :func:`staged_sums` back into one long chain.
    """
    if _tfxla is None:
        sums = [tf.reduce_sum(t, axis=dim) for t in terms]
    else:
        operands = terms if len(terms) > 1 else [terms[0], tf.zeros_like(terms[0])]
        zero = tf.zeros([], terms[0].dtype)
        sums = _tfxla.variadic_reduce(
            operands,
            [zero] * len(operands),
            dimensions_to_reduce=[dim],
            reducer=_adder(len(operands), terms[0].dtype),
        )
        sums = list(sums)[: len(terms)]
    return sums if _barrier is None else list(_barrier(sums))


def staged_sums(terms: list[tf.Tensor], plan: Plan) -> list[tf.Tensor]:
    """Each of ``terms`` (arrays of one shape) summed over the planned axes (kept), each
    stage's terms added first to last (:func:`_sum_over`): the same sums at any batch size.

    Example:
        >>> v = tf.reshape(tf.range(32.0), [2, 16])
        >>> plan = sum_plan(v.shape, Axes(norm=(1,), channel=1, ndim=2))
        >>> staged_sums([v], plan)[0].numpy().ravel()
        array([120., 376.], dtype=float32)
    """
    for axis, stages in plan:
        for k in stages[:-1]:  # all but the last stage: split the axis, sum the inner part
            shape = tf.shape(terms[0])
            split = tf.concat([shape[:axis], [shape[axis] // k, k], shape[axis + 1 :]], 0)
            terms = _sum_over([tf.reshape(t, split) for t in terms], axis + 1)
        terms = [tf.expand_dims(t, axis) for t in _sum_over(terms, axis)]
    return terms


#: float64 data: the chosen rung summed again as a pair (l2norm.core.faithful.refined_pair).
_PAIRS = _driver.bit_pairs(_BITS)
_split = _PAIRS.split  # the split alone (tests/test_compensated.py)


def _sum_to_scale(v: tf.Tensor, scale_axes: tuple[int, ...]) -> tf.Tensor:
    """``v`` summed over ``scale_axes``: the innermost one first, on its own (one XLA
    column reduction over every pixel at once runs 10 times slower on CPU)."""
    # Summed over the batch: its order may depend on the batch size (plain reductions).
    v = tf.reduce_sum(v, axis=scale_axes[-1])
    v = v if _barrier is None else _barrier([v])[0]
    return tf.reduce_sum(v, axis=scale_axes[:-1]) if len(scale_axes) > 1 else v


def _hooks(x: tf.Tensor, plan: Plan, scale_axes: tuple[int, ...] | None) -> _driver.Hooks:
    """The driver's hooks: staged reductions, the exact upscale, the scale inside."""

    def sums(xw: tf.Tensor, ladder: Ladder) -> tuple[list, tf.Tensor]:
        # One rung reads only the squares and the infinities: |x| from x itself is
        # cheaper than xw (no sign to restore) and gives the same squares.
        read = _widen_magnitude(x, xw.dtype) if ladder.single else xw
        # The ladder's full-size terms (``reduce`` left as the identity), summed together.
        terms, infinite = _ladder.sums(XP, read, ladder, lambda v: v, exact_upscale)
        *rung_sums, n_inf = staged_sums([*terms, infinite], plan)
        return rung_sums, n_inf

    return _driver.Hooks(
        XP,
        _acc_dtype(x.dtype).name,
        lambda v: staged_sums([v], plan)[0],
        lambda a, b: tuple(staged_sums([a, b], plan)),  # the pair's two sums in one pass
        lambda v: _sum_to_scale(v, scale_axes),
        exact_upscale,
        _PAIRS if x.dtype == tf.float64 else None,  # as wide as the accumulator
        sums,
        # y = ((x 2**s) (scale / d_s)) 2**-s...: ``u = x / d`` itself may be subnormal (a
        # subnormal slice with a large eps), which the CPU flushes to zero although
        # ``scale * u`` is normal. (It costs range only for a scale above ~2**60 in float32.)
        scale_order="inside",
    )


def _forward_program(
    x: tf.Tensor, s: tf.Tensor | None, ladder: Ladder, plan: Plan
) -> tuple[tf.Tensor, SliceFactors]:
    """``(y, factors)``: the output in ``x``'s dtype and the per-slice residuals."""
    out = _driver.forward(_hooks(x, plan, None), _widen(x, _acc_dtype(x.dtype)), s, ladder)
    return tf.cast(out.y, x.dtype), out.factors


def _backward_program(
    x: tf.Tensor,
    s: tf.Tensor | None,
    g: tf.Tensor,
    f: SliceFactors,
    ladder: Ladder,
    plan: Plan,
    scale_axes: tuple[int, ...] | None,
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``(dx, dscale)`` for the cotangent ``g``; ``dscale`` summed over ``scale_axes``
    (None: no scale)."""
    acc = _acc_dtype(x.dtype)
    hooks = _hooks(x, plan, scale_axes)
    dx, dscale = _driver.vjp(hooks, _widen(x, acc), s, _widen(g, acc), f, ladder, x.dtype.name)
    return tf.cast(dx, x.dtype), dscale


#: Compiled programs kept alive (each holds one XLA executable per input shape): enough
#: for every L2Norm configuration of a model, bounded for programs that sweep many.
PROGRAM_CACHE_SIZE = 64


@functools.lru_cache(maxsize=PROGRAM_CACHE_SIZE)
def _programs(ladder: Ladder, plan: Plan, scale_axes: tuple[int, ...] | None) -> tuple[Any, Any]:
    """The forward and the backward of one static configuration, each an XLA program
    (its reductions and elementwise passes fused). One ``tf.function`` per configuration,
    so that a new configuration is a new function, not a retrace of a shared one (which
    TensorFlow warns about); ``reduce_retracing`` lets one trace serve every shape (XLA
    still compiles per shape), so a model fed several image sizes draws no warning."""

    def compile_(fn: Any, **static: Any) -> Any:
        # A partial, not a closure: TensorFlow counts retracings per code object, and
        # the closures of all configurations would share one.
        program = functools.partial(fn, **static)
        return tf.function(program, jit_compile=True, autograph=False, reduce_retracing=True)

    return (
        compile_(_forward_program, ladder=ladder, plan=plan),
        compile_(_backward_program, ladder=ladder, plan=plan, scale_axes=scale_axes),
    )


def slice_size(shape: tf.TensorShape, axes: Axes) -> int:
    """Entries per slice, or :data:`UNKNOWN_SIZE` where a normalized axis is dynamic."""
    dims = [shape[a] for a in axes.norm]
    if any(d is None for d in dims):
        return UNKNOWN_SIZE
    return max(1, math.prod(int(d) for d in dims))


def exporting() -> bool:
    """Whether this call is being recorded into a graph meant to leave TensorFlow's XLA:
    a ``tf.function`` traced outside every XLA context with no gradient tape recording,
    which is how ``model.export``, ``tf.saved_model.save`` and the TFLite converter (by
    way of a SavedModel) trace a Keras 3 model. Eager calls, XLA-compiled functions
    (``jit_compile=True``, Keras' default for ``fit`` / ``predict``) and traces under a
    tape (training steps) run the XLA programs."""
    if tf.executing_eagerly():
        return False
    in_xla = _control_flow.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    return not in_xla and not _record.could_possibly_record()


def portable(x: tf.Tensor, scale: tf.Tensor | None, spec: Spec, axes: Axes) -> tf.Tensor:
    """The exported formula (:mod:`l2norm.core.portable`) in TensorFlow ops that the TFLite
    converter maps to builtin operators (``ABS``, ``REDUCE_MAX``, ``MAXIMUM``, ``EQUAL``,
    ``SIGN``, ``DIV``, ``SELECT_V2``, ``MUL``, ``SUM``, ``SQRT``, ``ADD`` or ``GREATER``,
    and ``CAST`` for half precision); differentiated, if at all, by TensorFlow's autodiff.

    Example:
        >>> from l2norm.core.spec import Spec
        >>> spec = Spec.create(axis=-1)
        >>> x = tf.constant([[3e38, 2e38], [0.0, 0.0]])  # the sum of squares overflows
        >>> portable(x, None, spec, spec.resolve(2)).numpy().round(4)
        array([[0.8321, 0.5547],
               [0.    , 0.    ]], dtype=float32)
    """
    work = tf.as_dtype(_portable.working_dtype(x.dtype.name))
    if scale is not None:
        shape = [-1 if a == axes.channel else 1 for a in range(axes.ndim)]
        scale = tf.reshape(tf.cast(scale, work), shape)
    y = _portable.normalized(
        XP,
        tf.cast(x, work),
        scale,
        get_mode(spec.eps_mode),
        spec.eps,
        lambda v: tf.reduce_max(v, axis=axes.norm, keepdims=True),
        lambda v: tf.reduce_sum(v, axis=axes.norm, keepdims=True),
        work.name,
        tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), list(axes.norm))), work),
    )
    return tf.cast(y, x.dtype)


def normalize(x: tf.Tensor, scale: tf.Tensor | None, spec: Spec, axes: Axes) -> tf.Tensor:
    """``scale * x / d(||x||)`` with the exact gradient, for a validated call.

    In a graph being exported (:func:`exporting`) it is :func:`portable` instead: what
    TFLite and TensorFlow Serving without XLA can run.

    ``scale`` is None, shape ``()`` / ``(1,)``, or one value per channel of
    ``axes.channel`` (checked by the caller); any float dtype (float32 for a half ``x``
    under mixed precision). Works eagerly and in ``tf.function`` graphs.

    Example:
        >>> from l2norm.core.spec import Spec
        >>> spec = Spec.create(axis=-1)
        >>> x = tf.constant([[3.0, 4.0], [0.0, 0.0]])
        >>> normalize(x, tf.constant([20.0, 10.0]), spec, spec.resolve(2)).numpy()
        array([[12.,  8.],
               [ 0.,  0.]], dtype=float32)
    """
    if exporting():
        return portable(x, scale, spec, axes)
    acc = _acc_dtype(x.dtype)
    size = slice_size(x.shape, axes)
    if size == UNKNOWN_SIZE and get_mode(spec.eps_mode).mean:
        raise ValueError(
            f"eps_mode={spec.eps_mode!r} divides by the slice size, which must be static: "
            f"the normalized axes {axes.norm} of an input of shape {x.shape} are not all known"
        )
    ladder = _ladder.make_ladder(x.dtype.name, acc.name, size, spec.eps_mode, spec.eps)
    plan = sum_plan(x.shape, axes)
    if scale is None:
        forward, backward = _programs(ladder, plan, None)

        @tf.custom_gradient
        def unscaled(xv: tf.Tensor) -> Any:
            # stop_gradient: nothing inside is recorded on an active tape (the programs
            # hold XLA operations that have no gradient; this is the gradient).
            xc = tf.stop_gradient(xv)
            y, f = forward(xc, None)

            def grad(g: tf.Tensor) -> tf.Tensor:
                return backward(xc, None, tf.stop_gradient(g), f)[0]

            return y, grad

        return unscaled(x)

    shared = tuple(scale.shape) in ((), (1,))
    shape = [1] * axes.ndim
    if not shared:
        shape[axes.channel] = int(scale.shape[0])
    forward, backward = _programs(ladder, plan, tuple(range(axes.ndim)) if shared else axes.reduced)

    @tf.custom_gradient
    def scaled(xv: tf.Tensor, sv: tf.Tensor) -> Any:
        xc, s = tf.stop_gradient(xv), tf.stop_gradient(tf.reshape(tf.cast(sv, acc), shape))
        y, f = forward(xc, s)

        def grad(g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            dx, dscale = backward(xc, s, tf.stop_gradient(g), f)
            return dx, tf.reshape(tf.cast(dscale, sv.dtype), tf.shape(sv))

        return y, grad

    return scaled(x, scale)
