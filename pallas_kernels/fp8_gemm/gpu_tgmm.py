"""FP8 grouped weight gradient in Pallas Mosaic GPU (Hopper): out[g] = a[:, rows of g] . b[:, rows of g]^T.

The expert layer's weight gradient x^T . dy contracts the tokens, and a group (expert) owns a range of them. With
DeepSeek-V3's scaling both operands are quantized along the tokens in 1 x 128 tiles, so a 128-token K step of this
kernel must hold one group's tokens only: groups start on 128-row steps (ops.align_groups lays the rows out so,
zero rows between groups), and each group's tiles are its own. Then every output tile of group g is the promoted
K loop of the forward kernel (gpu.scaled_k_loop: e4m3 wgmma per 128 tokens, scaled per row by a's tile scales and
per column by b's, added into float32 registers) over that group's steps only; an empty group stores zeros.

Operands (ops.fp8_tgmm builds them):
  a_q [K, M] e4m3 (x^T: tokens contiguous), as_t [M/128, K] float32 (a's tile scales, transposed)
  b_q [N, M] e4m3 (dy^T), bs_t [M/128, N] float32
Requires M % 128 == 0, K % block_m == 0, N % block_n == 0 (ops.py pads). One warpgroup, tiles in group order (a
group's tokens stay in L2 while all its tiles read them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm.gpu import BLOCK_K, Fp8GpuConfig, check_config, scaled_k_loop, specs_for
from pallas_kernels.grouped_matmul import gpu_common


def group_steps(group_sizes):
    """(first K step, number of K steps) of each group: its rows [start, start + size) in 128-row steps."""
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    first = starts // BLOCK_K
    return first, (starts + sizes + BLOCK_K - 1) // BLOCK_K - first


def fp8_tgmm(a_q, as_t, b_q, bs_t, group_sizes, *, config=None, interpret=False, out_dtype=jnp.float32):
    """a_q [K, M], b_q [N, M] (groups' rows start on 128-row steps) -> [G, K, N] in out_dtype."""
    cfg = config or Fp8GpuConfig()
    if cfg.warp_specialized:
        raise ValueError("fp8_tgmm's GPU kernel runs one warpgroup: warp_specialized=False")
    check_config(cfg)
    k, _ = a_q.shape
    n = b_q.shape[0]
    g = group_sizes.shape[0]
    bm, bn = cfg.block_m, cfg.block_n
    k_tiles, n_tiles = k // bm, n // bn
    first, steps = group_steps(group_sizes)

    def body(first_ref, steps_ref, a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem):
        def tile(_, lin, __):
            gi = lin // (k_tiles * n_tiles)
            kt, nt = gpu_common.tile_order(lin % (k_tiles * n_tiles), k_tiles, n_tiles, cfg.grid_tile_n)
            k0, n0 = kt * bm, nt * bn
            operands = (
                a_gmem.at[pl.ds(k0, bm), :],
                b_gmem.at[pl.ds(n0, bn), :],
                as_gmem.at[:, pl.ds(k0, bm)],
                bs_gmem.at[:, pl.ds(n0, bn)],
            )
            total = scaled_k_loop(cfg, specs_for(bm, bn, first_ref[gi]), steps_ref[gi], operands, interpret)

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), out_dtype))
            def _(out_smem):
                out_smem[...] = total.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[gi].at[pl.ds(k0, bm), pl.ds(n0, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        gpu_common.persistent_loop(g * k_tiles * n_tiles, tile)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((g, k, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(first, steps, a_q, as_t, b_q, bs_t)
