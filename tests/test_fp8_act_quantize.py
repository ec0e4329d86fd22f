"""The experts' SwiGLU fused with the quantization of its result (pallas_kernels/fp8_gemm/quantize_act.py, Pallas
Triton), forward and backward, against the unfused path (the model's swiglu or its vjp in XLA, then
quantize_tiles): bit-equal in interpret mode on ragged row counts, rows of wildly different magnitudes, an
all-zero tile (scale 1) and a NaN (which poisons its tile). FP8_TEST_REAL_GPU=1 runs them compiled, where Triton's
sigmoid may round a value an ulp apart from XLA's: there a few codes may move by one e4m3 step."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.layers.mlp import swiglu
from pallas_kernels.fp8_gemm import act_bwd_quantize, act_quantize, quantize, quantize_act

INTERPRET = os.environ.get("FP8_TEST_REAL_GPU") != "1"
BF16 = jnp.bfloat16


def _assert_matches(got, want):
    """Bit-equal in interpret mode; compiled, equal but for rare one-step differences (see the module doc)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        if INTERPRET:
            np.testing.assert_array_equal(g, w)  # NaN == NaN here
            continue
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        assert same.mean() > 0.99, same.mean()
        np.testing.assert_allclose(g[~same], w[~same], rtol=0.13)  # one e4m3 step is at most 1/8 relative


def _gate_up(rows, half, seed=0):
    """[gate | up] rows spread over ~e^+-6 of magnitude; the first tile of h (and of its gradient) zero, a NaN."""
    kx, ks = jax.random.split(jax.random.key(seed))
    gu = jax.random.normal(kx, (rows, 2 * half)) * jnp.exp(2.0 * jax.random.normal(ks, (rows, 1)))
    gu = gu.at[: min(rows, 64), half : half + 128].set(0.0)  # up = 0: h's first tile is zero
    return gu.at[rows // 2, half - 1].set(jnp.nan).astype(BF16)  # in h's last tile


@pytest.mark.parametrize("rows, half", [(300, 256), (64, 384), (1, 256)])
def test_swiglu_fused_with_its_quantization_equals_the_unfused_path(rows, half):
    gu = _gate_up(rows, half)
    h = swiglu(gu[:, :half], gu[:, half:], BF16)
    got = act_quantize(gu, swiglu, BF16, backend="gpu", interpret=INTERPRET)
    _assert_matches(got, (h, quantize.quantize_tiles(h)))
    assert np.asarray(got[1][1])[0, 0] == 1.0  # the zero tile's scale
    assert np.isnan(np.asarray(got[1][1])[rows // 2, -1])  # the NaN's tile (its scale poisoned)
    _assert_matches(act_quantize(gu, swiglu, BF16, backend="xla"), got)  # the reference path: the same
    # keep=False (the FP8 weight gradient requantizes h's tiles): h is not written, its tiles are the same
    none, tiles = act_quantize(gu, swiglu, BF16, keep=False, backend="gpu", interpret=INTERPRET)
    assert none is None
    _assert_matches(tiles, got[1])


@pytest.mark.parametrize("rows, half", [(300, 256), (65, 128)])
def test_swiglu_backward_fused_with_its_quantization_equals_the_unfused_path(rows, half):
    gu = _gate_up(rows, half, seed=1)
    dh = jax.random.normal(jax.random.key(2), (rows, half), BF16)
    grads = jax.vjp(lambda a, b: swiglu(a, b, BF16), gu[:, :half], gu[:, half:])[1](dh)
    dgu = jnp.concatenate(grads, axis=-1)
    got = act_bwd_quantize(gu, dh, swiglu, backend="gpu", interpret=INTERPRET)
    _assert_matches(got, (dgu, quantize.quantize_tiles(dgu)))
    assert got[0].dtype == BF16 and got[1][1].shape == (rows, 2 * half // 128)
    _assert_matches(act_bwd_quantize(gu, dh, swiglu, backend="xla"), got)
    none, tiles = act_bwd_quantize(gu, dh, swiglu, keep=False, backend="gpu", interpret=INTERPRET)
    assert none is None
    _assert_matches(tiles, got[1])


def test_widths_off_the_tile_take_the_unfused_path():
    """I % 128 != 0: a scaling tile of [d gate | d up] would span both halves, so the GPU backend runs act and
    quantize_tiles (its Triton kernel) instead; the fused kernels refuse such shapes by name."""
    rows, half = 70, 96
    gu = _gate_up(rows, half)
    dh = jax.random.normal(jax.random.key(3), (rows, half), BF16)
    _assert_matches(
        act_quantize(gu, swiglu, BF16, backend="gpu", interpret=True), act_quantize(gu, swiglu, BF16, backend="xla")
    )
    _assert_matches(
        act_bwd_quantize(gu, dh, swiglu, backend="gpu", interpret=True),
        act_bwd_quantize(gu, dh, swiglu, backend="xla"),
    )
    with pytest.raises(ValueError, match="act_quantize: gu must be"):
        quantize_act.act_quantize(gu, swiglu, BF16, interpret=True)
    with pytest.raises(ValueError, match=r"act_bwd_quantize: dh must be \[R, I\]"):
        quantize_act.act_bwd_quantize(jnp.zeros((8, 256), BF16), jnp.zeros((8, 100), BF16), swiglu, interpret=True)
