"""l2norm.conformance itself: the registry, the default subset, the batch-invariance check,
the report plumbing of ``l2norm check``. Fake backends only: no framework is needed."""

from __future__ import annotations

import importlib.util
import io
import sys

import numpy as np
import pytest

from l2norm import conformance
from l2norm.conformance._report import BackendReport, run_backend
from l2norm.conformance._runner import Progress, _parse_child
from l2norm.core.spec import EPS_MODES, FLOAT_DTYPES, Spec

NUMPY = conformance.get_backend("numpy")
NAMES = (
    "numpy",
    "torch",
    "torch-ops",
    "torch-triton",
    "torch-cuda",
    "jax",
    "jax-ops",
    "jax-pallas",
    "nnx",
    "linen",
    "keras-tensorflow",
    "keras-jax",
    "keras-torch",
)


@pytest.fixture
def registry():
    """Register fakes through this and they are gone after the test."""
    added: list[str] = []

    def add(backend_or_entry):
        if isinstance(backend_or_entry, conformance.LazyBackend):
            conformance.register_lazy(backend_or_entry)
        else:
            conformance.register(backend_or_entry)
        added.append(backend_or_entry.name)
        return backend_or_entry

    yield add
    for name in added:
        conformance.unregister(name)


# --------------------------------------------------------------------------- the registry


def test_every_backend_is_known_without_importing_a_framework():
    assert tuple(conformance.known_backends())[: len(NAMES)] == NAMES
    for name, entry in conformance.known_backends().items():
        if entry is None:
            continue
        module, _, function = entry.factory.partition(":")
        assert importlib.util.find_spec(module) is not None, entry.factory
        frameworks_here = all(importlib.util.find_spec(m) for m in entry.modules)
        if frameworks_here and not entry.env:
            assert callable(getattr(importlib.import_module(module), function)), name


def test_a_missing_framework_names_the_extra_that_installs_it(registry):
    registry(
        conformance.LazyBackend(
            "fake", ("l2norm_no_such_framework",), "fake", "l2norm_no_such_module:build"
        )
    )
    problem = conformance.unavailable("fake")
    assert problem is not None and problem.install == 'pip install "l2norm[fake]"'
    with pytest.raises(conformance.BackendUnavailable, match=r'pip install "l2norm\[fake\]"'):
        conformance.get_backend("fake")


def test_a_hidden_real_framework_is_reported_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)  # as if not installed
    problem = conformance.unavailable("nnx")
    assert problem is not None
    assert "jax" in problem.reason and problem.install == 'pip install "l2norm[jax]"'
    assert conformance.unavailable("keras-jax").install == 'pip install "l2norm[tensorflow,jax]"'


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(KeyError, match="known backends: numpy, torch"):
        conformance.get_backend("nonesuch")
    with pytest.raises(KeyError):
        conformance.unavailable("nonesuch")


def test_lazy_backends_are_built_once_on_first_use(registry):
    built = []

    def factory_module_function(name):  # reached through the "module:function" string
        built.append(name)
        return conformance.Backend(name, NUMPY.forward, NUMPY.vjp)

    module = type(sys)("l2norm_test_fake_factory")
    module.build = factory_module_function
    sys.modules[module.__name__] = module
    try:
        registry(conformance.LazyBackend("lazy", (), "", "l2norm_test_fake_factory:build"))
        assert built == []
        first = conformance.get_backend("lazy")
        assert conformance.get_backend("lazy") is first and built == ["lazy"]
    finally:
        del sys.modules[module.__name__]


# --------------------------------------------------------------------------- cases, measures


def test_the_default_subset_covers_every_dimension_of_the_matrix():
    chosen = conformance.default_cases()
    assert set(chosen) <= set(conformance.cases())
    for dtype in FLOAT_DTYPES:
        assert {c.data for c in chosen if c.dtype == dtype} == {"random", "hostile"}
    for data in ("random", "hostile"):
        modes = {Spec.create(**c.options).eps_mode for c in chosen if c.data == data}
        assert modes == set(EPS_MODES), data
    assert {c.layout for c in chosen} == set(range(len(conformance.LAYOUTS)))
    assert {c.scale_kind for c in chosen} == set(conformance.SCALES)


def test_public_measures():
    a = np.array([1.0, np.nan, np.inf], np.float32)
    assert conformance.nonfinite_mismatches(a, a) == 0
    assert conformance.nonfinite_mismatches(a, np.array([1.0, 2.0, -np.inf])) == 2
    one = np.float32(1.0)
    assert conformance.ulp_distance(np.nextafter(one, np.float32(2)), one) == 1
    assert conformance.ulp_distance(np.float32(-0.0), np.float32(0.0)) == 0
    assert conformance.ulp_distance(np.nextafter(np.float32(0), np.float32(-1)), one) > 2**29
    assert conformance.ulp(np.array([1.0]), np.dtype(np.float32))[0] == 2.0**-23
    assert conformance.round_to(np.array([1 + 2**-30]), np.dtype(np.float32))[0] == 1.0


# --------------------------------------------------------------------------- batch invariance


def _perturbed(y: np.ndarray, where: np.ndarray | bool) -> np.ndarray:
    return np.where(where, np.nextafter(y, np.float32(np.inf)), y).astype(y.dtype)


def _batch_size_dependent() -> conformance.Backend:
    """One ULP up from batch 8 on, as a kernel that tiles large batches differently."""

    def forward(x, scale, options):
        y = NUMPY.forward(x, scale, options)
        return _perturbed(y, x.shape[0] >= 8) if y.dtype == np.float32 else y

    return conformance.Backend("batchy", forward, NUMPY.vjp)


def _neighbour_dependent(tolerance: float) -> conformance.Backend:
    """Takes another path for the whole batch when any sample is huge (as a ``lax.cond``
    on "any slice overflows" would)."""

    def forward(x, scale, options):
        y = NUMPY.forward(x, scale, options)
        return _perturbed(y, bool((np.abs(x) > 1e20).any()))

    return conformance.Backend(
        "nosy", forward, NUMPY.vjp, batch_invariance_ulps=tolerance, batch_invariance_note="test"
    )


def test_the_reference_is_bitwise_batch_invariant():
    result = conformance.check_batch_invariance(NUMPY)
    assert result.passed and result.bitwise and result.forward_ulps == result.grad_eps == 0


def test_a_batch_dependent_backend_fails_and_a_declared_tolerance_covers_it():
    result = conformance.check_batch_invariance(_batch_size_dependent())
    assert not result.passed and not result.bitwise and result.forward_ulps == 1
    assert any("batch 8" in f and "1 ULP" in f for f in result.failures)
    assert not any("batch 3" in f for f in result.failures)
    tolerant = conformance.Backend(
        "batchy", _batch_size_dependent().forward, NUMPY.vjp, batch_invariance_ulps=1
    )
    result = conformance.check_batch_invariance(tolerant)
    assert result.passed and not result.bitwise


def test_neighbours_must_never_matter_whatever_the_tolerance():
    result = conformance.check_batch_invariance(_neighbour_dependent(tolerance=4))
    assert not result.passed
    assert any("hostile neighbours changed sample 0" in f for f in result.failures)


def test_a_gradient_that_depends_on_the_batch_fails():
    def vjp(x, scale, g, options):
        dx, ds = NUMPY.vjp(x, scale, g, options)
        return (dx * np.float32(1 + 2**-10)).astype(dx.dtype) if x.shape[0] == 16 else dx, ds

    result = conformance.check_batch_invariance(conformance.Backend("g", NUMPY.forward, vjp))
    assert not result.passed and result.forward_ulps == 0 and result.grad_eps > 1


def test_a_crash_is_a_failure_with_its_message():
    def boom(x, scale, options):
        raise RuntimeError("boom")

    result = conformance.check_batch_invariance(conformance.Backend("boom", boom, NUMPY.vjp))
    assert not result.passed and "boom" in result.error


def test_batch_inputs_share_sample_zero_and_plant_the_hostile_pixels():
    for layout in range(len(conformance.INVARIANCE_LAYOUTS)):
        x1, s1, g1, axis = conformance.batch_inputs(layout, 1, False)
        xr, _, gr, _ = conformance.batch_inputs(layout, 8, False)
        xh, sh, gh, _ = conformance.batch_inputs(layout, 8, True)
        assert x1.dtype == np.float32 and np.array_equal(s1, sh)
        assert np.array_equal(xh[:1], x1) and np.array_equal(gh, gr)
        rows = np.moveaxis(xh[1:], axis, -1)
        assert (rows == 0).all(axis=-1).any()
        assert (np.abs(rows) > 1e20).all(axis=-1).any()
        assert ((np.abs(rows) < 1e-20) & (rows != 0)).all(axis=-1).any()
        assert np.array_equal(xr[:1], x1) and xr.shape == xh.shape


# --------------------------------------------------------------------------- report plumbing


def test_a_backend_report_survives_json():
    report = run_backend("numpy", conformance.default_cases()[:2])
    back = BackendReport.from_json(report.to_json())
    assert back.passed and back.rows == report.rows and back.invariance == report.invariance
    assert all(np.array_equal(a, b) for a, b in zip(back.cross, report.cross, strict=True))
    assert back.bounds == report.bounds


def test_a_broken_backend_is_a_fatal_problem(registry):
    registry(conformance.LazyBackend("broken", (), "", "l2norm_no_such_module:build"))
    report = run_backend("broken", conformance.default_cases())
    assert not report.passed and "ModuleNotFoundError" in report.problems[0][0]


def test_a_child_that_prints_no_json_is_a_failure():
    report = _parse_child("keras-jax", 1, "garbage", "Traceback\nImportError: no keras")
    assert not report.passed and "ImportError: no keras" in report.problems[0][0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream_type", [io.StringIO, _Terminal])
def test_progress_lines(stream_type):
    stream = stream_type()
    progress = Progress(2, stream=stream)
    progress.start("numpy", 8)
    progress.step("numpy", 8, 8)
    progress.finish(run_backend("numpy", conformance.default_cases()[:1]))
    text = stream.getvalue()
    assert "[1/2] numpy: 1 cases, batch invariance, cross-framework ... PASS, " in text
    assert ("[####" in text) == (stream_type is _Terminal)  # the bar only on a terminal
