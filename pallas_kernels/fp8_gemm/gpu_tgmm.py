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
Requires M % 128 == 0, K % block_m == 0, N % block_n == 0 (ops.py pads). Tiles in group order (a group's tokens
stay in L2 while all its tiles read them). The default (TGMM_CONFIG) is warp-specialized: a memory warpgroup and
2 compute warpgroups sharing each tile's b rows, each tile's pipeline filled and drained on its own since a group's
step count is dynamic (on the H200 1.26x our bf16 tgmm at small's expert shapes); warp_specialized=False runs one
warpgroup (0.6x bf16 on V3's gate+up shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm.gpu import promoted_step, scaled_k_loop, specs_for, zero_sum
from pallas_kernels.fp8_gemm.gpu_config import BLOCK_K, Fp8GpuConfig, check_config, ws_stages
from pallas_kernels.grouped_matmul import gpu_common

# The grouped weight gradient's default: warp-specialized, two compute warpgroups on 128-row tiles; at small's expert
# shapes on the H200 1.4-1.75x the one-warpgroup kernel and 1.26x our bf16 tgmm (BENCHMARKS.md, 2026-12-04 third
# session; three warpgroups on 192 rows were slower there). The dataclass's defaults stay one-warpgroup.
TGMM_CONFIG = Fp8GpuConfig(block_m=128, warp_specialized=True)


def group_steps(group_sizes):
    """(first K step, number of K steps) of each group: its rows [start, start + size) in 128-row steps."""
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    first = starts // BLOCK_K
    return first, (starts + sizes + BLOCK_K - 1) // BLOCK_K - first


def fp8_tgmm(a_q, as_t, b_q, bs_t, group_sizes, *, config=None, interpret=False, out_dtype=jnp.float32):
    """a_q [K, M], b_q [N, M] (groups' rows start on 128-row steps) -> [G, K, N] in out_dtype."""
    cfg = config or TGMM_CONFIG
    check_config(cfg)
    if cfg.cluster_n != 1:
        raise ValueError(f"fp8_tgmm's GPU kernel runs one CTA per cluster: cluster_n=1, got {cfg.cluster_n}")
    if cfg.skip_idle_wgs:  # its tiles are a group's K x N, whole: no warpgroup is ever idle
        raise ValueError("fp8_tgmm's GPU kernel has no idle warpgroups to skip: skip_idle_wgs is fp8_gmm's only")
    if cfg.warp_specialized:
        return _fp8_tgmm_ws(a_q, as_t, b_q, bs_t, group_sizes, cfg, interpret, out_dtype)
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


def _fp8_tgmm_ws(a_q, as_t, b_q, bs_t, group_sizes, cfg, interpret, out_dtype):
    """Warp-specialized fp8_tgmm: a memory warpgroup streams each tile's 128-token steps, compute warpgroup w of nw
    owns rows [w * block_m / nw, (w + 1) * block_m / nw) of the tile (rows of K), all sharing its b tile. A group's
    step count is dynamic, so each tile fills and drains its own pipeline (no chaining)."""
    k, _ = a_q.shape
    n = b_q.shape[0]
    g = group_sizes.shape[0]
    bm, bn = cfg.block_m, cfg.block_n
    nw = gpu_common.num_wgs(cfg)
    rows = bm // nw
    k_tiles, n_tiles = k // bm, n // bn
    mcs = ws_stages(cfg, out_dtype)
    first, steps = group_steps(group_sizes)

    def views(a_gmem, as_gmem, b_gmem, bs_gmem, k0, n0):
        return (
            a_gmem.at[pl.ds(k0, bm), :],
            b_gmem.at[pl.ds(n0, bn), :],
            as_gmem.at[:, pl.ds(k0, bm)],
            bs_gmem.at[:, pl.ds(n0, bn)],
        )

    def body(first_ref, steps_ref, a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem):
        gmem = (a_gmem, as_gmem, b_gmem, bs_gmem)
        allocs = gpu_common.pipeline(
            cfg, gpu_common.ignore, gpu_common.ignore, mcs, specs_for(bm, bn, delay_release=0), mcs
        ).get_allocations(*views(*gmem, 0, 0))

        def scoped(allocs, wg, t_wg, out_smem):
            def mma(_, a_smem, b_smem, as_smem, bs_smem, carry):
                mine = pl.ds(wg * rows, rows)
                a, a_s = a_smem.at[mine], as_smem.at[0, mine]
                return promoted_step(cfg, a, b_smem, a_s, bs_smem.at[0], carry, t_wg, (rows, bn), interpret)

            def tile(_, lin, __):
                gi = lin // (k_tiles * n_tiles)
                kt, nt = gpu_common.tile_order(lin % (k_tiles * n_tiles), k_tiles, n_tiles, cfg.grid_tile_n)
                k0, n0 = kt * bm, nt * bn

                def ctx(eval_pipeline):
                    total = eval_pipeline(zero_sum((rows, bn), interpret))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has left out_smem
                    out_smem.at[wg][...] = total.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg], out_gmem.at[gi].at[pl.ds(k0 + wg * rows, rows), pl.ds(n0, bn)]
                    )

                specs = specs_for(bm, bn, first_ref[gi], delay_release=0)
                gpu_common.pipeline(cfg, mma, ctx, steps_ref[gi], specs, mcs)(*views(*gmem, k0, n0), allocations=allocs)

            gpu_common.persistent_loop(g * k_tiles * n_tiles, tile)

        t_shape = gpu_common.scratch(interpret, (nw, BLOCK_K, bn), b_q.dtype)
        gpu_common.ws_scope(allocs, t_shape, plgpu.SMEM((nw, rows, bn), out_dtype), scoped)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((g, k, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(first, steps, a_q, as_t, b_q, bs_t)
