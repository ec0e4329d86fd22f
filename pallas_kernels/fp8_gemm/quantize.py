"""DeepSeek-V3's fine-grained FP8 scaling (the V3 report, section 3.3), as jittable JAX.

    x_q, x_s = quantize_tiles(x)   # activations [M, K]: one scale per 1 x 128 tile along K
    w_q, w_s = quantize_blocks(w)  # weights [..., K, N] (Flax [in, out]): one scale per 128 x 128 block,
                                   # stored K-major [..., N, K] (the released checkpoints' [out, in] layout)

A scale is the tile's (block's) largest magnitude / 448, so that entry lands on e4m3's largest finite value; x is
x_q * scale, with x_q = x * (448 / amax) (DeepGEMM's formula: one division per tile, not per element). An all-zero
tile gets scale 1 (any positive scale stores zeros exactly). Non-finite inputs are not
screened: they poison their tile, which the training loop's non-finite guard then catches. Ragged edges (K or N
not a multiple of 128) are zero-padded for the reduction only; outputs keep the input's shape.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
INV_E4M3_MAX = np.float32(1.0 / E4M3_MAX)  # a scale is amax * this (see _scale)
TILE = 128  # tile length along K for activations, block edge for weights
# Smallest amax a scale is taken from: 448 / amax stays finite (a tile of values under it is stored as if its
# largest were 1e-30, i.e. as zeros and subnormals; such values are noise in any product).
AMAX_FLOOR = 1e-30


def tiles(n: int) -> int:
    """Scales along an axis of n elements: ceil(n / 128)."""
    return -(-n // TILE)


def _pad_axis(x, axis: int):
    pad = tiles(x.shape[axis]) * TILE - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _amax(t, axis):
    """max |t| over axis, NaN where a NaN is among them: XLA's CPU max may drop a NaN (fast min/max, by operand
    order) where its GPU max keeps it, so the poisoning is made explicit, the same on every platform."""
    return jnp.where(jnp.any(jnp.isnan(t), axis=axis), jnp.nan, jnp.max(jnp.abs(t), axis=axis))


def _scale(amax):
    """(scale, its reciprocal's multiplier 448 / amax). The values are multiplied by 448 / amax, as DeepGEMM's
    reference quantizers do: one division per tile, not per element. An all-zero tile gets scale 1 (multiplier 1,
    which keeps its zeros); a NaN / inf amax poisons both."""
    zero = amax == 0
    amax = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR)  # NaN stays NaN through the max
    # amax * (1 / 448), not amax / 448: XLA rewrites a division by a constant that way, so spelling it out keeps
    # every implementation (XLA's, quantize_gpu.py's kernels, the converter's) on the same rounding
    return jnp.where(zero, 1.0, amax * INV_E4M3_MAX), jnp.where(zero, 1.0, E4M3_MAX / amax)


def _to_e4m3(x):
    # x * (448 / amax) can pass 448 by a rounding error at the tile maximum; the cast would round that to 448 anyway
    # (e4m3fn turns NaN only from 464 up; quantize_gpu.to_e4m3 relies on it), and the clip states the bound here,
    # in the reference. NaN stays NaN through the clip.
    # The barrier keeps the codes: where a consumer dequantizes them in the same fusion (the XLA reference GEMMs),
    # XLA on GPUs folds convert(convert(x, e4m3), f32) into x under its excess-precision rule, and the quantization
    # silently disappears (seen in the compiled HLO of a layer's FP8 step for an H100: no activation was rounded).
    return lax.optimization_barrier(jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3))


def quantize_tiles(x):
    """x [M, K] -> (x_q float8_e4m3fn [M, K], x_s float32 [M, ceil(K / 128)])."""
    m, k = x.shape
    t = _pad_axis(x.astype(jnp.float32), 1).reshape(m, tiles(k), TILE)
    s, inv = _scale(_amax(t, -1))
    q = _to_e4m3(t * inv[..., None]).reshape(m, -1)[:, :k]
    return q, s


def quantize_blocks(w):
    """w [..., K, N] -> (w_q float8_e4m3fn [..., N, K], w_s float32 [..., ceil(N / 128), ceil(K / 128)]).

    Transposes while it quantizes (one pass from the float32 master weights): FP8 wgmma takes both operands
    K-major, which is also the released checkpoints' [out, in] + weight_scale_inv layout."""
    *lead, k, n = w.shape
    wt = jnp.swapaxes(w.astype(jnp.float32), -1, -2)
    b = _pad_axis(_pad_axis(wt, -1), -2).reshape(*lead, tiles(n), TILE, tiles(k), TILE)
    s, inv = _scale(_amax(b, (-3, -1)))
    q = _to_e4m3(b * inv[..., :, None, :, None]).reshape(*lead, tiles(n) * TILE, tiles(k) * TILE)
    return q[..., :n, :k], s


def transposed_blocks(wq, ws):
    """The block-quantized W^T from W's (wq [..., N, K], ws [..., N/128, K/128]): a 128 x 128 block of W^T is a
    block of W transposed, with the same amax, so these are exactly quantize_blocks(W^T) (the dgrad's rhs,
    contracting N) without reading the float32 master weights again."""
    return jnp.swapaxes(wq, -1, -2), jnp.swapaxes(ws, -1, -2)


def dequantize_tiles(x_q, x_s):
    """(x_q [M, K], x_s [M, ceil(K / 128)]) -> float32 [M, K]."""
    k = x_q.shape[-1]
    return x_q.astype(jnp.float32) * jnp.repeat(x_s, TILE, axis=-1)[..., :k]


def dequantize_blocks(w_q, w_s):
    """(w_q [..., N, K], w_s [..., ceil(N / 128), ceil(K / 128)]) -> float32 [..., N, K] (K-major, as stored)."""
    n, k = w_q.shape[-2:]
    s = jnp.repeat(jnp.repeat(w_s, TILE, axis=-2)[..., :n, :], TILE, axis=-1)[..., :k]
    return w_q.astype(jnp.float32) * s
