"""FP8 weight gradients with DeepSeek-V3's scaling, both operands quantized along the tokens they contract: the
dense one (fp8_gemm with tile-scaled rhs; fp8_wgrad, split along the contraction) and the grouped one (fp8_tgmm,
each expert's rows on 128-row steps: align_groups), their Mosaic GPU kernels against the XLA reference (interpret
mode on the CPU; FP8_TEST_REAL_GPU=1 on a Hopper GPU runs them compiled)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import (
    Fp8GpuConfig,
    align_groups,
    fp8_gemm,
    fp8_tgmm,
    fp8_wgrad,
    quantize_tiles,
    take_aligned,
)
from pallas_kernels.fp8_gemm.ops import wgrad_splits
from tests.fp8_helpers import GPU_ONLY_WS3, INTERPRET, rel

# fp8_tgmm refuses skip_idle_wgs and ring_loads (fp8_gmm's: its tiles are whole, no warpgroup idles)
TGMM_WS3 = [c for c in GPU_ONLY_WS3 if not (c.skip_idle_wgs or c.ring_loads)]


def test_fp8_tgmm_refuses_skip_idle_wgs():
    """fp8_tgmm's tiles are a group's whole K x N, so no warpgroup is idle: the knob is refused, not ignored."""
    z = jnp.zeros((128, 128), jnp.float8_e4m3fn), jnp.ones((128, 1), jnp.float32)
    cfg = Fp8GpuConfig(block_m=128, warp_specialized=True, skip_idle_wgs=True)
    with pytest.raises(ValueError, match="skip_idle_wgs is fp8_gmm's only"):
        fp8_tgmm(*z, *z, jnp.asarray([128], jnp.int32), backend="gpu", interpret=True, config=cfg)


@pytest.mark.parametrize(
    "cfg", [Fp8GpuConfig(), Fp8GpuConfig(block_m=128, warp_specialized=True)], ids=["one_wg", "ws"]
)
def test_gpu_kernel_runs_the_dense_weight_gradient(cfg):
    """dW = x.T @ dy with both operands quantized along the tokens they contract (1 x 128 tiles of x.T and dy.T):
    the kernel takes dy's tile scales as per-column scales, so the same kernel runs it. Tokens (the contraction),
    rows and columns all off the tiles; rows of very different magnitudes."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 136)).astype(np.float32) * (10.0 ** rng.integers(-2, 3, (200, 1)))
    dy = rng.standard_normal((200, 72)).astype(np.float32)
    (aq, a_s), (bq, bs) = quantize_tiles(jnp.asarray(x.T)), quantize_tiles(jnp.asarray(dy.T))
    got = fp8_gemm(
        aq, a_s, bq, bs, rhs_tiles=True, out_dtype=jnp.float32, backend="gpu", interpret=INTERPRET, config=cfg
    )
    want = fp8_gemm(aq, a_s, bq, bs, rhs_tiles=True, out_dtype=jnp.float32, backend="xla")
    assert got.shape == (136, 72)
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
    assert rel(np.asarray(want), x.T @ dy) < 0.05  # and the FP8 product is the weight gradient, within e4m3's error


@pytest.mark.parametrize("splits", [1, 4])
def test_split_contraction_weight_gradient_equals_the_reference(splits):
    """fp8_wgrad: fp8_tgmm's kernel (its default, warp-specialized) on the contraction cut into chunks of whole
    128-token steps, summed: the dense weight gradient of the reference. 420 tokens (4 chunks: 128, 128, 128 and a
    ragged 36), rows and columns off the tiles."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((420, 136)).astype(np.float32) * (10.0 ** rng.integers(-2, 3, (420, 1)))
    dy = rng.standard_normal((420, 72)).astype(np.float32)
    (aq, a_s), (bq, bs) = quantize_tiles(jnp.asarray(x.T)), quantize_tiles(jnp.asarray(dy.T))
    got = fp8_wgrad(aq, a_s, bq, bs, splits=splits, backend="gpu", interpret=INTERPRET)
    want = fp8_gemm(aq, a_s, bq, bs, rhs_tiles=True, out_dtype=jnp.float32, backend="xla")
    assert got.shape == (136, 72) and got.dtype == jnp.float32
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)


def test_wgrad_splits_fill_the_waves():
    cfg = Fp8GpuConfig(block_m=128)
    assert wgrad_splits(1024, 32768, 3072, 132, cfg) == 2  # 192 tiles: 73% of 2 waves -> 384: 97% of 3
    assert wgrad_splits(2048, 32768, 1024, 132, cfg) == 1  # 128 tiles already fill 97%
    assert wgrad_splits(1024, 300, 200, 132, cfg) == 1  # too short to cut: chunks keep >= 8 steps of 128
    assert wgrad_splits(1024, 32768, 576, 132, cfg) == 3  # 40 tiles -> 120 of 132


def test_align_groups_starts_every_group_on_a_128_row_step():
    sizes = np.array([130, 0, 5, 256, 1], np.int32)
    m = 400  # 8 rows past sum(sizes): left out
    index, padded = (np.asarray(a) for a in align_groups(jnp.asarray(sizes), m))
    assert padded.tolist() == [256, 0, 128, 256, 128]
    assert len(index) == 512 + 5 * 128 and len(index) >= padded.sum()
    src, dst = np.cumsum(sizes) - sizes, np.cumsum(padded) - padded
    for g in range(len(sizes)):
        assert dst[g] % 128 == 0
        np.testing.assert_array_equal(index[dst[g] : dst[g] + sizes[g]], src[g] + np.arange(sizes[g]))
    assert np.sum(index < m) == sizes.sum()  # every other position takes the zero row
    assert np.all(index[padded.sum() :] == m)


def _aligned_wgrad_operands(x, dy, sizes):
    index, padded = align_groups(jnp.asarray(sizes, jnp.int32), x.shape[0])
    take = lambda a: take_aligned(jnp.asarray(a), index)  # noqa: E731
    return quantize_tiles(take(x).T), quantize_tiles(take(dy).T), padded


@pytest.mark.parametrize(
    "cfg",
    [None, Fp8GpuConfig(block_m=128, warp_specialized=True, max_concurrent_steps=2)] + TGMM_WS3,
    ids=["one_wg", "warp_specialized"] + ["gpu_only_ws3"] * len(TGMM_WS3),
)
@pytest.mark.parametrize("sizes", [[100, 0, 37, 150], [300]], ids=["empty_group_and_tail", "one_group"])
def test_gpu_grouped_weight_gradient_equals_the_reference(sizes, cfg):
    """fp8_tgmm's kernel on group-aligned rows: each expert's x^T dy from its own 128-token tiles; K and N off the
    tiles, an empty group (zeros), rows past sum(sizes) ignored; and the product is the true per-group gradient
    within e4m3's error."""
    rng = np.random.default_rng(11)
    m, k, n = 300, 136, 72
    x = rng.standard_normal((m, k)).astype(np.float32) * (10.0 ** rng.integers(-2, 3, (m, 1)))
    dy = rng.standard_normal((m, n)).astype(np.float32)
    (aq, a_s), (bq, bs), padded = _aligned_wgrad_operands(x, dy, sizes)
    got = fp8_tgmm(aq, a_s, bq, bs, padded, backend="gpu", interpret=INTERPRET, config=cfg)
    want = fp8_tgmm(aq, a_s, bq, bs, padded, backend="xla")
    assert got.shape == (len(sizes), k, n)
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
    starts = np.cumsum(sizes) - sizes
    for g, (s0, size) in enumerate(zip(starts, sizes)):
        exact = x[s0 : s0 + size].T @ dy[s0 : s0 + size]
        if size == 0:
            assert np.all(np.asarray(got[g]) == 0)
        else:
            assert rel(np.asarray(got[g]), exact) < 0.05


@pytest.mark.parametrize("stages", [2, 3])
def test_tgmm_ring_runs_through_tiles_of_uneven_steps(stages):
    """The warp-specialized fp8_tgmm's ring of smem slots carries its slot count across an SM's tiles: groups of 3,
    0, 5, 1 and 0 steps over 2 K tiles, so each SM's tiles end on every slot and wrap the ring several times;
    empty groups in the middle and at the end store zeros. It equals the reference and the one-warpgroup kernel."""
    rng = np.random.default_rng(stages)
    sizes = [384, 0, 600, 100, 0]
    m, k, n = 1280, 256, 128
    x = rng.standard_normal((m, k)).astype(np.float32) * (10.0 ** rng.integers(-2, 3, (m, 1)))
    dy = rng.standard_normal((m, n)).astype(np.float32)
    (aq, a_s), (bq, bs), padded = _aligned_wgrad_operands(x, dy, sizes)
    ring = Fp8GpuConfig(block_m=128, warp_specialized=True, max_concurrent_steps=stages)
    got = fp8_tgmm(aq, a_s, bq, bs, padded, backend="gpu", interpret=INTERPRET, config=ring)
    one_wg = fp8_tgmm(aq, a_s, bq, bs, padded, backend="gpu", interpret=INTERPRET, config=Fp8GpuConfig())
    want = fp8_tgmm(aq, a_s, bq, bs, padded, backend="xla")
    tol = (1e-5 if INTERPRET else 2e-3) * float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(got, one_wg, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert np.all(np.asarray(got)[[1, 4]] == 0)


def test_gpu_grouped_weight_gradient_refuses_misaligned_groups_with_nan():
    """A group starting mid-tile would share a 128-token scaling tile with its neighbour: NaN, not a quietly
    wrong gradient (the trainer's non-finite guard then skips the step and says so)."""
    (aq, a_s), (bq, bs) = (quantize_tiles(jnp.ones((64, 256), jnp.float32)) for _ in range(2))
    out = fp8_tgmm(aq, a_s, bq, bs, jnp.asarray([100, 156], jnp.int32), backend="gpu", interpret=INTERPRET)
    assert out.shape == (2, 64, 64) and np.all(np.isnan(np.asarray(out)))
