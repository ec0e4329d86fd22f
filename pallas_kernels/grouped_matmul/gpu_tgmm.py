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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.grouped_matmul import gpu_common
from pallas_kernels.grouped_matmul.gpu import TGMM_CONFIG, GpuConfig


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One tgmm call's static shapes, shared by its kernel bodies."""

    cfg: GpuConfig
    out_dtype: jnp.dtype
    lhs_dtype: jnp.dtype
    interpret: bool
    groups: int
    k_tiles: int
    n_tiles: int

    @property
    def cta_n(self):
        return gpu_common.num_wgs(self.cfg) * self.cfg.block_n

    def specs(self, c0, delay_release=0):
        # Chunk j of a group reads rows (c0 + j) * block_k ..: chunk-aligned, so never out of bounds.
        cfg = self.cfg
        tf = gpu_common.transforms(min(cfg.block_m, cfg.block_n), self.lhs_dtype)  # one swizzle for both operands
        return [
            plgpu.BlockSpec(
                (cfg.block_k, cfg.block_m), lambda j: (c0 + j, 0), delay_release=delay_release, transforms=tf
            ),
            plgpu.BlockSpec(
                (cfg.block_k, self.cta_n), lambda j: (c0 + j, 0), delay_release=delay_release, transforms=tf
            ),
        ]

    def tile_info(self, start_ref, end_ref, lin):
        cfg, bc = self.cfg, self.cfg.block_k
        gi = lax.div(lin, self.k_tiles * self.n_tiles)
        kt, nt = gpu_common.tile_order(
            lax.rem(lin, self.k_tiles * self.n_tiles), self.k_tiles, self.n_tiles, cfg.grid_tile_n
        )
        start, end = start_ref[gi], end_ref[gi]
        c0 = lax.div(start, bc)
        steps = jnp.where(end > start, lax.div(end + bc - 1, bc) - c0, 0)
        return gi, kt * cfg.block_m, nt * self.cta_n, start, end, c0, steps

    def views(self, lhs_gmem, dout_gmem, k0, n0):
        return lhs_gmem.at[:, pl.ds(k0, self.cfg.block_m)], dout_gmem.at[:, pl.ds(n0, self.cta_n)]

    def masked(self, a_smem, b_smem, start, end, c0, j):
        """Zero rows of the chunk outside [start, end) when the chunk straddles a boundary."""
        bc = self.cfg.block_k
        base = (c0 + j) * bc
        lo, hi = start - base, end - base
        # layout_cast has no CPU rule, so interpret mode (which runs the body as CPU ops) leaves it out.
        iota_layout = None if self.interpret else plgpu.Layout.WGMMA

        @pl.when((lo > 0) | (hi < bc))
        def _():
            for ref in (a_smem, b_smem):
                val = ref[...]
                rid = plgpu.broadcasted_iota(jnp.int32, val.shape, 0, layout=iota_layout)
                ref[...] = jnp.where((rid >= lo) & (rid < hi), val, jnp.zeros_like(val))
            plgpu.commit_smem()


def tgmm(lhs, dout, group_sizes, *, config=None, interpret=False, out_dtype=None):
    """lhs [M, K], dout [M, N] -> [G, K, N]; out[g] = lhs[rows of g].T @ dout[rows of g].

    Requires block_k % 64 == 0 (row masks use the wgmma register layout); M % block_k == 0,
    K % block_m == 0, N % (num_wgs*block_n) == 0 (ops.py pads).
    """
    cfg = config or TGMM_CONFIG
    gpu_common.check_config(cfg, out_dtype or lhs.dtype)
    _, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    out_dtype = out_dtype or lhs.dtype
    if cfg.block_k % 64:
        raise ValueError(f"tgmm needs block_k % 64 == 0, got {cfg.block_k}")
    cta_n = gpu_common.num_wgs(cfg) * cfg.block_n
    plan = _Plan(cfg, out_dtype, lhs.dtype, interpret, g, k // cfg.block_m, n // cta_n)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    body = gpu_common.named(_body_ws if cfg.warp_specialized else _body_simple, plan, "tgmm")
    out_type = jax.ShapeDtypeStruct((g, k, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(starts, ends, lhs, dout)


def _body_ws(p: _Plan, start_ref, end_ref, lhs_gmem, dout_gmem, out_gmem):
    """Warp-specialized: the memory warpgroup streams a group's row chunks, compute warpgroup wg owns columns
    wg * block_n.. of the tile; each tile fills and drains its own pipeline (a group's chunk count is dynamic)."""
    cfg = p.cfg
    bm, bn, mcs = cfg.block_m, cfg.block_n, cfg.max_concurrent_steps
    epi_m = min(cfg.epi_m, bm)
    allocs = gpu_common.pipeline(cfg, gpu_common.ignore, gpu_common.ignore, mcs, p.specs(0), mcs).get_allocations(
        *p.views(lhs_gmem, dout_gmem, 0, 0)
    )

    def scoped(allocs, wg, t_wg, out_smem):
        def tile(_, lin, __):
            gi, k0, n0, start, end, c0, steps = p.tile_info(start_ref, end_ref, lin)

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
                p.masked(a_smem, b_half, start, end, c0, idx[0])
                plgpu.wgmma(acc_ref, gpu_common.transposed(a_smem, t_wg), b_half)
                plgpu.wgmma_wait(0)
                return acc_ref

            gpu_common.pipeline(cfg, mma, ctx, steps, p.specs(c0), mcs)(
                *p.views(lhs_gmem, dout_gmem, k0, n0), allocations=allocs
            )

        gpu_common.persistent_loop(p.groups * p.k_tiles * p.n_tiles, tile)

    t_shape = gpu_common.scratch(p.interpret, (2, bm, cfg.block_k), p.lhs_dtype)
    gpu_common.ws_scope(allocs, t_shape, plgpu.SMEM((2, epi_m, bn), p.out_dtype), scoped)
    plgpu.wait_smem_to_gmem(0)


def _body_simple(p: _Plan, start_ref, end_ref, lhs_gmem, dout_gmem, out_gmem):
    """One warpgroup: a block_m x block_n tile per persistent step, its chunks through plgpu.emit_pipeline."""
    cfg = p.cfg
    bm, bn = cfg.block_m, cfg.block_n

    def tile(_, lin, __):
        gi, k0, n0, start, end, c0, steps = p.tile_info(start_ref, end_ref, lin)

        def acc_scope(acc_ref, t_smem):
            def step(idx, a_smem, b_smem):
                p.masked(a_smem, b_smem, start, end, c0, idx[0])
                plgpu.wgmma(acc_ref, gpu_common.transposed(a_smem, t_smem), b_smem)

            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=p.specs(c0, delay_release=1),
                max_concurrent_steps=max(cfg.max_concurrent_steps, 2),
            )(*p.views(lhs_gmem, dout_gmem, k0, n0))
            return acc_ref[...]

        t_shape = gpu_common.scratch(p.interpret, (bm, cfg.block_k), p.lhs_dtype)
        acc = gpu_common.acc_with_scratch(acc_scope, (bm, bn), t_shape)

        @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), p.out_dtype))
        def _(out_smem):
            out_smem[...] = acc.astype(p.out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[gi, pl.ds(k0, bm), pl.ds(n0, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    gpu_common.persistent_loop(p.groups * p.k_tiles * p.n_tiles, tile)
    plgpu.wait_smem_to_gmem(0)
