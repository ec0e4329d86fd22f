"""tgmm (grouped matmul weight gradient) in Pallas Mosaic GPU, for Hopper.

out[g] = lhs[rows of g].T @ dout[rows of g], [M, K] x [M, N] -> [G, K, N]. Persistent tiles
(group, K tile, N tile); by default warp-specialized like gpu.gmm (one TMA warpgroup, two wgmma
warpgroups each owning block_n of the tile's columns). The group's rows are reduced in chunks of
block_k rows aligned to multiples of block_k (so TMA row offsets are provably aligned and never leave
the array); the first and last chunk may hold rows of other groups: those rows are zeroed in shared
memory with a select (so NaN/Inf there cannot leak) before the wgmma. Empty groups run no chunks and
store zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import gpu_common
from pallas_kernels.grouped_matmul.gpu import TGMM_CONFIG


def tgmm(lhs, dout, group_sizes, *, config=None, interpret=False, out_dtype=None):
    """lhs [M, K], dout [M, N] -> [G, K, N]; out[g] = lhs[rows of g].T @ dout[rows of g].

    Requires block_k % 64 == 0 (row masks use the wgmma register layout); M % block_k == 0,
    K % block_m == 0, N % (num_wgs*block_n) == 0 (ops.py pads).
    """
    cfg = config or TGMM_CONFIG
    gpu_common.check_config(cfg, out_dtype or lhs.dtype)
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    out_dtype = out_dtype or lhs.dtype
    nw = gpu_common.num_wgs(cfg)
    bm, bn, bc = cfg.block_m, cfg.block_n, cfg.block_k
    if bc % 64:
        raise ValueError(f"tgmm needs block_k % 64 == 0, got {bc}")
    cta_n = nw * bn
    k_tiles, n_tiles = k // bm, n // cta_n
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)

    tf = gpu_common.transforms(min(bm, bn), lhs.dtype)  # one swizzle for both wgmma operands

    def specs(c0, delay_release=0):
        # Chunk j of a group reads rows (c0 + j) * block_k ..: chunk-aligned, so never out of bounds.
        return [
            plgpu.BlockSpec((bc, bm), lambda j: (c0 + j, 0), delay_release=delay_release, transforms=tf),
            plgpu.BlockSpec((bc, cta_n), lambda j: (c0 + j, 0), delay_release=delay_release, transforms=tf),
        ]

    def tile_info(start_ref, end_ref, lin):
        gi = lax.div(lin, k_tiles * n_tiles)
        kt, nt = gpu_common.tile_order(lax.rem(lin, k_tiles * n_tiles), k_tiles, n_tiles, cfg.grid_tile_n)
        start, end = start_ref[gi], end_ref[gi]
        c0 = lax.div(start, bc)
        steps = jnp.where(end > start, lax.div(end + bc - 1, bc) - c0, 0)
        return gi, kt * bm, nt * cta_n, start, end, c0, steps

    def views(lhs_gmem, dout_gmem, k0, n0):
        return lhs_gmem.at[:, pl.ds(k0, bm)], dout_gmem.at[:, pl.ds(n0, cta_n)]

    epi_m = min(cfg.epi_m, bm)
    # layout_cast has no CPU rule, so interpret mode (which runs the body as CPU ops) leaves it out.
    iota_layout = None if interpret else plgpu.Layout.WGMMA

    def masked(a_smem, b_smem, start, end, c0, j):
        """Zero rows of the chunk outside [start, end) when the chunk straddles a boundary."""
        base = (c0 + j) * bc
        lo, hi = start - base, end - base

        @pl.when((lo > 0) | (hi < bc))
        def _():
            for ref in (a_smem, b_smem):
                val = ref[...]
                rid = plgpu.broadcasted_iota(jnp.int32, val.shape, 0, layout=iota_layout)
                ref[...] = jnp.where((rid >= lo) & (rid < hi), val, jnp.zeros_like(val))
            plgpu.commit_smem()

    def body_ws(start_ref, end_ref, lhs_gmem, dout_gmem, out_gmem):
        mcs = cfg.max_concurrent_steps
        allocs = gpu_common.pipeline(
            cfg,
            gpu_common.ignore,
            gpu_common.ignore,
            mcs,
            specs(0),
            mcs,
        ).get_allocations(*views(lhs_gmem, dout_gmem, 0, 0))

        def scoped(allocs, wg, t_wg, out_smem):
            def tile(_, lin, __):
                gi, k0, n0, start, end, c0, steps = tile_info(start_ref, end_ref, lin)

                def store_chunk(r0):
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg], out_gmem.at[gi, pl.ds(k0 + r0, epi_m), pl.ds(n0 + wg * bn, bn)]
                    )

                def ctx(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, bn), jnp.float32))
                    def _(acc_ref):
                        eval_pipeline(acc_ref)
                        gpu_common.epilogue(acc_ref[...], out_smem.at[wg], store_chunk)

                def mma(idx, a_smem, b_smem, acc_ref):
                    b_half = b_smem.at[:, pl.ds(wg * bn, bn)]
                    # Both warpgroups mask the shared lhs chunk; the writes are identical, so benign.
                    masked(a_smem, b_half, start, end, c0, idx[0])
                    plgpu.wgmma(acc_ref, gpu_common.transposed(a_smem, t_wg), b_half)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                gpu_common.pipeline(cfg, mma, ctx, steps, specs(c0), mcs)(
                    *views(lhs_gmem, dout_gmem, k0, n0), allocations=allocs
                )

            gpu_common.persistent_loop(g * k_tiles * n_tiles, tile)

        gpu_common.ws_scope(
            allocs, gpu_common.scratch(interpret, (2, bm, bc), lhs.dtype), plgpu.SMEM((2, epi_m, bn), out_dtype), scoped
        )

        plgpu.wait_smem_to_gmem(0)

    def body_simple(start_ref, end_ref, lhs_gmem, dout_gmem, out_gmem):
        def tile(_, lin, __):
            gi, k0, n0, start, end, c0, steps = tile_info(start_ref, end_ref, lin)

            def acc_scope(acc_ref, t_smem):
                def step(idx, a_smem, b_smem):
                    masked(a_smem, b_smem, start, end, c0, idx[0])
                    plgpu.wgmma(acc_ref, gpu_common.transposed(a_smem, t_smem), b_smem)

                plgpu.emit_pipeline(
                    step,
                    grid=(steps,),
                    in_specs=specs(c0, delay_release=1),
                    max_concurrent_steps=max(cfg.max_concurrent_steps, 2),
                )(*views(lhs_gmem, dout_gmem, k0, n0))
                return acc_ref[...]

            t_shape = gpu_common.scratch(interpret, (bm, bc), lhs.dtype)
            acc = gpu_common.acc_with_scratch(acc_scope, (bm, bn), t_shape)

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), out_dtype))
            def _(out_smem):
                out_smem[...] = acc.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[gi, pl.ds(k0, bm), pl.ds(n0, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        gpu_common.persistent_loop(g * k_tiles * n_tiles, tile)
        plgpu.wait_smem_to_gmem(0)

    body = body_ws if cfg.warp_specialized else body_simple
    out_type = jax.ShapeDtypeStruct((g, k, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(starts, ends, lhs, dout)
