"""The conformance suite: one case list, one set of measures, one backend registry.

``l2norm check`` and the test suite both run :func:`run_case` over :func:`cases`, so the
CLI and the tests can never disagree. Importing this package imports no framework.

Backends are known by name (:func:`known_backends`) and built on first use by
:func:`get_backend`, which imports their framework then; a backend whose framework is
not installed raises :class:`BackendUnavailable` naming the extra that installs it.
The adapters know nothing of this package: each backend here drives an adapter through
its public API only. A framework's default lowering and each other lowering it can force
have a backend each, generated from the table of :mod:`l2norm.core.lowering`.

=================  ===========================================================  ==========
name               what it runs                                                 extra
=================  ===========================================================  ==========
numpy              :mod:`l2norm.reference`, against the exact decimal oracle
torch              :func:`l2norm.torch.l2_normalize`, default dispatch (the     torch
                   native CPU kernel wherever it applies)
torch-ops          the same, pure-torch lowering forced                         torch
torch-triton       the Triton lowering forced: on CUDA where there is a GPU,    torch
                   else on CPU tensors in Triton's interpreter (slow)
torch-cuda         the default dispatch on CUDA (only with a CUDA device)       torch
jax                :func:`l2norm.jax.l2_normalize`, jitted                      jax
jax-ops            the same, the ``jax.numpy`` ladder forced                    jax
jax-pallas         the same, the Pallas kernels (GPUs, TPUs) forced:            jax
                   interpreted on the CPU
nnx, linen         the Flax layers, jitted                                      jax
keras-tensorflow   :func:`l2norm.keras.l2_normalize` on each Keras backend;     tensorflow
keras-jax          Keras picks its backend once per process, so ``l2norm        (+ jax,
keras-torch        check`` runs each in a child process                         torch)
=================  ===========================================================  ==========

Error measures (the tolerances are per backend and per dtype):

* forward: ``|y - y_ref| / ulp(y_ref)`` in the output dtype, maximised over the
  elements whose reference is finite. The ULP of the smallest subnormal floors the
  measure; a backend that flushes subnormals to zero (``flushes_subnormals``) is
  measured with the smallest normal number as the floor instead.
* gradients: ``|dx - dx_ref|`` divided by ``max |scale * g| / d(n)`` over the same
  slice, and ``|dscale - dscale_ref|`` divided by ``sum |g * x / d(n)|`` over the same
  channel, both in units of the dtype's machine epsilon: the backward adds terms of
  those sizes and may cancel them, so an elementwise ULP bound would measure the
  problem's conditioning, not the backend.
* non-finite mismatches: an element where the backend is NaN/Inf and the reference is
  not, or the other way round (NaN where the reference is NaN passes).

RMSNorm is the L2 op with the mean placement (``eps_mode="add_meansq"``): its cases are
those of that option set (:attr:`Case.op`), measured the same way and reported on rows of
their own.

Besides the cases: :func:`check_batch_invariance` (a sample's result must not depend on
its batch) and :func:`cross_compare` (the backends against each other on one input, for
the L2 op and for RMSNorm).

Examples:
    >>> from l2norm import conformance
    >>> backend = conformance.get_backend("numpy")
    >>> case = conformance.Case.from_id("1:mode=add_norm:per_channel:float16:hostile")
    >>> conformance.run_case(backend, case).passed
    True
    >>> conformance.check_batch_invariance(backend).bitwise
    True
"""

from l2norm.conformance._cases import (
    DEFAULT_CASE_IDS,
    FULL_LAYOUTS,
    HOSTILE,
    LAYOUTS,
    OPTION_SETS,
    SCALES,
    WIDE_OPTION_SETS,
    Case,
    cases,
    default_cases,
    numpy_dtype,
    scale_values,
)
from l2norm.conformance._cross import (
    CROSS_OPTIONS,
    CROSS_SHAPE,
    RMS_CROSS_OPTIONS,
    Cross,
    cross_compare,
    cross_inputs,
    cross_outputs,
)
from l2norm.conformance._invariance import (
    BATCH_SIZES,
    INVARIANCE_LAYOUTS,
    InvarianceResult,
    batch_inputs,
    check_batch_invariance,
    ulp_distance,
)
from l2norm.conformance._measures import (
    CaseResult,
    forward_error,
    gradient_error,
    gradient_magnitudes,
    nonfinite_mismatches,
    round_to,
    run_case,
    ulp,
)
from l2norm.conformance._registry import (
    DEFAULT_FORWARD_ULPS,
    DEFAULT_GRAD_EPS,
    Backend,
    BackendUnavailable,
    LazyBackend,
    get_backend,
    known_backends,
    lazy_entry,
    register,
    register_lazy,
    unavailable,
    unregister,
)
from l2norm.conformance._runner import use_jax_compilation_cache
from l2norm.core.spec import EPS_MODES, FLOAT_DTYPES, PRESETS

__all__ = [
    "BATCH_SIZES",
    "CROSS_OPTIONS",
    "CROSS_SHAPE",
    "DEFAULT_CASE_IDS",
    "DEFAULT_FORWARD_ULPS",
    "DEFAULT_GRAD_EPS",
    "EPS_MODES",
    "FLOAT_DTYPES",
    "FULL_LAYOUTS",
    "HOSTILE",
    "INVARIANCE_LAYOUTS",
    "LAYOUTS",
    "OPTION_SETS",
    "PRESETS",
    "RMS_CROSS_OPTIONS",
    "SCALES",
    "WIDE_OPTION_SETS",
    "Backend",
    "BackendUnavailable",
    "Case",
    "CaseResult",
    "Cross",
    "InvarianceResult",
    "LazyBackend",
    "batch_inputs",
    "cases",
    "check_batch_invariance",
    "cross_compare",
    "cross_inputs",
    "cross_outputs",
    "default_cases",
    "forward_error",
    "get_backend",
    "gradient_error",
    "gradient_magnitudes",
    "known_backends",
    "lazy_entry",
    "nonfinite_mismatches",
    "numpy_dtype",
    "register",
    "register_lazy",
    "round_to",
    "run_case",
    "scale_values",
    "ulp",
    "ulp_distance",
    "unavailable",
    "unregister",
    "use_jax_compilation_cache",
]
