"""FP8 training GEMMs with DeepSeek-V3's recipe (its report, section 3.3), behind ModelConfig.fp8 = "e4m3".

All three GEMMs of a linear layer or an expert layer take e4m3 operands with fine-grained scales
(pallas_kernels/fp8_gemm): forward x . W (x in 1 x 128 tiles along K, W in 128 x 128 blocks), the activation
gradient dy . W^T (dy in tiles along N, W's blocks, which are the same blocks transposed) and the weight gradient
x^T . dy (both in 1 x 128 tiles along the rows they contract; for the experts, each expert's tokens on tiles of
their own, as ops.align_groups lays them out). Products accumulate in float32; outputs and the
activation gradient come back in the compute dtype, the weight gradient in the weight's dtype. Everything else
(embedding, output head, router, norms, attention core, MTP's eh_proj) stays in the compute dtype or float32.

The residuals are the input's weight-gradient operand (x^T quantized along the tokens, for the experts on
align_groups' layout), quantized in the forward from the same read of x as the forward's own operand, and the
forward's quantized weight, whose transposed blocks are the dgrad's operand; the backward reads the output gradient
once for both of its operands. With fp8_backend "gpu" every quantization is one Pallas Triton pass
(quantize_gpu.py) and every GEMM a Mosaic GPU kernel; on the H200 small's FP8 step runs 1.10x slower than BF16
(298 vs 272 ms, experiments/BENCHMARKS.md): at K = 512-2048 FP8 wgmma gains too little over bf16 to pay for the
quantization passes. ModelConfig.fp8_backend "auto" still resolves to the XLA reference (dsjax.runtime): the
numerics of FP8 training without its speed.
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
    fp8_wgrad,
    quantize_blocks,
    quantize_both,
    transposed_blocks,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_dot(x: jax.Array, w: jax.Array, backend: str = "auto") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x.dtype, every GEMM in e4m3 (pallas_kernels.fp8_gemm `backend`)."""
    return _fp8_dot_fwd(x, w, backend)[0]


def _fp8_dot_fwd(x, w, backend):
    k, n = w.shape
    # x's weight-gradient operand (x^T, tiles along the tokens) is quantized here, from the same read of x, and kept
    # instead of x: an e4m3 residual half x's size, and no second pass over x in the backward
    (xq, xs), x_t = quantize_both(x.reshape(-1, k), backend=backend)
    wq, ws = quantize_blocks(w, backend=backend)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend).reshape(*x.shape[:-1], n)
    return y, (x_t, wq, ws, _dtype_of(x), _dtype_of(w))


def _fp8_dot_bwd(backend, res, dy):
    (aq, a_s), wq, ws, like_x, like_w = res  # aq [K, M]: x^T in tiles along the contracted rows
    n, k = wq.shape
    (dq, ds), (bq, bs) = quantize_both(dy.reshape(-1, n), backend=backend)  # dgrad's dy, wgrad's dy^T [N, M]
    dx = fp8_gemm(dq, ds, *transposed_blocks(wq, ws), out_dtype=like_x.dtype, backend=backend)
    dw = fp8_wgrad(aq, a_s, bq, bs, backend=backend)
    return dx.reshape(*dy.shape[:-1], k), dw.astype(like_w.dtype)


def _dtype_of(x):
    return jnp.zeros((0,), x.dtype)  # an empty array carries a dtype through the residuals


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_grouped_matmul(rows: jax.Array, w: jax.Array, sizes: jax.Array, backend: str = "auto") -> jax.Array:
    """Expert-sorted rows [M, K] x w [G, K, N] -> [M, N] in rows.dtype (rows past sum(sizes): zero), in e4m3.
    With `backend` bound, the signature of dsjax.layers.moe_ops' grouped matmuls."""
    return _fp8_gmm_fwd(rows, w, sizes, backend)[0]


def _fp8_gmm_fwd(rows, w, sizes, backend):
    # the weight gradient takes each expert's tokens on their own 128-token scaling tiles (zero rows between
    # experts, align_groups' layout); that operand comes from the forward's read of the rows, as in _fp8_dot_fwd
    index, aligned = align_groups(sizes, rows.shape[0])
    (xq, xs), rows_t = quantize_both(rows, index, backend=backend)
    wq, ws = quantize_blocks(w, backend=backend)
    out = fp8_gmm(xq, xs, wq, ws, sizes, out_dtype=rows.dtype, backend=backend)
    return out, (rows_t, wq, ws, _dtype_of(rows), _dtype_of(w), sizes, index, aligned)


def _fp8_gmm_bwd(backend, res, dy):
    (aq, a_s), wq, ws, like_rows, like_w, sizes, index, aligned = res
    (dq, ds), (bq, bs) = quantize_both(dy, index, backend=backend)
    drows = fp8_gmm(dq, ds, *transposed_blocks(wq, ws), sizes, out_dtype=like_rows.dtype, backend=backend)
    dw = fp8_tgmm(aq, a_s, bq, bs, aligned, out_dtype=jnp.float32, backend=backend)
    return drows, dw.astype(like_w.dtype), None


fp8_grouped_matmul.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)
