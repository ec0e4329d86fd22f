"""The fused FP8 quantization kernels (pallas_kernels/fp8_gemm/quantize_gpu.py, Pallas Triton) are bit-equal to
quantize.py's XLA ops: e4m3 values and float32 scales, on ragged shapes, all-zero tiles (scale 1), a NaN (which
poisons its tile, scale and all) and rows of wildly different magnitudes; the gathering transpose on align_groups'
layout with empty groups, one group holding every row and sum(group_sizes) < M. Interpret mode on the CPU;
FP8_TEST_REAL_GPU=1 on a GPU runs them compiled (experiments/check_fp8_gemm_gpu.sh)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemm import (
    align_groups,
    quantize,
    quantize_both,
    quantize_fused,
    quantize_gpu,
    quantize_swiglu,
    quantize_swiglu_bwd,
    quantize_tiles_t,
    take_aligned,
)

INTERPRET = os.environ.get("FP8_TEST_REAL_GPU") != "1"


def _assert_bits_equal(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        np.testing.assert_array_equal(g, w)  # NaN == NaN for assert_array_equal


def _activations(m, k, seed=0, dtype=jnp.bfloat16):
    """Rows spread over ~e^+-9 of magnitude, the first 128 x 128 tile zero, one NaN."""
    kx, ks = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k)) * jnp.exp(3.0 * jax.random.normal(ks, (m, 1)))
    return x.at[:128, :128].set(0.0).at[m // 2, k // 3].set(jnp.nan).astype(dtype)


@pytest.mark.parametrize("m, k", [(300, 200), (129, 128), (1, 1)])
def test_quantize_tiles_kernel_is_bit_equal(m, k):
    x = _activations(m, k)
    _assert_bits_equal(quantize_gpu.quantize_tiles(x, interpret=INTERPRET), quantize.quantize_tiles(x))


@pytest.mark.parametrize("m, k", [(300, 200), (128, 1)])
def test_transposing_quantize_kernel_is_bit_equal(m, k):
    x = _activations(m, k, seed=1)
    _assert_bits_equal(quantize_gpu.quantize_tiles_t(x, interpret=INTERPRET), quantize.quantize_tiles(x.T))


@pytest.mark.parametrize(
    "sizes",
    [[0, 100, 3, 190, 0], [300]],  # empty groups and sum < M; one group holding every row
    ids=["empty_groups_short", "one_group"],
)
def test_gathering_quantize_kernel_is_bit_equal_on_aligned_groups(sizes):
    x = _activations(300, 200, seed=2)
    index, _ = align_groups(jnp.asarray(sizes, jnp.int32), x.shape[0])
    want = quantize.quantize_tiles(take_aligned(x, index).T)
    _assert_bits_equal(quantize_gpu.quantize_tiles_t(x, index, interpret=INTERPRET), want)
    # the op the FP8 layers call dispatches to the kernel for "gpu" and to XLA otherwise
    _assert_bits_equal(quantize_tiles_t(x, index, backend="gpu", interpret=INTERPRET), want)
    _assert_bits_equal(quantize_tiles_t(x, index, backend="xla"), want)


@pytest.mark.parametrize("block", [32, 64])
def test_blocked_quantizers_are_bit_equal(block):
    """The BlockSpec-tiled variants (blocked=True, on shapes their tiles divide) compute the same codes and scales."""
    x = _activations(256, 384, seed=5)
    want = quantize.quantize_tiles(x)
    _assert_bits_equal(quantize_gpu.quantize_tiles(x, blocked=True, block_r=block, interpret=INTERPRET), want)
    want_t = quantize.quantize_tiles(x.T)
    _assert_bits_equal(quantize_gpu.quantize_tiles_t(x, blocked=True, block_c=block, interpret=INTERPRET), want_t)


@pytest.mark.parametrize("shape", [(200, 300), (2, 256, 130)])
def test_quantize_blocks_kernel_is_bit_equal(shape):
    w = jax.random.normal(jax.random.key(3), shape) * 0.02
    w = w.at[..., :128, :128].set(0.0).at[..., 130, 7].set(jnp.nan)
    _assert_bits_equal(quantize_gpu.quantize_blocks(w, interpret=INTERPRET), quantize.quantize_blocks(w))


@pytest.mark.parametrize("sizes", [None, [0, 100, 3, 150, 0]], ids=["dense", "groups_short_of_m"])
def test_both_quantizations_are_the_two_kernels(sizes):
    """quantize_both: a layer's forward (or dgrad) operand and its weight-gradient operand. On the GPU backend the
    two kernels; the XLA path also zeroes the rows past sum(group_sizes) (here 253-299), which no group reads."""
    x = _activations(300, 200, seed=4)
    index = None if sizes is None else align_groups(jnp.asarray(sizes, jnp.int32), x.shape[0])[0]
    used = x.shape[0] if sizes is None else sum(sizes)
    want_t = quantize.quantize_tiles((x if index is None else take_aligned(x, index)).T)
    (q, s), (qt, st) = quantize_both(x, index, backend="gpu", interpret=INTERPRET)
    _assert_bits_equal((q, s, qt, st), (*quantize.quantize_tiles(x), *want_t))
    (q, s), (qt, st) = quantize_both(x, index, backend="xla")
    _assert_bits_equal((q, s, qt, st), (*quantize.quantize_tiles(x.at[used:].set(0)), *want_t))


def test_gathering_quantize_kernel_rejects_a_ragged_index():
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_gpu.quantize_tiles_t(jnp.zeros((8, 8)), jnp.zeros((100,), jnp.int32), interpret=True)


# ---------------------------------------------------------------- one-read and SwiGLU-fused quantizers
def _assert_codes_close(got, want):
    """Compiled on a GPU the fused SwiGLU's sigmoid may round apart from XLA's in the last bit: scales within 2
    ulp, codes within one e4m3 step, and all but 0.1% of them equal. In interpret mode: bitwise."""
    if INTERPRET:
        return _assert_bits_equal(got, want)
    for g, w in zip(got, want):
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0.125, atol=2.0**-9)
        assert np.mean(g != w) < 1e-3


def test_one_read_quantize_both_is_bit_equal():
    x = _activations(256, 384, seed=6)
    got = quantize_fused.quantize_both(x, interpret=INTERPRET)
    _assert_bits_equal((*got[0], *got[1]), (*quantize.quantize_tiles(x), *quantize.quantize_tiles(x.T)))
    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_fused.quantize_both(x[:200], interpret=True)


def test_swiglu_fused_quantizers_equal_the_swiglu_then_the_quantizers():
    """quantize_swiglu / quantize_swiglu_bwd (one pass over [gate | up] and dh) against the XLA path the layer takes
    unfused: SwiGLU in float32, rounded to bf16, then quantize_tiles and the transposed quantize_tiles."""
    rows, i = 256, 256
    gu = _activations(rows, 2 * i, seed=7)
    dh = _activations(rows, i, seed=8)
    want = quantize_swiglu(gu, backend="xla")
    got = quantize_fused.quantize_swiglu(gu, interpret=INTERPRET)
    _assert_codes_close((*got[0], *got[1]), (*want[0], *want[1]))
    # the op dispatches to the kernel with fused=True on the gpu backend, and to the composition otherwise
    assert quantize_swiglu(gu, backend="gpu", fused=False, interpret=INTERPRET)[0][0].shape == (rows, i)
    want = quantize_swiglu_bwd(gu, dh, backend="xla")
    got = quantize_fused.quantize_swiglu_bwd(gu, dh, interpret=INTERPRET)
    assert got[0][0].shape == (rows, 2 * i) and got[1][0].shape == (2 * i, rows)
    _assert_codes_close((*got[0], *got[1]), (*want[0], *want[1]))
    with pytest.raises(ValueError, match="dh must be"):
        quantize_fused.quantize_swiglu_bwd(gu, dh[:, :128], interpret=True)
