"""The one registry of lowerings: which ways each framework can compute the op.

A *lowering* is one way a framework computes the op (the native CPU kernel, Triton or
Pallas kernels, the ladder in the framework's own ops, the portable formula for export).
Every framework registers its lowerings here, in order of preference, once at import of
its plug-in; its ``choose`` function then picks the first that applies to a call from the
call's static properties only (device, dtype, axes, layout, trace state), and
:func:`use_lowering` forces one for tests, benchmarks and comparisons. So there is one
place that says which lowerings exist, one ``use_lowering`` and one ``forced`` state, and
the conformance backends are generated from the same table.

Example:
    >>> from l2norm.core import lowering as _lowering
    >>> [lw.name for lw in _lowering.lowerings("numpy")]
    ['reference']
    >>> with _lowering.use_lowering("numpy", "reference"):
    ...     _lowering.forced("numpy")
    'reference'
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Lowering", "forced", "lowerings", "names", "register", "use_lowering"]


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
    """

    framework: str
    name: str
    summary: str
    forceable: bool = True


_TABLE: dict[str, tuple[Lowering, ...]] = {}
# (framework, name) pairs: immutable, so a context's value is never changed in place.
_FORCED: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "l2norm_forced_lowerings", default=()
)


def register(*entries: Lowering) -> None:
    """Add a framework's lowerings, in order of preference (idempotent per name)."""
    for entry in entries:
        current = [lw for lw in _TABLE.get(entry.framework, ()) if lw.name != entry.name]
        _TABLE[entry.framework] = (*current, entry)


def lowerings(framework: str) -> tuple[Lowering, ...]:
    """The registered lowerings of ``framework``, in order of preference."""
    return _TABLE.get(framework, ())


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


register(Lowering("numpy", "reference", "NumPy in float64 / long double: the reference"))
