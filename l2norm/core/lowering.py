"""The one registry of lowerings: which ways each framework can compute the op.

A *lowering* is one way a framework computes the op (the native CPU kernel, Triton or
Pallas kernels, the ladder in the framework's own ops, the portable formula for export).
:data:`TABLE` lists every framework's lowerings, in order of preference, as plain data:
listing them imports no framework. A framework's ``choose`` function picks the first
that applies to a call from the call's static properties only (device, dtype, axes,
layout, trace state), and :func:`use_lowering` forces one for tests, benchmarks and
comparisons. So there is one place that says which lowerings exist, one ``use_lowering``
and one ``forced`` state, and the conformance backends of :mod:`l2norm.conformance` are
generated from the same table (:attr:`Lowering.backend`).

Example:
    >>> from l2norm.core import lowering as _lowering
    >>> [lw.name for lw in _lowering.lowerings("numpy")]
    ['reference']
    >>> [lw.backend for lw in _lowering.lowerings("jax")]
    ['jax', 'jax-pallas', 'jax-ops']
    >>> with _lowering.use_lowering("numpy", "reference"):
    ...     _lowering.forced("numpy")
    'reference'
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["TABLE", "Lowering", "forced", "lowerings", "names", "use_lowering"]


@dataclass(frozen=True)
class Lowering:
    """One way a framework computes the op.

    Attributes:
        framework: ``"numpy"``, ``"torch"``, ``"jax"`` or ``"tensorflow"``.
        name: what :func:`use_lowering` and ``lowering_for`` call it (``"cpu-kernel"``,
            ``"triton"``, ``"pallas"``, ``"ops"``, ...).
        summary: one line: what computes, and where it is the default.
        forceable: whether :func:`use_lowering` may force it (the trace-only routes are
            chosen by the trace state, never by hand).
        modules: the top-level modules it needs, looked up (never imported) to say
            whether its conformance backend can run.
        extra: the extra of the ``l2norm`` distribution that installs them.
        row: its conformance backend: ``"default"`` (the framework's default choice,
            named after the framework), ``"forced"`` (this lowering forced by
            :func:`use_lowering`, named ``"{framework}-{name}"``) or None (no row of its
            own: another row or test covers it).

    Example:
        >>> Lowering("torch", "ops", "the ladder in torch ops").backend
        'torch-ops'
    """

    framework: str
    name: str
    summary: str
    forceable: bool = True
    modules: tuple[str, ...] = ()
    extra: str = ""
    row: Literal["default", "forced"] | None = "forced"

    @property
    def backend(self) -> str | None:
        """The name of its conformance backend (``l2norm check --backends``), or None."""
        if self.row is None:
            return None
        return self.framework if self.row == "default" else f"{self.framework}-{self.name}"


_torch = functools.partial(Lowering, "torch", modules=("torch",), extra="torch")
_jax = functools.partial(Lowering, "jax", modules=("jax",), extra="jax")
#: Every lowering, each framework's in order of preference.
TABLE: tuple[Lowering, ...] = (
    Lowering("numpy", "reference", "NumPy in float64 / long double: the reference", row="default"),
    _torch("cpu-kernel", "the native CPU kernel: CPU tensors, the default", row="default"),
    _torch("triton", "Triton kernels: CUDA tensors, the default", modules=("torch", "triton")),
    _torch("ops", "the ladder in torch ops: any device, dtype and layout"),
    _torch("traced", "the portable formula: jit.trace, export, ONNX", forceable=False, row=None),
    _jax("cpu-kernel", "the native CPU kernel as XLA custom calls: the CPU", row="default"),
    _jax("pallas", "the Pallas kernels: CUDA GPUs (TPUs and ROCm opt in)"),
    _jax("ops", "the ladder in jax.numpy: any backend, dtype and axes"),
    # TensorFlow's lowerings run under Keras: the keras-tensorflow backend checks them.
    Lowering("tensorflow", "ops", "the ladder in TensorFlow ops, XLA-compiled", row=None),
    Lowering("tensorflow", "traced", "the portable formula: Keras export, TFLite", False, row=None),
)
# (framework, name) pairs: immutable, so a context's value is never changed in place.
_FORCED: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "l2norm_forced_lowerings", default=()
)


def lowerings(framework: str) -> tuple[Lowering, ...]:
    """The lowerings of ``framework``, in order of preference."""
    return tuple(lw for lw in TABLE if lw.framework == framework)


def names(framework: str) -> tuple[str, ...]:
    """The names :func:`use_lowering` accepts for ``framework``."""
    return tuple(lw.name for lw in lowerings(framework) if lw.forceable)


def forced(framework: str) -> str | None:
    """The lowering forced for ``framework`` in the current context, or None."""
    return dict(_FORCED.get()).get(framework)


@contextlib.contextmanager
def use_lowering(framework: str, name: str | None) -> Iterator[None]:
    """Force ``framework``'s lowering ``name`` inside the block (None: its default).

    Raises:
        ValueError: ``name`` is not one of ``framework``'s forceable lowerings.
    """
    accepted = names(framework)
    if name is not None and name not in accepted:
        raise ValueError(
            f"unknown lowering {name!r} for {framework}; expected one of {list(accepted)} or None"
        )
    others = tuple(pair for pair in _FORCED.get() if pair[0] != framework)
    token = _FORCED.set(others if name is None else (*others, (framework, name)))
    try:
        yield
    finally:
        _FORCED.reset(token)
