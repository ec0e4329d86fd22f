"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling: quantization round trips, layouts, the reference GEMMs
against float32 products of the dequantized operands, and the Mosaic GPU kernel against the reference (interpret
mode on the CPU; FP8_TEST_REAL_GPU=1 on a Hopper GPU runs those cases compiled). The weight gradients' kernels:
test_fp8_wgrad.py; FP8 training's custom VJPs: test_fp8_layers.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax.convert import fp8 as convert_fp8
from pallas_kernels.fp8_gemm import (
    E4M3_MAX,
    Fp8GpuConfig,
    dequantize_blocks,
    dequantize_tiles,
    fp8_gemm,
    fp8_gmm,
    quantize_blocks,
    quantize_tiles,
    transposed_blocks,
)
from pallas_kernels.fp8_gemm.gpu_config import check_config
from tests.fp8_helpers import GPU_ONLY_WS3, INTERPRET

# e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 of a normal value; below 2^-6 (scaled) the
# subnormal spacing is 2^-9, so half of it, 2^-10 of the scale, bounds the absolute error.
REL, SUB = 2.0**-4, 2.0**-10


def _within_e4m3(x, dq, scale_per_elem):
    x, dq = np.asarray(x, np.float64), np.asarray(dq, np.float64)
    bound = REL * np.abs(x) + SUB * np.asarray(scale_per_elem, np.float64) + 1e-30
    assert np.all(np.abs(x - dq) <= bound), float(np.max(np.abs(x - dq) - bound))


@pytest.mark.parametrize("m, k", [(5, 128), (33, 300), (8, 64), (1, 1)])
def test_quantize_tiles_round_trip_and_scales(m, k):
    rng = np.random.default_rng(m * 1000 + k)
    # rows of wildly different magnitudes: each row's tiles get their own scales
    x = rng.standard_normal((m, k)).astype(np.float32) * (10.0 ** rng.integers(-4, 5, (m, 1)))
    q, s = jax.jit(quantize_tiles)(jnp.asarray(x))
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (m, k) and s.shape == (m, -(-k // 128))
    pad = np.pad(np.abs(x), ((0, 0), (0, s.shape[1] * 128 - k))).reshape(m, -1, 128).max(-1)
    np.testing.assert_allclose(s, pad / E4M3_MAX, rtol=1e-6)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) <= E4M3_MAX
    _within_e4m3(x, dequantize_tiles(q, s), np.repeat(np.asarray(s), 128, -1)[:, :k])


def test_zero_tiles_get_scale_one_and_nan_poisons_only_its_tile():
    x = np.zeros((3, 256), np.float32)
    x[1, 130] = 2.0
    x[2, 5] = np.nan
    q, s = quantize_tiles(jnp.asarray(x))
    np.testing.assert_array_equal(s[0], [1.0, 1.0])
    np.testing.assert_allclose(s[1], [1.0, 2.0 / E4M3_MAX], rtol=1e-7)
    assert np.isnan(np.asarray(s[2, 0])) and float(s[2, 1]) == 1.0
    assert np.all(np.asarray(dequantize_tiles(q, s))[:2] == x[:2])


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 72, 260)])
def test_quantize_blocks_is_k_major_and_matches_the_checkpoint_format(shape):
    """quantize_blocks(w [in, out]) is the released format of w.T ([out, in] + weight_scale_inv): the same codes
    and scales as the converter's NumPy quantizer (dsjax/convert/fp8.py)."""
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    q, s = jax.jit(quantize_blocks)(jnp.asarray(w))
    *lead, k, n = shape
    assert q.shape == (*lead, n, k) and s.shape == (*lead, -(-n // 128), -(-k // 128))
    for idx in np.ndindex(*lead):
        ref_q, ref_s = convert_fp8.quantize(w[idx].T)
        np.testing.assert_array_equal(np.asarray(q[idx]).view(np.uint8), ref_q.view(np.uint8))
        np.testing.assert_allclose(s[idx], ref_s, rtol=2e-7)
        # XLA may divide by 448 as a multiply by its reciprocal: scales agree to an ulp, codes exactly
        np.testing.assert_allclose(dequantize_blocks(q[idx], s[idx]), convert_fp8.dequantize(ref_q, ref_s), rtol=2e-7)
    wt = np.swapaxes(w, -1, -2)
    scales = np.repeat(np.repeat(np.asarray(s), 128, -2)[..., :n, :], 128, -1)[..., :k]
    _within_e4m3(wt, dequantize_blocks(q, s), scales)


def _operands(m, k, n, g, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * (10.0 ** rng.integers(-2, 3, (m, 1)))
    w = rng.standard_normal((g, k, n)).astype(np.float32) * 0.05
    return quantize_tiles(jnp.asarray(x)), quantize_blocks(jnp.asarray(w))


@pytest.mark.parametrize(
    "m, k, n, sizes",
    [
        (96, 256, 192, [40, 0, 56, 0]),  # empty groups
        (130, 200, 130, [130, 0, 0]),  # one group holds every row; M, K, N off the tiles
        (64, 128, 256, [10, 20, 5]),  # sum(group_sizes) < M: the rest are zero
    ],
)
def test_fp8_gmm_equals_the_dequantized_product(m, k, n, sizes):
    (xq, xs), (wq, ws) = _operands(m, k, n, len(sizes), seed=m + n)
    gs = jnp.asarray(sizes, jnp.int32)
    out = jax.jit(lambda *a: fp8_gmm(*a, out_dtype=jnp.float32))(xq, xs, wq, ws, gs)
    x, w = np.asarray(dequantize_tiles(xq, xs), np.float64), np.asarray(dequantize_blocks(wq, ws), np.float64)
    want = np.zeros((m, n))
    start = 0
    for g, size in enumerate(sizes):
        want[start : start + size] = x[start : start + size] @ w[g].T
        start += size
    scale = np.abs(want).max()
    np.testing.assert_allclose(out, want, atol=1e-5 * scale, rtol=1e-5)
    assert np.all(np.asarray(out)[sum(sizes) :] == 0)
    bf16 = fp8_gmm(xq, xs, wq, ws, gs)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), want, atol=1e-2 * scale, rtol=1e-2)


def test_fp8_gemm_tracks_the_float32_product_within_fp8_error():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    w = rng.standard_normal((512, 320)).astype(np.float32) * 0.05
    (xq, xs), (wq, ws) = quantize_tiles(jnp.asarray(x)), quantize_blocks(jnp.asarray(w))
    out = np.asarray(fp8_gemm(xq, xs, wq[None][0], ws, out_dtype=jnp.float32))
    exact = x.astype(np.float64) @ w
    # independent rounding of 512 terms at <= 2^-4 relative each: the product's error is a few percent of its norm
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.05
    with pytest.raises(ValueError, match="contraction mismatch"):
        fp8_gemm(xq, xs, wq[:, :256], ws[:, :2])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(jnp.asarray(x), xs, wq, ws)
    with pytest.raises(ValueError, match="backend"):
        fp8_gemm(xq, xs, wq, ws, backend="cuda")
    assert ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max == E4M3_MAX


@pytest.mark.parametrize("regs", [16, 36, 264])
def test_gpu_config_refuses_register_splits_setmaxnreg_cannot_make(regs):
    cfg = Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, memory_registers=regs)
    with pytest.raises(ValueError, match="memory_registers"):
        check_config(cfg)
    check_config(dataclasses.replace(cfg, memory_registers=24))


RING = Fp8GpuConfig(block_m=128, warp_specialized=True, ring_loads=True)


def test_ring_loads_config_runs_only_where_built():
    """ring_loads is fp8_gmm's warp-specialized kernel (gpu_ring.py, which ops.fp8_gmm picks): gpu.fp8_gmm,
    fp8_tgmm and a one-warpgroup or clustered config refuse it by name."""
    from pallas_kernels.fp8_gemm import fp8_tgmm, gpu, gpu_ring

    (xq, xs), (wq, ws) = _operands(128, 128, 128, 1, seed=1)
    gs = jnp.asarray([128], jnp.int32)
    with pytest.raises(ValueError, match="gpu_ring.fp8_gmm"):
        gpu.fp8_gmm(xq, xs.T, wq, ws, gs, config=RING, interpret=True)
    for cfg in (Fp8GpuConfig(ring_loads=True), dataclasses.replace(RING, cluster_n=2)):
        with pytest.raises(ValueError, match="ring_loads needs warp_specialized=True and cluster_n=1"):
            gpu_ring.fp8_gmm(xq, xs.T, wq, ws, gs, cfg, True, jnp.bfloat16, "block", None)
    with pytest.raises(ValueError, match="ring_loads is fp8_gmm's only"):
        fp8_tgmm(xq, xs, xq, xs, gs, backend="gpu", interpret=True, config=RING)  # a, b [128, 128] tile-scaled


@pytest.mark.parametrize("k, short", [(512, True), (1000, True), (1024, True), (1100, False), (7168, False)])
def test_default_kernel_config_runs_the_ring_for_short_contractions(k, short):
    """Where the caller names no config, fp8_gmm's kernel is GEMM_CONFIG on the load ring (gpu_ring) with
    early_store_rows on for K (padded to the 128 scaling tile) up to SHORT_K_MAX, where both measured faster,
    and the pipelined kernel (gpu) as GEMM_CONFIG past it."""
    from unittest import mock

    from pallas_kernels.fp8_gemm import gpu, gpu_config, gpu_ring

    seen = []

    def kernel(name):
        def run(x_q, xs_t, w_q, *args, config=None, **_):
            seen.append((name, config if config is not None else args[2]))
            return jnp.zeros((x_q.shape[0], w_q.shape[1]), jnp.bfloat16)

        return run

    x, w = jnp.ones((8, k), jnp.float32), jnp.ones((1, k, 128), jnp.float32)
    with mock.patch.object(gpu, "fp8_gmm", kernel("gpu")), mock.patch.object(gpu_ring, "fp8_gmm", kernel("ring")):
        fp8_gmm(*quantize_tiles(x), *quantize_blocks(w), jnp.asarray([8], jnp.int32), backend="gpu", interpret=True)
    ring = dataclasses.replace(gpu_config.GEMM_CONFIG, early_store_rows=True, ring_loads=True)
    assert seen == ([("ring", ring)] if short else [("gpu", gpu_config.GEMM_CONFIG)])


# ---------------------------------------------------------------- the Mosaic GPU kernel, interpret mode
# (GPU_ONLY_WS3: fp8_helpers.) The interpreter has no cluster barriers either (x multicast over a 2-CTA cluster).
GPU_ONLY_CONFIGS = GPU_ONLY_WS3 + (
    []
    if INTERPRET
    else [
        Fp8GpuConfig(block_m=128, warp_specialized=True, cluster_n=2),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, cluster_n=2),
    ]
)


@pytest.mark.parametrize(
    "m, k, n, sizes",
    [
        # empty groups, M and N off the tiles, sum(group_sizes) < M; group 0 fills one 64-row warpgroup of its
        # 128-row tile, so the other one computes rows that are not stored
        (200, 256, 136, [60, 0, 90, 0]),
        (96, 200, 128, [96]),  # one group holding every row (fewer rows than a tile), K off the 128 tile
    ],
)
@pytest.mark.parametrize(
    "cfg",
    [
        Fp8GpuConfig(),
        Fp8GpuConfig(block_m=128, warp_specialized=True, max_concurrent_steps=2),
        Fp8GpuConfig(block_m=128, warp_specialized=True, early_scales=False),
        Fp8GpuConfig(block_m=128, warp_specialized=True, skip_idle_wgs=True),
        Fp8GpuConfig(block_m=128, warp_specialized=True, early_store_rows=True),
        Fp8GpuConfig(block_m=128, warp_specialized=True, ring_loads=True),
        Fp8GpuConfig(block_m=128, warp_specialized=True, ring_loads=True, early_store_rows=True),
    ]
    + GPU_ONLY_CONFIGS,
    ids=[
        "one_wg",
        "warp_specialized",
        "ws_late_scales",
        "ws_skip_idle",
        "ws_early_store_rows",
        "ws_ring_loads",
        "ws_ring_loads_early_rows",
    ]
    + [f"gpu_only_{i}" for i in range(len(GPU_ONLY_CONFIGS))],
)
def test_gpu_kernel_equals_the_reference(m, k, n, sizes, cfg):
    """The kernel (outputs poisoned with NaN by the interpreter, so every element must be written) against the
    reference on the same quantized operands: per-128-K promotion gives the same float32 sums up to rounding.
    On the H200 Hopper's FP8 wgmma accumulates each 128-long K step with reduced precision (~14 bits, the reason
    for the promotion): measured 3e-4 of the largest output, so the compiled kernel is held to 2e-3 of it."""
    (xq, xs), (wq, ws) = _operands(m, k, n, len(sizes), seed=m * n)
    gs = jnp.asarray(sizes, jnp.int32)
    got = fp8_gmm(xq, xs, wq, ws, gs, out_dtype=jnp.float32, backend="gpu", interpret=INTERPRET, config=cfg)
    want = fp8_gmm(xq, xs, wq, ws, gs, out_dtype=jnp.float32, backend="xla")
    assert np.isfinite(np.asarray(got)).all()
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
    assert np.all(np.asarray(got)[sum(sizes) :] == 0)
    dense = fp8_gemm(xq, xs, wq[0], ws[0], out_dtype=jnp.float32, backend="gpu", interpret=INTERPRET, config=cfg)
    want = fp8_gemm(xq, xs, wq[0], ws[0], out_dtype=jnp.float32)
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=tol)


@pytest.mark.parametrize("backend", ["xla", "gpu"])
@pytest.mark.parametrize(
    "cfg",
    [Fp8GpuConfig(), Fp8GpuConfig(block_m=128, warp_specialized=True), RING],
    ids=["one_wg", "ws", "ws_ring_loads"],
)
def test_group_offset_reads_its_groups_from_a_larger_stack(backend, cfg):
    """fp8_gmm(..., group_offset=o) on a stack of every layer's experts is fp8_gmm on groups o .. o + G - 1 cut out
    (bit-equal: the same kernel on the same operands), with o traced as a scanned layer's index makes it."""
    (xq, xs), (wq, ws) = _operands(200, 256, 136, 6, seed=9)
    gs = jnp.asarray([60, 0, 90], jnp.int32)
    run = lambda w, s, o: fp8_gmm(  # noqa: E731
        xq, xs, w, s, gs, group_offset=o, out_dtype=jnp.float32, backend=backend, interpret=INTERPRET, config=cfg
    )
    for first in (0, 3):
        got = jax.jit(run)(wq, ws, jnp.int32(first))
        want = run(wq[first : first + 3], ws[first : first + 3], None)
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, jax.jit(run)(wq, ws, jnp.int32(1)))
    with pytest.raises(ValueError, match="group_sizes must be"):
        fp8_gmm(xq, xs, wq[:2], ws[:2], gs, group_offset=0, backend=backend)


@pytest.mark.parametrize("shape", [(200, 136), (3, 130, 260)])
def test_transposed_blocks_are_the_blocks_of_the_transpose(shape):
    """The FP8 layers' dgrad reuses the forward's quantized weight: its transposed codes and scales equal
    quantize_blocks of the transposed weight exactly (ragged edges included)."""
    w = jnp.asarray(np.random.default_rng(5).standard_normal(shape).astype(np.float32)) * 0.03
    wq, ws = transposed_blocks(*quantize_blocks(w))
    want_q, want_s = quantize_blocks(jnp.swapaxes(w, -1, -2))
    np.testing.assert_array_equal(np.asarray(wq, np.float32), np.asarray(want_q, np.float32))
    np.testing.assert_array_equal(ws, want_s)
