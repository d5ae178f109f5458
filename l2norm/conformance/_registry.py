"""The backend registry: every backend known by name, built the first time it is asked for.

A backend of a framework is a :class:`LazyBackend` entry: the framework modules it needs,
the extra that installs them and a factory (``"module:function"``) that imports the
framework and builds the :class:`Backend`. The backends that check a lowering are
generated from the table of :mod:`l2norm.core.lowering` (each lowering's
:attr:`~l2norm.core.lowering.Lowering.row`); the few adapter rows that are not lowerings
(``torch-cuda``, ``nnx``, ``linen``, ``keras-*``) are declared here. Nothing here imports
a framework: listing the backends, or asking whether one is installed, only looks the
modules up (:func:`importlib.util.find_spec`); :func:`get_backend` builds one on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from l2norm import reference
from l2norm.core import lowering as _lowering
from l2norm.core.spec import FLOAT_DTYPES, Spec

Forward = Callable[[np.ndarray, "np.ndarray | None", dict], np.ndarray]
Vjp = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, dict], tuple]

#: Default bounds an adapter is held to: forward in ULPs of the output dtype (faithful
#: rounding: within 1 ULP of the reference), gradients in machine epsilons relative to
#: the slice (see the package docstring).
DEFAULT_FORWARD_ULPS = {"float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": 1.0}
DEFAULT_GRAD_EPS = {"float16": 2.0, "bfloat16": 2.0, "float32": 2.0, "float64": 2.0}


@dataclass(frozen=True)
class Backend:
    """A way to compute l2norm, checked against the reference.

    Attributes:
        name: the row label in ``l2norm check`` (``"torch"``, ``"keras-jax"``, ...).
        forward: ``forward(x, scale, options) -> y``; NumPy in, NumPy out; ``options``
            holds the keyword arguments of :func:`l2norm.l2_normalize`.
        vjp: ``vjp(x, scale, cotangent, options) -> (dx, dscale)``, NumPy in and out.
        forward_ulps: the forward bound per dtype, in ULPs of the dtype.
        grad_eps: the gradient bound per dtype, in machine epsilons (see the module).
        flushes_subnormals: measure forward errors with the smallest normal as floor.
        dtypes: the dtypes this backend supports.
        compare_to_oracle: compare with the exact decimal oracle instead of the reference
            (used by the reference itself).
        batch_invariance_ulps: how far (float32 ULPs) a sample's output and input
            gradient may move when only the batch size changes. 0, the default, asks for
            bitwise identity; a backend may declare more only for its framework's own
            reduction order and must say why in ``batch_invariance_note``. Changing the
            neighbours at the same batch size must stay bitwise whatever this says.
        batch_invariance_note: why ``batch_invariance_ulps`` is not 0.
        notes: remarks ``l2norm check`` prints under its table (e.g. a kernel that could
            not be built, so the row ran another lowering).
    """

    name: str
    forward: Forward
    vjp: Vjp
    forward_ulps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FORWARD_ULPS))
    grad_eps: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GRAD_EPS))
    flushes_subnormals: bool = False
    dtypes: tuple[str, ...] = FLOAT_DTYPES
    compare_to_oracle: bool = False
    batch_invariance_ulps: float = 0.0
    batch_invariance_note: str = ""
    notes: tuple[str, ...] = ()


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run here: its framework is not installed, it needs a
    device this machine lacks, or (Keras) this process already runs another backend.

    Attributes:
        backend: the backend's name.
        reason: why, in a few words (``"jax, flax are not installed"``).
        install: the command that installs what is missing, or None.
    """

    def __init__(self, backend: str, reason: str, install: str | None = None) -> None:
        self.backend, self.reason, self.install = backend, reason, install
        super().__init__(f"backend {backend!r}: {reason}" + (f" ({install})" if install else ""))


@dataclass(frozen=True)
class LazyBackend:
    """A backend known by name and built on first use.

    Attributes:
        name: the backend's name.
        modules: the top-level modules it needs (looked up, not imported, to list it).
        extra: the extras of the ``l2norm`` distribution that install them (``"jax"``,
            ``"tensorflow,jax"``).
        factory: ``"package.module:function"``, called with the backend's name (and
            ``lowering`` when set); returns the :class:`Backend` or raises
            :class:`BackendUnavailable`.
        env: environment variables the backend needs set before its framework is
            imported (``KERAS_BACKEND``). ``l2norm check`` runs such a backend in a child
            process with them set; in this process its factory sets them when the
            framework is not imported yet (see ``_keras``).
        probe: ``"package.module:function"`` (called with the name, returns a reason or
            None) for a condition beyond the modules, e.g. a CUDA device. It may import
            the framework.
        lowering: the lowering of the framework the backend forces (``use_lowering``),
            or None for the framework's default choice.
    """

    name: str
    modules: tuple[str, ...]
    extra: str
    factory: str
    env: tuple[tuple[str, str], ...] = ()
    probe: str | None = None
    lowering: str | None = None

    @property
    def install(self) -> str:
        """The command that installs this backend's frameworks."""
        return f'pip install "l2norm[{self.extra}]"'


def _call(target: str, *args: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(*args)


def _numpy_backend(name: str) -> Backend:
    def forward(x, scale, options):
        return reference.forward(x, scale, Spec.create(**options))

    def vjp(x, scale, g, options):
        return reference.vjp(x, scale, g, Spec.create(**options))

    # The reference is measured against the decimal oracle: within 1 ULP (it rounds once
    # from a wider working precision), 4 for float64 where long double is no wider.
    float64_ulps = 1.0 if reference._LONGDOUBLE_IS_WIDER else 4.0
    return Backend(
        name=name,
        forward=forward,
        vjp=vjp,
        forward_ulps={"float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": float64_ulps},
        grad_eps={"float16": 1.0, "bfloat16": 1.0, "float32": 1.0, "float64": 2.0},
        compare_to_oracle=True,
    )


_PKG = "l2norm.conformance"
#: Each framework's builder (called with a row's name and the lowering it forces, see
#: :class:`LazyBackend`) and the probe of its rows.
_BUILDERS = {
    "numpy": (f"{_PKG}._registry:_numpy_backend", None),
    "torch": (f"{_PKG}._torch:build", f"{_PKG}._torch:probe"),
    "jax": (f"{_PKG}._jax:build", None),
}


def _rows(framework: str, *adapters: str, needs: tuple[str, ...] = ()) -> list[LazyBackend]:
    """``framework``'s backends: one per lowering the table checks (the default choice,
    then each forced lowering by name), then ``adapters``, rows of the default choice that
    are no lowering (a device, the layers), which need the modules ``needs`` too."""
    factory, probe = _BUILDERS[framework]
    checked = [lw for lw in _lowering.lowerings(framework) if lw.backend]
    checked.sort(key=lambda lw: (lw.row != "default", lw.name))
    default = checked[0]
    rows = [
        (lw.backend, lw.modules, lw.extra, lw.name if lw.row == "forced" else None)
        for lw in checked
    ]
    rows += [(name, (*default.modules, *needs), default.extra, None) for name in adapters]
    return [
        LazyBackend(name, modules, extra, factory, probe=probe, lowering=lowering)
        for name, modules, extra, lowering in rows
    ]


#: Every backend ``l2norm check`` knows, in the order it checks them.
_TABLE: dict[str, LazyBackend] = {
    entry.name: entry
    for entry in (
        *_rows("numpy"),
        *_rows("torch", "torch-cuda"),
        *_rows("jax", "nnx", "linen", needs=("flax",)),
        # Keras comes with the tensorflow extra; its other backends need their framework too.
        *(
            LazyBackend(
                f"keras-{kb}",
                ("keras", module),
                "tensorflow" if kb == "tensorflow" else f"tensorflow,{extra}",
                f"{_PKG}._keras:build",
                env=(("KERAS_BACKEND", kb),),
            )
            for kb, module, extra in (
                ("tensorflow", "tensorflow", "tensorflow"),
                ("jax", "jax", "jax"),
                ("torch", "torch", "torch"),
            )
        ),
    )
}
_BUILT: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a built backend under its name and return it.

    For backends outside this package (and fakes in tests); a registered backend takes
    the place of a lazy entry of the same name.
    """
    _BUILT[backend.name] = backend
    return backend


def register_lazy(entry: LazyBackend) -> LazyBackend:
    """Add (or replace) a lazily built backend; it is built by :func:`get_backend`."""
    _TABLE[entry.name] = entry
    _BUILT.pop(entry.name, None)
    return entry


def unregister(name: str) -> None:
    """Forget a backend (registered or lazy); unknown names are ignored."""
    _TABLE.pop(name, None)
    _BUILT.pop(name, None)


def known_backends() -> dict[str, LazyBackend | None]:
    """Every backend name, in check order: its lazy entry, or None for one registered
    directly with :func:`register`. Imports no framework."""
    names = {name: entry for name, entry in _TABLE.items()}
    names.update({name: None for name in _BUILT if name not in names})
    return names


def lazy_entry(name: str) -> LazyBackend | None:
    """The lazy entry of ``name`` (None for a directly registered backend).

    Raises:
        KeyError: no backend has that name; the message lists the known ones.
    """
    known = known_backends()
    if name not in known:
        raise KeyError(f"no backend named {name!r}; known backends: {', '.join(known)}")
    return known[name]


def unavailable(name: str) -> BackendUnavailable | None:
    """Why ``name`` cannot be built here (a missing framework names its extra), or None.

    Looks the modules up without importing them; an entry's probe (the CUDA device) may
    import its framework. :class:`KeyError` for an unknown name.
    """
    entry = lazy_entry(name)
    if entry is None:
        return None
    missing = [m for m in entry.modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return BackendUnavailable(name, f"{', '.join(missing)} {verb} not installed", entry.install)
    reason = _call(entry.probe, name) if entry.probe else None
    return None if reason is None else BackendUnavailable(name, reason)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, built (and its framework imported) on first use.

    Raises:
        KeyError: no backend has that name.
        BackendUnavailable: its framework is not installed (the message names the extra
            that installs it), or it cannot run here (no CUDA device; Keras already on
            another backend in this process).
    """
    if name in _BUILT:
        return _BUILT[name]
    entry = lazy_entry(name)
    assert entry is not None  # directly registered backends are in _BUILT
    problem = unavailable(name)
    if problem is not None:
        raise problem
    backend = _call(entry.factory, name, *([entry.lowering] if entry.lowering else []))
    _BUILT[name] = backend
    return backend
