"""FP8 training GEMMs with DeepSeek-V3's recipe (its report, section 3.3), behind ModelConfig.fp8 = "e4m3".

All three GEMMs of a linear layer or an expert layer take e4m3 operands with fine-grained scales
(pallas_kernels/fp8_gemm): forward x . W (x in 1 x 128 tiles along K, W in 128 x 128 blocks), the activation
gradient dy . W^T (dy in tiles along N, W's blocks, which are the same blocks transposed) and the weight gradient
x^T . dy (both in 1 x 128 tiles along the rows they contract; for the experts, each expert's tokens on tiles of
their own, as ops.align_groups lays them out). Products accumulate in float32; outputs and the
activation gradient come back in the compute dtype, the weight gradient in the weight's dtype. Everything else
(embedding, output head, router, norms, attention core, MTP's eh_proj) stays in the compute dtype or float32.

The residuals are the compute-dtype input and the forward's quantized weight, whose transposed blocks are the
dgrad's operand; the backward quantizes the activations afresh along the token axis (fused quantize + transpose
kernels are still to come). ModelConfig.fp8_backend "auto" still resolves to the XLA reference (dsjax.runtime): the
numerics of FP8 training without its speed; "gpu" runs the Mosaic GPU kernels (1.4-1.6x bf16 at DeepSeek-V3's
shapes on the H200, no faster at small's K = 1024; an FP8 train step on them is yet to be run on a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm import (
    align_groups,
    fp8_gemm,
    fp8_gmm,
    fp8_tgmm,
    quantize_blocks,
    quantize_tiles,
    take_aligned,
    transposed_blocks,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_dot(x: jax.Array, w: jax.Array, backend: str = "auto") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x.dtype, every GEMM in e4m3 (pallas_kernels.fp8_gemm `backend`)."""
    return _fp8_dot_fwd(x, w, backend)[0]


def _fp8_dot_fwd(x, w, backend):
    k, n = w.shape
    xq, xs = quantize_tiles(x.reshape(-1, k))
    wq, ws = quantize_blocks(w)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend).reshape(*x.shape[:-1], n)
    return y, (x, wq, ws, _dtype_of(w))


def _fp8_dot_bwd(backend, res, dy):
    x, wq, ws, like_w = res
    n, k = wq.shape
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    dq, ds = quantize_tiles(dy2)
    dx = fp8_gemm(dq, ds, *transposed_blocks(wq, ws), out_dtype=x.dtype, backend=backend).reshape(x.shape)
    aq, a_s = quantize_tiles(x2.T)  # [K, M]: tiles along the contracted rows
    bq, bs = quantize_tiles(dy2.T)  # [N, M]
    dw = fp8_gemm(aq, a_s, bq, bs, out_dtype=jnp.float32, rhs_tiles=True, backend=backend)
    return dx, dw.astype(like_w.dtype)


def _dtype_of(x):
    return jnp.zeros((0,), x.dtype)  # an empty array carries a dtype through the residuals


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_matmul(rows: jax.Array, w: jax.Array, sizes: jax.Array, backend: str = "auto") -> jax.Array:
    """Expert-sorted rows [M, K] x w [G, K, N] -> [M, N] in rows.dtype (rows past sum(sizes): zero), in e4m3.
    With `backend` bound, the signature of dsjax.layers.moe_ops' grouped matmuls."""
    return _fp8_gmm_fwd(rows, w, sizes, backend)[0]


def _fp8_gmm_fwd(rows, w, sizes, backend):
    xq, xs = quantize_tiles(rows)
    wq, ws = quantize_blocks(w)
    return fp8_gmm(xq, xs, wq, ws, sizes, out_dtype=rows.dtype, backend=backend), (rows, wq, ws, _dtype_of(w), sizes)


def _fp8_gmm_bwd(backend, res, dy):
    rows, wq, ws, like_w, sizes = res
    dq, ds = quantize_tiles(dy)
    drows = fp8_gmm(dq, ds, *transposed_blocks(wq, ws), sizes, out_dtype=rows.dtype, backend=backend)
    # weight gradient: each expert's tokens on their own 128-token scaling tiles (zero rows between experts)
    index, aligned = align_groups(sizes, rows.shape[0])
    aq, a_s = quantize_tiles(take_aligned(rows, index).T)
    bq, bs = quantize_tiles(take_aligned(dy, index).T)
    dw = fp8_tgmm(aq, a_s, bq, bs, aligned, out_dtype=jnp.float32, backend=backend)
    return drows, dw.astype(like_w.dtype), None


fp8_grouped_matmul.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)
