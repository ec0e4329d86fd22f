"""Pieces the GPU and TPU kernels share: constants, the split-KV partition, row padding, the split combine.

Split-KV: a sequence's KV blocks [0, nblk) are cut into `num_splits` contiguous ranges of
ceil(nblk / num_splits) blocks; each (sequence, split) writes a partial output normalised by its own
softmax denominator plus that split's log-sum-exp, and `combine` merges them. Splits past the end of a
short sequence are empty and write out = 0, lse = -inf, which the combine weighs by exp(-inf) = 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Value / output width: the first V_DIM columns of a cache row (DeepSeek-V3's 512-wide latent c_kv) are the
# values; the rest (64 rope columns) only enter the scores.
V_DIM = 512
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Finite start for the running row max: a row that sees nothing keeps it, so exp2(m_old - m_new)
# stays exp2(0) = 1 and exp2(-inf - m) = 0 instead of the NaN that -inf - -inf would give.
M_INIT = -1e30


def cdiv(a, b):
    return -(-a // b)


def round_up(x, m):
    return cdiv(x, m) * m


def block_range(length, split, num_splits, block_kv, max_blocks):
    """(first block, number of blocks) of `split` for a sequence of `length` tokens; traced ints."""
    nblk = jnp.minimum(lax.div(jnp.maximum(length, 0) + block_kv - 1, block_kv), max_blocks)
    per = lax.div(nblk + num_splits - 1, num_splits)
    start = split * per
    return start, jnp.maximum(jnp.minimum(nblk, start + per) - start, 0)


def full_blocks(length, s_q, block_kv):
    """Blocks that every query of the sequence sees whole (the first query sees < length - s_q + 1),
    so they need no mask."""
    return lax.div(jnp.maximum(length - s_q + 1, 0), block_kv)


def auto_splits(work_items, num_cores, max_blocks, min_blocks_per_split=4, max_splits=64):
    """Enough splits that `work_items` CTAs (or TPU grid rows) cover the cores about once, with each
    split still holding `min_blocks_per_split` blocks of the static cache capacity."""
    if work_items >= num_cores:
        return 1
    want = num_cores // work_items
    return int(max(1, min(want, max_splits, max_blocks // min_blocks_per_split)))


def pad_rows(q2, rows_p):
    """[B, rows, D] -> [B, rows_p, D] with zero rows (their outputs are sliced off)."""
    rows = q2.shape[1]
    return q2 if rows_p == rows else jnp.pad(q2, ((0, 0), (0, rows_p - rows), (0, 0)))


def combine(o_parts, lse_parts, out_dtype):
    """o_parts [B, S, R, Dv] float32, each normalised within its split; lse_parts [B, S, R] float32
    -> (out [B, R, Dv] out_dtype, lse [B, R] float32). All-empty rows give out = 0, lse = -inf."""
    lse_max = jnp.max(lse_parts, axis=1, keepdims=True)
    safe_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp(lse_parts - safe_max)  # [B, S, R]; empty splits weigh 0
    total = jnp.sum(w, axis=1)
    # Elementwise, not einsum: an f32 dot may run at TF32 precision on GPUs.
    out = jnp.sum(w[..., None] * o_parts, axis=1) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + safe_max[:, 0], -jnp.inf)
    return out.astype(out_dtype), lse
