"""The Pallas kernels (:mod:`l2norm.jax._pallas`) without an accelerator: both kernels (the
GPU's Triton form and the TPU's Mosaic form) in Pallas' interpret mode on conformance
cases against the reference, bitwise batch invariance, the exported lowerings for
``cuda`` and ``tpu``, and the errors.

Every conformance case runs in ``l2norm check --backends jax-pallas --full`` (the TPU
kernel through :mod:`l2norm.jax`, where it applies: one normalized axis); here, on the
kernels directly (any axes), the few cases that together meet every layout, eps
placement, scale kind, dtype on random and hostile data and the extreme eps values, since
each case compiles a program of its own (about 2 s).
"""

from __future__ import annotations

import doctest
import re
from dataclasses import dataclass

import _pallas_backend as pallas_backend  # tests/_pallas_backend.py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _conformance_rows import greedy_cover  # tests/_conformance_rows.py

from l2norm import conformance
from l2norm.core.spec import Spec
from l2norm.jax import _pallas

TRITON_CALL = "__gpu$xla.gpu.triton"


def _features(case: conformance.Case) -> set[tuple]:
    """What a case exercises: its layout, eps placement, scale kind, dtype with its data,
    and the option sets that put eps at an extreme."""
    mode = Spec.create(**case.options).eps_mode
    found = {("layout", case.layout), ("mode", mode), ("scale", case.scale_kind)}
    found.add(("data", case.dtype, case.data))
    if case.option_set in ("tiny-eps", "large-eps"):
        found.add(("options", case.option_set))
    return found


def _covering_subset() -> list[conformance.Case]:
    """A few cases that together exercise every layout, eps placement, scale kind, dtype
    on random and hostile data, and the extreme eps: greedily, the case that adds most
    (the first in :func:`l2norm.conformance.cases` order among equals)."""
    return greedy_cover([c for c in conformance.cases() if c.dtype in _pallas.DTYPES], _features)


def _backend(platform: str) -> conformance.Backend:
    return pallas_backend.build(f"jax-pallas-{platform}", platform)


#: The covering cases and the default ones of ``l2norm check``.
SUBSET = _covering_subset() + [c for c in conformance.default_cases() if c.dtype in _pallas.DTYPES]
#: The two kernels share the arithmetic and differ in their loads and stores: the cases
#: alternate between them.
CASES = {"tpu": SUBSET[::2], "cuda": SUBSET[1::2]}


@pytest.mark.parametrize(
    ("platform", "case"),
    [(p, c) for p, cases in CASES.items() for c in cases],
    ids=lambda v: v if isinstance(v, str) else v.id,
)
def test_conformance_case_in_interpret_mode(platform, case):
    result = conformance.run_case(_backend(platform), case)
    assert result.passed, result


def test_the_subset_meets_every_layout_mode_scale_and_dtype():
    covered = set().union(*map(_features, SUBSET))
    assert {f[1] for f in covered if f[0] == "layout"} == set(range(len(conformance.LAYOUTS)))
    assert {f[1] for f in covered if f[0] == "mode"} == set(conformance.EPS_MODES)
    assert {f[1] for f in covered if f[0] == "scale"} == set(conformance.SCALES)
    data = {f[1:] for f in covered if f[0] == "data"}
    assert data == {(d, k) for d in _pallas.DTYPES for k in ("random", "hostile")}


@dataclass(frozen=True)
class _MeanCase:
    """Rows from subnormal to near float32's largest, one with ``k = 3`` infinities (its
    limit ``+-s sqrt(N / k)``), for the mean placement (:func:`conformance.run_case`
    takes any object with ``inputs()``, ``options`` and ``dtype``)."""

    eps: float
    dtype: str = "float32"

    @property
    def options(self) -> dict:
        return {"axis": -1, "eps_mode": "add_meansq", "eps": self.eps}

    def inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(11)
        magnitudes = [1.0, 1e-40, 1e-25, 1e-6, 1.0, 1e19, 1e37, 0.0]
        x = rng.standard_normal((len(magnitudes), 24)) * np.array(magnitudes)[:, None]
        x[0, :3] = [np.inf, -np.inf, np.inf]
        scale, g = rng.uniform(0.5, 20, 24), rng.standard_normal(x.shape)
        return x.astype(self.dtype), scale.astype(self.dtype), g.astype(self.dtype)


@pytest.mark.parametrize(("platform", "eps"), [("tpu", 1e-44), ("cuda", 3e38)])
def test_mean_placement_where_eps_is_extreme(platform, eps):
    """The mean of the squares against the reference where the kernel's bookkeeping of
    eps bites (the conformance cases take the default eps): eps capped at the shift of
    the subnormal row (1e-44), or at a shift below every row's but the largest two, one
    of whose mean square meets eps (3e38 at 1e19); the Inf row at ``+-s sqrt(N / k)``."""
    result = conformance.run_case(_backend(platform), _MeanCase(eps))
    assert result.passed, result


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_batch_invariance_bitwise(platform):
    """A row's output and input gradient are the same bits alone, among rows that fill
    several programs (the last one partial), and next to zero, huge (squares overflow),
    tiny (squares underflow), NaN and Inf rows.
    ``l2norm check --backends jax-pallas`` runs the suite's own check on the TPU kernel."""
    rng = np.random.default_rng(3)
    width = 48
    count = 3 * _pallas.block_config(width, platform).rows + 5
    x = (rng.standard_normal((count, width)) * 3).astype(np.float32)
    g = rng.standard_normal((count, width)).astype(np.float32)
    s = rng.uniform(0.5, 20, width).astype(np.float32)
    hostile = x.copy()
    for row, value in ((1, 0.0), (count // 3, 1e25), (count // 2, 1e-25)):
        hostile[row] = x[row] * value
    hostile[count - 2, 3], hostile[count - 1, 5] = np.nan, np.inf
    options = {"eps_mode": "clamp_norm", "eps": 1e-12, "interpret": True, "platform": platform}

    @jax.jit
    def run(x, g):
        y = _pallas.forward(x, s, channel=1, **options)
        return y, _pallas.vjp(x, s, g, channel=1, **options)[0]

    pick = count - 3  # in the last, partial program
    alone = [np.asarray(v) for v in run(x[pick : pick + 1], g[pick : pick + 1])]
    for batch in (x, hostile):
        together = [np.asarray(v)[pick : pick + 1] for v in run(batch, g)]
        for a, b in zip(alone, together, strict=True):
            assert a.tobytes() == b.tobytes()


def _exported(platform: str, dtype: str, width: int, mode: str) -> str:
    def f(x, s, g):
        options = {"channel": -1, "eps_mode": mode, "eps": 1e-10}
        y = _pallas.forward(x, s, **options)
        dx, ds = _pallas.vjp(x, s, g, **options)
        return y, dx, ds

    x = jax.ShapeDtypeStruct((37, width), jnp.dtype(dtype))
    s = jax.ShapeDtypeStruct((width,), jnp.float32)
    # XLA's Triton custom call carries no compatibility guarantee for serialized
    # artifacts; the check is about the lowering, so it is waived for that target only.
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exported = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)
    return exported(x, s, x).mlir_module()


#: Each dtype and width once with the sum of squares and once with its mean (RMSNorm),
#: whose per-row terms divide by the row's size.
EXPORTED = [
    ("float32", 24, "add_sumsq"),
    ("float32", 512, "add_meansq"),
    ("bfloat16", 24, "add_meansq"),
    ("bfloat16", 512, "add_sumsq"),
]


@pytest.mark.parametrize(("dtype", "width", "mode"), EXPORTED)
def test_lowers_for_cuda_through_triton(dtype, width, mode):
    """Pallas' Triton backend turns both kernels into Triton IR in XLA's Triton custom
    call, with the grid and warps of the block configuration; no interpreter."""
    text = _exported("cuda", dtype, width, mode)
    assert re.findall(r"custom_call @([\w$.]+)", text) == [TRITON_CALL, TRITON_CALL]
    cfg = _pallas.block_config(width, "cuda")
    backward = _pallas.block_config(width, "cuda", heavy=dtype == "float32")
    assert text.count(f"grid_x = {-(-37 // cfg.rows)} ") == 2
    warps = sorted(int(w) for w in re.findall(r"num_warps = (\d+) ", text))
    assert warps == sorted([cfg.num_warps, backward.num_warps])
    assert "stablehlo.while" not in text  # interpret mode would loop over the grid


@pytest.mark.parametrize(("dtype", "width", "mode"), EXPORTED)
def test_lowers_for_tpu_through_mosaic(dtype, width, mode):
    """Pallas' Mosaic backend serializes both kernels into TPU custom calls."""
    text = _exported("tpu", dtype, width, mode)
    assert re.findall(r"custom_call @([\w$.]+)", text) == ["tpu_custom_call", "tpu_custom_call"]
    assert "stablehlo.while" not in text


def test_block_configuration_depends_on_width_and_platform_only():
    for width in (1, 3, 24, 128, 129, 512, 2048, _pallas.MAX_WIDTH):
        gpu, tpu = _pallas.block_config(width, "cuda"), _pallas.block_config(width, "tpu")
        assert gpu.width == 1 << (width - 1).bit_length() and gpu.rows * gpu.width >= 2048
        assert tpu.rows % 8 == 0 and tpu.width >= width
        assert tpu.width == width or (tpu.width % 128 == 0 and tpu.width & (tpu.width - 1) == 0)


def test_what_the_kernels_take():
    axes = Spec.create(axis=1).resolve(4)
    assert _pallas.applies("bfloat16", axes, "tpu") and _pallas.applies("float16", axes, "cuda")
    assert not _pallas.applies("float64", axes, "cuda")
    assert not _pallas.applies("float32", axes, "cpu")
    with pytest.raises(TypeError, match="int32"):
        _pallas.forward(jnp.ones((2, 3), int), None, channel=1, eps_mode="add_norm", eps=1.0)
    with pytest.raises(ValueError, match="4097 entries"):
        _pallas.forward(jnp.ones((1, 4097)), None, channel=1, eps_mode="add_norm", eps=1.0)
    with pytest.raises(ValueError, match="no Pallas kernel for platform 'cpu'"):
        _pallas.forward(
            jnp.ones((1, 4)), None, channel=1, eps_mode="add_norm", eps=1.0, platform="cpu"
        )


def test_zero_size_and_platform_chosen_while_lowering():
    """Zero-size inputs give empty results; with no platform named, the CPU runs the
    TPU kernel interpreted (``lax.platform_dependent``'s default branch)."""
    options = {"channel": 1, "eps_mode": "clamp_norm", "eps": 1e-12}
    empty = jnp.ones((0, 4))
    assert _pallas.forward(empty, None, **options).shape == (0, 4)
    dx, ds = _pallas.vjp(empty, jnp.ones(4), empty, **options)
    assert dx.shape == (0, 4) and np.array_equal(np.asarray(ds), np.zeros(4))
    x = jnp.array([[3.0, 4.0, 0.0, 0.0]])
    y = jax.jit(lambda x: _pallas.forward(x, None, **options))(x)
    assert np.array_equal(np.asarray(y), np.array([[0.6, 0.8, 0.0, 0.0]], np.float32))


@pytest.mark.parametrize("module", [_pallas, pallas_backend], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def _triton_modules(monkeypatch, width: int, dtype: str, mode: str) -> list[str]:
    """The Triton IR Pallas generates for the forward and backward kernels (``cuda``)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    modules = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)

    def f(x, s, g):
        options = {"channel": -1, "eps_mode": mode, "eps": 1e-10, "platform": "cuda"}
        return _pallas.forward(x, s, **options), _pallas.vjp(x, s, g, **options)

    x = jax.ShapeDtypeStruct((64, width), jnp.dtype(dtype))
    s = jax.ShapeDtypeStruct((width,), jnp.float32)
    jax.jit(f).trace(x, s, x).lower(lowering_platforms=("cuda",))
    return modules


@pytest.mark.parametrize(
    ("width", "dtype", "mode"),
    [
        (512, "float32", "add_norm"),
        # The most registers: the widest rows, the float32 backward, and the mean's
        # division by the row's size on top of the sum of squares' terms.
        (4096, "float32", "add_meansq"),
        (512, "bfloat16", "add_norm"),
    ],
)
def test_gpu_kernels_compile_for_sm90_without_spills(monkeypatch, tmp_path, width, dtype, mode):
    """Triton compiles the IR Pallas generates ahead of time for an H100 (sm_90, ptxas
    from the triton wheel): at most 128 registers a thread and no local-memory spills,
    for the forward and the backward kernel."""
    import subprocess
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for number, module in enumerate(_triton_modules(monkeypatch, width, dtype, mode)):
        source = tmp_path / f"kernel{number}.ttir"
        source.write_text(module)
        cfg = _pallas.block_config(width, "cuda", heavy=number == 1 and dtype == "float32")
        options = {"num_warps": cfg.num_warps, "num_stages": 1, "enable_fp_fusion": True}
        kernel = triton.compile(str(source), target=GPUTarget("cuda", 90, 32), options=options)
        binary = tmp_path / f"kernel{number}.cubin"
        binary.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [str(tool), "-res-usage", str(binary)], capture_output=True, text=True, check=True
        ).stdout
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        stack = int(re.search(r"STACK:(\d+)", usage).group(1))
        assert registers <= 128 and stack == 0, (number, usage)


# --------------------------------------------------------------------------- as the JAX op
# The kernels behind l2norm.jax's primitives (use_lowering("pallas"); interpreted here):
# the same transformations as the other lowerings, compared with the reference.


def _reference_vjp(x, w, g):
    from l2norm import reference

    return reference.l2_normalize_vjp(x, w, g)


def test_the_op_on_pallas_matches_the_reference_under_its_transformations():
    from l2norm.jax import l2_normalize, lowering_for, use_lowering
    from l2norm.testing import assert_matches_reference

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    x[0, 1] = 0.0  # a zero slice
    w = (rng.standard_normal(16) + 2).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    with use_lowering("pallas"):
        assert lowering_for(x) == "pallas"
        f = jax.jit(lambda x, w: l2_normalize(x, w))
        assert_matches_reference(f, x, w, forward_ulps=1)
        _, pullback = jax.vjp(f, x, w)
        dx, dw = pullback(g)
        rdx, rdw = _reference_vjp(x, w, g)
        assert np.max(np.abs(dx - rdx)) <= 2 * np.finfo(np.float32).eps * np.max(np.abs(rdx))
        assert np.max(np.abs(dw - rdw)) <= 2 * np.finfo(np.float32).eps * np.sum(np.abs(rdw))
        # per-example gradients with a shared scale: a loop over examples
        per_example = jax.vmap(
            jax.grad(lambda xi, w: jnp.sum(l2_normalize(xi, w) * g[0]), argnums=(0, 1)),
            in_axes=(0, None),
        )(x, w)
        for i in range(len(x)):
            want_dx, want_dw = _reference_vjp(x[i], w, g[0])
            bound = 2 * np.finfo(np.float32).eps
            assert np.max(np.abs(per_example[0][i] - want_dx)) <= bound * np.max(np.abs(want_dx))
            assert np.max(np.abs(per_example[1][i] - want_dw)) <= bound * np.sum(np.abs(want_dw))
        # vmap over the scale: each scale's result is the unbatched call's
        ys = jax.vmap(lambda w: f(x, w))(np.stack([w, 2 * w]))
        np.testing.assert_array_equal(ys[0], f(x, w))
        np.testing.assert_array_equal(ys[1], f(x, 2 * w))
        # forward mode: <J t, c> = <t, J^T c> with the reference's transpose
        t = rng.standard_normal(x.shape).astype(np.float32)
        _, ty = jax.jvp(lambda x: l2_normalize(x[1:], w), (x,), (t,))
        _, want = jax.jvp(lambda x: l2_normalize(x[1:], w), (x,), (t,))
        np.testing.assert_array_equal(ty, want)  # deterministic
        rdx1, _ = _reference_vjp(x[1:], w, g[1:])
        assert abs(np.sum(ty * g[1:]) - np.sum(t[1:] * rdx1)) <= 1e-4 * np.sum(np.abs(t[1:] * rdx1))


def test_the_op_on_pallas_keeps_a_batch_sharding_with_no_gather():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from l2norm.jax import l2_normalize, use_lowering

    assert len(jax.devices()) >= 2, "scripts/test runs with 4 host devices"
    mesh = Mesh(jax.devices()[:2], ("data",))
    x = np.random.default_rng(1).standard_normal((4, 6, 32)).astype(np.float32)
    w = np.full(32, 3.0, np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    with use_lowering("pallas"):
        f = jax.jit(lambda x, w: l2_normalize(x, w))
        y = f(xs, w)
        forward = f.lower(xs, w).compile().as_text()
        grads = jax.jit(jax.grad(lambda x, w: jnp.sum(l2_normalize(x, w) ** 2), argnums=(0, 1)))
        backward = grads.lower(xs, w).compile().as_text()
    assert y.sharding.spec == P("data")
    from l2norm import reference

    assert np.max(np.abs(np.asarray(y) - reference.l2_normalize(x, w))) <= 3 * 2**-24 * 3
    collectives = ("all-gather", "all-to-all", "collective-permute")
    assert not [c for c in (*collectives, "all-reduce") if c in forward]
    assert not [c for c in collectives if c in backward]  # only the scale's all-reduce


def test_rms_norm_on_pallas_matches_the_reference():
    """RMSNorm through the JAX primitives on the Pallas kernels: the op hands them the
    mean placement and the slice size (a sum-of-squares kernel would be off by
    ``sqrt(N)``); forward within 1 ULP, gradients as the L2 op's above."""
    from l2norm import reference
    from l2norm.jax import lowering_for, rms_norm, use_lowering
    from l2norm.testing import assert_matches_reference

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 24)).astype(np.float32)
    x[0, 1] = 0.0  # a zero slice: eps alone
    w = rng.uniform(0.5, 2.0, 24).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    with use_lowering("pallas"):
        assert lowering_for(x) == "pallas"
        f = jax.jit(lambda x, w: rms_norm(x, w, eps=1e-6))
        assert_matches_reference(f, x, w, forward_ulps=1, eps_mode="add_meansq", eps=1e-6)
        dx, dw = jax.vjp(f, x, w)[1](g)
    rdx, rdw = reference.l2_normalize_vjp(x, w, g, eps_mode="add_meansq", eps=1e-6)
    bound = 2 * np.finfo(np.float32).eps
    assert np.max(np.abs(dx - rdx)) <= bound * np.max(np.abs(rdx))
    assert np.max(np.abs(dw - rdw)) <= bound * np.sum(np.abs(rdw))


@pytest.mark.parametrize(("platform", "marker"), [("cuda", "triton"), ("tpu", "tpu_custom_call")])
def test_the_op_on_pallas_exports_for_accelerators(platform, marker):
    """The L2 op and RMSNorm (the mean placement) both lower to the kernels."""
    from jax import export

    from l2norm.jax import l2_normalize, rms_norm, use_lowering

    x, w = jnp.ones((4, 8, 8, 64), jnp.bfloat16), jnp.full((64,), 20.0)
    with use_lowering("pallas"):
        for op in (l2_normalize, rms_norm):
            exported = export.export(
                jax.jit(lambda x, w, op=op: op(x, w)),
                platforms=[platform],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
            )(x, w)
            assert marker in exported.mlir_module(), op.__name__


@pytest.mark.parametrize(
    ("backend", "want"), [("gpu", "pallas"), ("tpu", "ops"), ("cpu", "cpu-kernel")]
)
def test_pallas_is_the_default_on_cuda_gpus(monkeypatch, backend, want):
    """CUDA GPUs take the Pallas kernels by default (their Triton lowering is compiled
    ahead of time above); TPUs keep the ladder until the Mosaic kernels have run on one."""
    from l2norm.jax import _primitives as _jax_kernel

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    axes = Spec.create(axis=-1).resolve(2)
    assert _jax_kernel.choose("float32", axes, 512) == want
    assert _jax_kernel.choose("float64", axes, 512) == "ops"
    assert _jax_kernel.choose("float32", axes, _pallas.MAX_WIDTH * 2) in ("ops", "cpu-kernel")
