"""XLA reference for the FP8 GEMMs: dequantize, then a float32 product. The "xla" backend, the "tpu" backend for
now (no Mosaic TPU FP8 kernel yet; TPUs before v7 have no FP8 matrix unit to target), and the tests' oracle."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm.quantize import dequantize_blocks, dequantize_tiles
from pallas_kernels.grouped_matmul import reference as gmm_reference


def fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, *, out_dtype=jnp.bfloat16):
    """[M, K] x [G, N, K] (K-major) -> [M, N]; rows past sum(group_sizes) are zero."""
    x = dequantize_tiles(x_q, x_s)
    w = dequantize_blocks(w_q, w_s)
    return gmm_reference.gmm(x, w, group_sizes, transpose_rhs=True, out_dtype=out_dtype)


def fp8_gemm(x_q, x_s, w_q, w_s, *, out_dtype=jnp.bfloat16, rhs_tiles=False):
    """[M, K] x [N, K] (K-major) -> [M, N]; rhs_tiles: w_s holds 1 x 128 tile scales [N, ceil(K / 128)] (a
    gradient operand) instead of 128 x 128 block scales."""
    x = dequantize_tiles(x_q, x_s)
    w = dequantize_tiles(w_q, w_s) if rhs_tiles else dequantize_blocks(w_q, w_s)
    out = lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


def fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, *, out_dtype=jnp.float32):
    """The grouped weight gradient from operands quantized along the rows they contract: a [K, M] and b [N, M],
    each with 1 x 128 tile scales along M (rows sorted by group) -> [G, K, N], out[g] = a[:, rows_g] @ b[:, rows_g].T.
    Rows past sum(group_sizes) contribute nothing."""
    a = dequantize_tiles(a_q, a_s).T
    b = dequantize_tiles(b_q, b_s).T
    return gmm_reference.tgmm(a, b, group_sizes, out_dtype=out_dtype)
