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
    quantize_gpu,
    quantize_tiles_t,
    requantize_tiles_t,
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


def test_amax_on_the_bits_is_the_float_amax_with_nan():
    """nan_amax (every kernel's tile maximum, an integer max over |t|'s bits) equals max |t| with NaN propagated, on
    special values: +-0, subnormals, +-inf, NaN of either sign and payload, and rows without any of them."""
    special = np.array([0.0, -0.0, 1e-45, -3e-39, 1.0, -2.5, 3e38, np.inf, -np.inf], np.float32)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    rng = np.random.default_rng(0)
    rows = rng.choice(np.concatenate([special, nans]), size=(64, 128))
    rows[:8] = rng.choice(special, size=(8, 128))  # rows with no NaN, some with an infinity
    rows[8:12] = rng.normal(size=(4, 128)) * 1e-40  # subnormal rows
    got = np.asarray(quantize_gpu.nan_amax(jnp.asarray(rows), axis=1))
    with np.errstate(invalid="ignore"):
        want = np.where(np.isnan(rows).any(1), np.nan, np.abs(np.where(np.isnan(rows), 0.0, rows)).max(1))
    np.testing.assert_array_equal(got, want)
    assert not np.isnan(got[:12]).any() and np.isnan(got[12:]).sum() == np.isnan(rows[12:]).any(1).sum()


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


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "plain"])
def test_row_scaled_transposing_quantize_is_bit_equal(gather):
    """quantize_tiles_t with row_scale (the experts' output gradient: each row's routing weight times its token's
    gradient, gathered): rows scaled in float32 before the amax, zero and tiny weights among them."""
    x = _activations(300, 200, seed=4)
    index = align_groups(jnp.asarray([0, 100, 3, 190, 0], jnp.int32), x.shape[0])[0] if gather else None
    rows = take_aligned(x, index) if gather else x
    scale = jax.random.uniform(jax.random.key(5), (rows.shape[0],)).at[3].set(0.0).at[7].set(1e-20)
    want = quantize.quantize_tiles((rows.astype(jnp.float32) * scale[:, None]).T)
    _assert_bits_equal(quantize_gpu.quantize_tiles_t(x, index, scale, interpret=INTERPRET), want)
    _assert_bits_equal(quantize_tiles_t(x, index, scale, backend="xla"), want)
    with pytest.raises(ValueError, match="row_scale must be"):
        quantize_gpu.quantize_tiles_t(x, index, scale[:-1], interpret=True)


@pytest.mark.parametrize(
    "gather, scaled, block_c, pack",
    [(False, False, None, 2), (True, False, 32, 2), (True, True, None, 2), (False, True, 128, 2)]
    + [(True, True, None, 1), (False, False, 128, 1), (True, True, 64, 4), (False, False, None, 4)],
)
def test_requantizing_transpose_is_bit_equal(gather, scaled, block_c, pack):
    """requantize_tiles_t: a weight gradient's operand from e4m3 tiles along C (DeepSeek-V3's workflow), the kernel
    dequantizing each code by its tile's scale as it reads, is bit-equal to XLA's dequantize_tiles then
    quantize_tiles_t: C off the tile (a partial last scale tile), a zero tile, a NaN (its 1 x 128 tile poisons the
    128 x 1 tiles it meets), rows gathered onto align_groups' layout and scaled by weights among them 0 and 1e-20;
    the codes read one by one, in uint16 pairs (two planes) or uint32 quads (four)."""
    x = _activations(300, 200, seed=6)
    xq, xs = quantize.quantize_tiles(x)
    index = align_groups(jnp.asarray([0, 100, 3, 190, 0], jnp.int32), x.shape[0])[0] if gather else None
    rows = quantize.dequantize_tiles(xq, xs)
    rows = take_aligned(rows, index) if gather else rows
    scale = jax.random.uniform(jax.random.key(7), (rows.shape[0],)).at[3].set(0.0).at[7].set(1e-20) if scaled else None
    want = quantize.quantize_tiles((rows if scale is None else rows * scale[:, None]).T)
    got = quantize_gpu.quantize_tiles_t(xq, index, scale, xs, block_c=block_c, pack=pack, interpret=INTERPRET)
    _assert_bits_equal(got, want)
    _assert_bits_equal(requantize_tiles_t(xq, xs, index, scale, backend="xla"), want)
    # a second rounding: each value within two e4m3 steps (1/8 relative, or the new tile's scale where the first
    # rounding was finer than its subnormals) of quantizing the values themselves; a NaN spreads over its 1 x 128
    # tile first, so it poisons at least the values the direct path poisons
    direct = np.asarray(quantize.dequantize_tiles(*quantize_tiles_t(x, index, scale)), np.float64)
    again = np.asarray(quantize.dequantize_tiles(*got), np.float64)
    assert np.all(np.isnan(again)[np.isnan(direct)]) and 0 < np.isnan(again).sum() <= 128 * 128  # one tile x one
    ok = ~np.isnan(again)
    step = np.maximum(np.abs(direct) / 8, np.repeat(np.asarray(got[1]), 128, axis=1)[:, : again.shape[1]])
    assert np.all(np.abs(again - direct)[ok] <= 2 * step[ok])
    with pytest.raises(ValueError, match="block_c must divide 128"):
        quantize_gpu.quantize_tiles_t(xq, index, scale, xs, block_c=96, interpret=True)
    with pytest.raises(ValueError, match="pack must be"):
        quantize_gpu.quantize_tiles_t(xq, index, scale, xs, pack=3, interpret=True)
    with pytest.raises(ValueError, match="e4m3 codes"):
        quantize_gpu.quantize_tiles_t(x, index, scale, xs, interpret=True)


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


@pytest.mark.parametrize("shape, shared", [((3, 256, 130), 1), ((2, 200, 300), 2)])
def test_stacked_quantize_blocks_is_the_concatenation(shape, shared):
    """quantize_blocks(w, extra): the routed experts' and shared experts' weights as one stack of groups, bit-equal
    to quantizing their concatenation (a zero block and a NaN in the extra part, ragged edges)."""
    w = jax.random.normal(jax.random.key(4), shape) * 0.02
    extra = jax.random.normal(jax.random.key(5), (shared, *shape[1:])) * 3.0
    extra = extra.at[-1, :128, :128].set(0.0).at[0, 130, 7].set(jnp.nan)
    got = quantize_gpu.quantize_blocks(w, extra, interpret=INTERPRET)
    _assert_bits_equal(got, quantize.quantize_blocks(jnp.concatenate([w, extra])))
    with pytest.raises(ValueError, match="extra must be"):
        quantize_gpu.quantize_blocks(w, extra[:, :-1], interpret=INTERPRET)


@pytest.mark.parametrize("extra", [0, 1], ids=["routed", "routed_and_shared"])
def test_every_layers_blocks_in_one_pass_with_both_orientations(extra):
    """quantize_blocks of a layer stack [L, G, K, N] (+ extra [L, S, K, N]): layer l's groups, then its extra ones,
    at [l * (G + S) ...], bit-equal to quantizing each layer's concatenation; transposed=True adds the dgrad's
    operand, bit-equal to transposed_blocks of the same blocks (ragged edges, a zero block, a NaN)."""
    w = jax.random.normal(jax.random.key(6), (2, 3, 200, 136)) * 0.02
    w = w.at[1, 2, :128, :128].set(0.0).at[0, 1, 130, 7].set(jnp.nan)
    e = jax.random.normal(jax.random.key(7), (2, extra, 200, 136)) * 3.0 if extra else None
    got = quantize_gpu.quantize_blocks(w, e, transposed=True, interpret=INTERPRET)
    for layer in range(2):
        parts = w[layer] if e is None else jnp.concatenate([w[layer], e[layer]])
        want = quantize.quantize_blocks(parts)
        _assert_bits_equal(tuple(a[layer] for a in got[:2]), want)
        _assert_bits_equal(tuple(a[layer] for a in got[2:]), quantize.transposed_blocks(*want))
    assert got[0].shape == (2, 3 + extra, 136, 200) and got[2].shape == (2, 3 + extra, 200, 136)
    with pytest.raises(ValueError, match="the same leading axes"):
        quantize_gpu.quantize_blocks(w, jnp.zeros((1, 1, 200, 136)), interpret=INTERPRET)


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
