"""Grouped matmul (gmm) in Pallas Mosaic GPU, for Hopper; the GPU config and its tuned defaults.

The kernels are persistent (one CTA per SM walks a tile list with stride num_sms) and, by default,
warp-specialized: one memory warpgroup issues TMA loads into a `max_concurrent_steps`-deep ring of
shared-memory stages, two compute warpgroups each run wgmma (bf16/f16 in, f32 accumulator) on one half
of the CTA's columns. In gmm the pipelines of an SM's consecutive tiles are chained, so the ring is
filled once per SM, not once per tile: the memory warpgroup loads tile i+1 while the compute
warpgroups store tile i (about 1.4x at K=2048, where a tile is only 32 steps: H200 sweep,
2026-11-29, experiments/BENCHMARKS.md).
`warp_specialized=False` falls back to one warpgroup and `plgpu.emit_pipeline`.

gmm tiles follow the groups: tile j of group g starts at row floor8(start_g) + j*block_m, so only the
first and last tile of a group are ragged. The tile list (group, first row, valid row range) is
computed with jnp ops before the kernel (`gmm_tiles`); rows past sum(group_sizes) become zero tiles,
walked after the real ones (no loads, zeros stored). A tile that would cross row M is slid back to
end at M, so no load or store leaves the array. Valid rows are a range inside the tile, written with
one TMA store when the tile is full and otherwise with a ladder of power-of-two TMA stores (TMA boxes
are static).

tgmm (the weight gradient) lives in gpu_tgmm.py; the helpers both kernels use, in gpu_common.py.
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
from pallas_kernels.grouped_matmul.reference import group_of


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tuning knobs. gmm: tile = block_m rows x (2*block_n) cols, K stepped by block_k.

    tgmm: tile = block_m rows of K x (2*block_n) cols of N, group rows stepped by block_k.
    With warp_specialized=False a tile is block_m x block_n (one warpgroup).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    epi_m: int = 64  # warp-specialized epilogue stages the tile through smem this many rows at a time
    grid_tile_n: int = 0  # tile order: strips this many N tiles wide, rows inside; 0 = row-major
    warp_specialized: bool = True
    chain_tiles: bool = True  # warp-specialized gmm: stream the next tile's loads across tile edges
    num_sms: int | None = None  # None: the device's SM count (2 in interpret mode)


# Tile orders from H200 sweeps (2026-11-28, experiments/bench_grouped_matmul.py --sweep): strips
# of 8 N tiles for the forward (G=32 and G=8 shapes), 4 for dlhs (K=2048 shape) and tgmm.
GMM_CONFIG = GpuConfig(grid_tile_n=8)
DLHS_CONFIG = GpuConfig(grid_tile_n=4)
TGMM_CONFIG = GpuConfig(grid_tile_n=4)


def gmm_tiles(group_sizes, m, block_m):
    """Per-row-tile metadata, host side of the kernel (m % 8 == 0, m >= block_m).

    Tile j of group g loads rows [floor8(start_g) + j*block_m, ...): Mosaic GPU only accepts a TMA
    load into a tiled smem buffer at a row offset it can prove is a multiple of 8. Tiles past
    count[0] are unused; the zero-tail tiles come last. Returns count [2] (all tiles, tiles of real groups),
    group (-1: zero tail), row0 (load row), lo, rows (valid range).
    """
    g = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    total = ends[-1]
    sizes = jnp.concatenate([gs, jnp.maximum(m - total, 0)[None]])  # pseudo-group g: zero tail
    starts = jnp.concatenate([ends - gs, total[None]])
    aligned = starts // 8 * 8
    ntiles = jnp.where(sizes > 0, (sizes + starts - aligned + block_m - 1) // block_m, 0)
    cum = jnp.cumsum(ntiles)
    t = jnp.arange(pl.cdiv(m + 8 * (g + 1), block_m) + g + 1, dtype=jnp.int32)
    owner = jnp.minimum(group_of(cum, t), g).astype(jnp.int32)
    row = aligned[owner] + (t - (cum - ntiles)[owner]) * block_m
    lo = jnp.maximum(starts[owner] - row, 0)
    rows = jnp.clip(starts[owner] + sizes[owner] - row, 0, block_m) - lo
    row0 = jnp.clip(row, 0, m - block_m)  # slide the last tile back inside the array
    group = jnp.where(owner < g, owner, -1)
    count = jnp.stack([cum[-1], cum[g - 1]]).astype(jnp.int32)
    return count, group, row0, lo + row - row0, jnp.maximum(rows, 0)


def store_rows(out_smem, out_gmem, row0, lo, rows, col0, block_m, block_n):
    """TMA-store smem rows [lo, lo+rows) to out rows row0+lo..; full tiles take one store."""

    @pl.when(rows == block_m)
    def _():
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(row0, block_m), pl.ds(col0, block_n)])

    @pl.when(rows < block_m)
    def _():
        off = lo
        size = block_m // 2
        while size >= 1:

            @pl.when((rows & size) != 0)  # traced right here, in this iteration: off and size are current
            def _():
                plgpu.copy_smem_to_gmem(
                    out_smem.at[pl.ds(off, size)],  # noqa: B023
                    out_gmem.at[pl.ds(row0 + off, size), pl.ds(col0, block_n)],  # noqa: B023
                )

            off = off + (rows & size)
            size //= 2


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One gmm call's static shapes and specs, shared by its kernel bodies."""

    cfg: GpuConfig
    transpose_rhs: bool
    out_dtype: jnp.dtype
    interpret: bool
    k_steps: int
    n_tiles: int
    mcs: int
    specs: tuple  # (lhs BlockSpec, rhs BlockSpec)
    rhs_dtype: jnp.dtype

    @property
    def cta_n(self):
        return gpu_common.num_wgs(self.cfg) * self.cfg.block_n

    @property
    def epi_m(self):
        return min(self.cfg.epi_m, self.cfg.block_m)

    @property
    def chain(self):
        # Chaining needs every tile's ring to end on the same slot; other K fall back to one pipeline
        # (with its fill and drain) per tile.
        return self.cfg.chain_tiles and self.k_steps % self.mcs == 0

    def views(self, lhs_gmem, rhs_gmem, gi, row0, n0):
        r = rhs_gmem.at[gi]
        r = r.at[pl.ds(n0, self.cta_n), :] if self.transpose_rhs else r.at[:, pl.ds(n0, self.cta_n)]
        return lhs_gmem.at[pl.ds(row0, self.cfg.block_m), :], r

    def b_operand(self, b_smem, wg, t_smem):
        bn = self.cfg.block_n
        if self.transpose_rhs:
            return gpu_common.transposed(b_smem.at[pl.ds(wg * bn, bn), :], t_smem)
        return b_smem.at[:, pl.ds(wg * bn, bn)]

    def scratch(self, shape):  # the interpreter's transpose scratch (transposed rhs only)
        return gpu_common.scratch(self.interpret and self.transpose_rhs, shape, self.rhs_dtype)

    def tile_info(self, refs, mt, nt):
        _, group_ref, row0_ref, lo_ref, rows_ref = refs
        row0 = pl.multiple_of(row0_ref[mt], 8)
        return jnp.maximum(group_ref[mt], 0), row0, lo_ref[mt], rows_ref[mt], nt * self.cta_n


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, config=None, interpret=False, out_dtype=None):
    """lhs [M, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N].

    Requires M % 8 == 0, M >= block_m, K % block_k == 0, N % (num_wgs*block_n) == 0 (ops.py pads).
    """
    cfg = config or GMM_CONFIG
    gpu_common.check_config(cfg, out_dtype or lhs.dtype)
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs.dtype
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    cta_n = gpu_common.num_wgs(cfg) * bn
    k_steps = k // bk
    # wgmma wants one swizzle for both operands, and each warpgroup slices out bn columns of B.
    tf = gpu_common.transforms(min(bk, bn), lhs.dtype)
    lhs_spec = plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=tf)
    if transpose_rhs:
        rhs_spec = plgpu.BlockSpec((cta_n, bk), lambda kk: (0, kk), transforms=tf)
    else:
        rhs_spec = plgpu.BlockSpec((bk, cta_n), lambda kk: (kk, 0), transforms=tf)
    mcs = max(1, min(cfg.max_concurrent_steps, k_steps))
    plan = _Plan(cfg, transpose_rhs, out_dtype, interpret, k_steps, n // cta_n, mcs, (lhs_spec, rhs_spec), rhs.dtype)
    body = gpu_common.named(_body_ws if cfg.warp_specialized else _body_simple, plan, "gmm")
    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    tiles = gmm_tiles(group_sizes, m, bm)
    return gpu_common.run(body, out_type, cfg, interpret)(*tiles, lhs, rhs)


def _body_ws(p: _Plan, *refs):
    """Warp-specialized: the memory warpgroup streams K steps, compute warpgroup wg owns columns wg * block_n..;
    an SM's consecutive tiles chain their pipelines (p.chain)."""
    meta, (lhs_gmem, rhs_gmem, out_gmem) = refs[:5], refs[5:]
    cfg, specs, bn, epi_m = p.cfg, list(p.specs), p.cfg.block_n, p.epi_m
    n_all, n_real = meta[0][0], meta[0][1]
    allocs = gpu_common.pipeline(cfg, gpu_common.ignore, gpu_common.ignore, p.k_steps, specs, p.mcs).get_allocations(
        *p.views(lhs_gmem, rhs_gmem, 0, 0, 0)
    )

    def scoped(allocs, wg, t_wg, out_smem):
        def store_chunk_fn(row0, lo, rows, n0):
            def store_chunk(r0):
                clo = jnp.clip(lo - r0, 0, epi_m)
                crows = jnp.clip(lo + rows - r0, 0, epi_m) - clo
                store_rows(out_smem.at[wg], out_gmem, row0 + r0, clo, crows, n0 + wg * bn, epi_m, bn)

            return store_chunk

        def tile(i, lin, n):
            mt, nt = gpu_common.tile_order(lin, n_real, p.n_tiles, cfg.grid_tile_n)
            gi, row0, lo, rows, n0 = p.tile_info(meta, mt, nt)

            def ctx(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((cfg.block_m, bn), jnp.float32))
                def _(acc_ref):
                    eval_pipeline(acc_ref)
                    gpu_common.epilogue(acc_ref[...], out_smem.at[wg], store_chunk_fn(row0, lo, rows, n0))

            def mma(_, a_smem, b_smem, acc_ref):
                plgpu.wgmma(acc_ref, a_smem, p.b_operand(b_smem, wg, t_wg))
                plgpu.wgmma_wait(0)
                return acc_ref

            def run(state):
                gpu_common.pipeline(cfg, mma, ctx, p.k_steps, specs, p.mcs, state)(
                    *p.views(lhs_gmem, rhs_gmem, gi, row0, n0), allocations=allocs
                )

            gpu_common.chained(run, i, n, p.chain)

        gpu_common.persistent_loop(n_real * p.n_tiles, tile)

        # Rows past sum(group_sizes): the compute warpgroups store zeros, the memory one has no work.
        @pl.when(wg < 2)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem.at[wg][...] = jnp.zeros((epi_m, bn), p.out_dtype)
            plgpu.commit_smem()

            def zero_tile(i, lin, n):
                _, row0, lo, rows, n0 = p.tile_info(meta, n_real + lax.div(lin, p.n_tiles), lax.rem(lin, p.n_tiles))
                store = store_chunk_fn(row0, lo, rows, n0)
                for c in range(cfg.block_m // epi_m):
                    store(c * epi_m)

            gpu_common.persistent_loop((n_all - n_real) * p.n_tiles, zero_tile)

    gpu_common.ws_scope(allocs, p.scratch((2, cfg.block_k, bn)), plgpu.SMEM((2, epi_m, bn), p.out_dtype), scoped)
    plgpu.wait_smem_to_gmem(0)


def _body_simple(p: _Plan, *refs):
    """One warpgroup: a block_m x block_n tile per persistent step, its K loop through plgpu.emit_pipeline."""
    meta, (lhs_gmem, rhs_gmem, out_gmem) = refs[:5], refs[5:]
    cfg = p.cfg
    bm, bn = cfg.block_m, cfg.block_n
    specs = [dataclasses.replace(s, delay_release=1) for s in p.specs]
    t_shape = p.scratch((cfg.block_k, bn))

    def tile(_, lin, __):
        mt, nt = gpu_common.tile_order(lin, meta[0][0], p.n_tiles, cfg.grid_tile_n)
        gi, row0, lo, rows, n0 = p.tile_info(meta, mt, nt)
        steps = jnp.where(meta[1][mt] >= 0, p.k_steps, 0)  # zero-tail tiles load nothing

        def acc_scope(acc_ref, t_smem):
            plgpu.emit_pipeline(
                lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, a_smem, p.b_operand(b_smem, 0, t_smem)),
                grid=(steps,),
                in_specs=specs,
                max_concurrent_steps=max(p.mcs, 2),
            )(*p.views(lhs_gmem, rhs_gmem, gi, row0, n0))
            return acc_ref[...]

        acc = gpu_common.acc_with_scratch(acc_scope, (bm, bn), t_shape)

        @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), p.out_dtype))
        def _(out_smem):
            out_smem[...] = acc.astype(p.out_dtype)
            plgpu.commit_smem()
            store_rows(out_smem, out_gmem, row0, lo, rows, n0, bm, bn)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    gpu_common.persistent_loop(meta[0][0] * p.n_tiles, tile)
    plgpu.wait_smem_to_gmem(0)
