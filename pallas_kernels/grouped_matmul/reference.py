"""XLA reference for grouped matmul: the "xla" backend and the oracle the kernels are tested against.

Rows are sorted by group: group g owns rows [sum(gs[:g]), sum(gs[:g+1])). Rows past sum(gs) are zero in
gmm's output and ignored by tgmm. Accumulation is float32 (preferred_element_type); float32 inputs use
Precision.HIGHEST so GPUs do not silently drop to tf32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None):
    """lhs [M, K] x rhs [G, K, N] -> [M, N]; with transpose_rhs, rhs is [G, N, K]."""
    out_dtype = out_dtype or lhs.dtype
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2 if transpose_rhs else 1,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )
    out = lax.ragged_dot_general(
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        dims,
        precision=_precision(lhs.dtype),
        preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, *, out_dtype=None):
    """lhs [M, K], dout [M, N] -> [G, K, N] with out[g] = lhs[rows_g].T @ dout[rows_g]."""
    out_dtype = out_dtype or lhs.dtype
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    out = lax.ragged_dot_general(
        lhs,
        dout,
        group_sizes.astype(jnp.int32),
        dims,
        precision=_precision(lhs.dtype),
        preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


def group_of(ends, rows):
    """searchsorted(ends, rows, side="right"): for each row (or tile) index, how many groups end at or before it
    (ends: the groups' cumulative ends). As one fused [rows, G] comparison: jnp's default binary search is a while
    loop of log2(G) dependent passes, which XLA unrolls into two small kernels each (a train step of `small`:
    665 such kernels, experiments/BENCHMARKS.md, thirteenth FP8 session); G is tens to hundreds here."""
    return jnp.searchsorted(ends, rows, side="right", method="compare_all")


def group_ids(group_sizes, m):
    """Group of each row, G for rows past sum(group_sizes). Used by the mask-based oracles."""
    return group_of(jnp.cumsum(group_sizes.astype(jnp.int32)), jnp.arange(m, dtype=jnp.int32))


def gmm_dense(lhs, rhs, group_sizes):
    """Independent float32 oracle (dense per-group products + row masks); for tests only."""
    g = rhs.shape[0]
    gid = group_ids(group_sizes, lhs.shape[0])
    x = jnp.where((gid < g)[:, None], lhs.astype(jnp.float32), 0.0)  # NaN-safe row drop
    per_group = jnp.einsum("mk,gkn->gmn", x, rhs.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    mask = (gid[None, :] == jnp.arange(g)[:, None]).astype(jnp.float32)
    return jnp.einsum("gm,gmn->mn", mask, per_group, precision=lax.Precision.HIGHEST)


def tgmm_dense(lhs, dout, group_sizes):
    """Independent float32 oracle for tgmm; for tests only."""
    g = group_sizes.shape[0]
    gid = group_ids(group_sizes, lhs.shape[0])
    mask = (gid[None, :] == jnp.arange(g)[:, None]).astype(jnp.float32)
    keep = (gid < g)[:, None]
    x = jnp.where(keep, lhs.astype(jnp.float32), 0.0)
    y = jnp.where(keep, dout.astype(jnp.float32), 0.0)
    return jnp.einsum("gm,mk,mn->gkn", mask, x, y, precision=lax.Precision.HIGHEST)
