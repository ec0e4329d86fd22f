"""FP8 grouped matmul in Pallas Mosaic GPU (Hopper): e4m3 wgmma with DeepSeek-V3's per-128-K promotion.

Persistent over the tiles of the bf16 gmm (pallas_kernels/grouped_matmul/gpu.py: same tile list, tile order,
ragged-row stores and zero tail). K steps by 128, the scaling granularity: each step's wgmma (both operands
K-major, as FP8 wgmma requires) accumulates into a fresh register accumulator, which is then scaled by the step's
activation-tile scales (one per row) and weight scales and added into the float32 running sum. That bounds every
hardware accumulation to 128 products (Hopper's FP8 wgmma accumulates with ~14 bits), the promotion DeepSeek
describes. With 128 x 128 weight blocks a tile's columns share one weight scale per step (scalar_block_scale):
it is folded into the row scales, so a promotion is one multiply-add per element; per-column scales (a weight
gradient's tile-scaled rhs) cost a second multiply.

Operands (ops.py builds them from quantize_tiles / quantize_blocks):
  x_q [M, K] e4m3, xs_t [K/128, M] float32 (tile scales, transposed: a tile's rows are one contiguous load)
  w_q [G, N, K] e4m3 (K-major), ws_cols [G, K/128, N] float32 (each block scale repeated over its 128 columns)
Requires M % 8 == 0, M >= block_m, K % 128 == 0, N % block_n == 0 (ops.py pads).

GEMM_CONFIG, the default: warp-specialized, a memory warpgroup streaming the operands and three compute warpgroups of
64 rows each on a 192-row tile (sharing its weight tile), so the promotions of some run under the others' wgmma;
chained tile pipelines, as in the bf16 gmm; as many stages as fit beside the output staging buffers; each K step's
scales read before its wgmma is issued (early_scales). Grouped gate+up shape (experiments/BENCHMARKS.md): H200 891-992
FP8 TFLOP/s (8 repeats in one process: 891-971, median 926), 1.55-1.64x our bf16 gmm; 1,038-1,070 where every group
fills whole tiles (experiments/fp8_bound_probe.py); H100 949-999, 1.55-1.71x (2026-12-07); dense 1,081-1,117 (H200).
Measured slower and removed: idle warpgroups skipping their wgmma in a cond around the step (853 vs 953); stages of two
K steps in 2 compute warpgroups, the first promoted under the second's wgmma (SASS as intended, yet 840-845 vs 932-937:
a third warpgroup hides promotions better than pairing steps within one); step k-1 promoted in code after step k's
issue: ptxas hoists the promotion above the issue (532 vs 658). cluster_n=2 (x multicast into the 2 CTAs of a cluster):
no faster (869 vs 916 H200, 930-939 vs 956-974 H100; the interpreter has no cluster barriers); L2 prefetch hints for the
operand tiles some K steps ahead (cp.async.bulk.prefetch from a compute warpgroup): 15-45% slower; row tiles starting
their K loops staggered (so a group's tiles would not wait on the same DRAM misses): slower in proportion to the stagger
(H100, 2026-12-07: the kernel runs at its loads-only rate there); 128 x 256 tiles on two compute warpgroups, each
running its 256 columns as two wgmma through one fresh accumulator: 913-924 vs 917-946, 781-806 vs 833-901 at small's
shape (H200, 2026-12-06); stages of two K steps in 3 compute warpgroups, one slot handshake for both (871-877 vs
950-958 H100: two stages hold the four steps, so the prefetch is shallower); Mosaic's warpgroup barrier before each TMA
load left out (CompilerParams.unsafe_no_auto_barriers, 72 BAR.SYNC -> 14: 914-939 vs 950-958 H100; BENCHMARKS.md,
thirtieth session); the compute warpgroups reading the scales from gmem a step ahead, so a stage is 3 or 2 TMA copies
instead of 4 (x's: 924-933, both: 753-763 vs 978 H100; loads-only +3%: thirty-first session). Fp8GpuConfig's own
defaults: the one-warpgroup kernel, which the interpreter runs on any host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm.gpu_config import BLOCK_K, check_config, default_config, ws_stages
from pallas_kernels.grouped_matmul import gpu_common
from pallas_kernels.grouped_matmul.gpu import gmm_tiles, store_rows


def _vector(ref, layout, interpret):
    """A 1-D smem vector in registers, laid out to broadcast along the accumulator's rows or columns. jax 0.10's
    GPU interpreter has no plgpu.load; a plain read stands in for it there."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def _promote(total, part, scales):
    """total + part scaled per row and per column: scales = (row scales, column scales), or (row scales,) with
    a scalar column scale already folded in (one multiply-add per element)."""
    shape = part.shape
    s = lax.broadcast_in_dim(scales[0], shape, [0])
    if len(scales) == 2:
        s = s * lax.broadcast_in_dim(scales[1], shape, [1])
    return total + part * s


ROW_LAYOUT, COL_LAYOUT = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)  # scales along rows / columns


def promoted_step(cfg, x_smem, w_smem, xs_ref, ws_ref, total, t_smem, shape, interpret, scalar_ws=False, release=None):
    """One K step: x_smem [rows, 128] . w_smem [cols, 128]^T into a fresh accumulator, then promoted into the
    float32 sum with xs_ref's row scales and ws_ref's column scales (scalar_ws: all columns share ws_ref[0], a
    weight block's scale, which multiplies the row scales instead). total: the float32 sum so far. release: called
    once the step's smem is no longer read (product and scales in registers), before the promotion."""
    scales = step_scales(xs_ref, ws_ref, scalar_ws, interpret) if cfg.early_scales else None
    part = _product(x_smem, w_smem, t_smem, shape)
    if scales is None:
        scales = step_scales(xs_ref, ws_ref, scalar_ws, interpret)
    if release is not None:
        release()
    return _promote(total, part, scales)


def _product(x_smem, w_smem, t_smem, shape):
    """x_smem . w_smem^T by wgmma into a fresh float32 accumulator, waited for and loaded into registers."""

    def product(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, gpu_common.transposed(w_smem, t_smem))
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def skipping_step(x_smem, w_smem, xs_ref, ws_ref, total, consumed, busy, t_smem, shape, interpret, scalar_ws):
    """skip_idle_wgs' K step, on a pipeline whose stage releases are the body's (`consumed`: the stage's consumed
    barriers): busy (traced, uniform over the warpgroup), the step's scales are read, the wgmma run, the stage
    released once the wgmma's wait has returned, then the product promoted; idle, the stage is released at once
    and the sum passes through."""

    def release():
        for barrier in consumed:
            plgpu.barrier_arrive(barrier)

    def run():
        scales = step_scales(xs_ref, ws_ref, scalar_ws, interpret)  # read before the release lets TMA refill it
        part = _product(x_smem, w_smem, t_smem, shape)
        release()
        return _promote(total, part, scales)

    def skip():
        release()
        return total

    return lax.cond(busy, run, skip)


def step_scales(xs_ref, ws_ref, scalar_ws, interpret):
    """A K step's promotion scales in registers: (row scales x the block's weight scale,) or (row, column)."""
    xs = _vector(xs_ref, ROW_LAYOUT, interpret)
    return (xs * ws_ref[0],) if scalar_ws else (xs, _vector(ws_ref, COL_LAYOUT, interpret))


def uses_scalar_scale(cfg, w_scales):
    """Whether the kernel reads one weight scale per K step: block scales (w_scales="block"), a tile inside one
    128-column block, and the knob on."""
    return w_scales == "block" and BLOCK_K % cfg.block_n == 0 and cfg.scalar_block_scale


def zero_sum(shape, interpret):
    """The K loop's starting float32 sum, in the wgmma accumulator's register layout (the interpreter has none)."""
    zero = jnp.zeros(shape, jnp.float32)
    return zero if interpret else plgpu.layout_cast(zero, plgpu.Layout.WGMMA)


def specs_for(bm, bn, first_step=0, delay_release=1, x_axes=()):
    """A tile's K-step BlockSpecs: x [bm, 128] and w [bn, 128] (K-major e4m3), their scales [1, bm] and [1, bn];
    step kk reads K step first_step + kk (first_step may be traced). delay_release=1 keeps a step's buffers until
    the next step (one warpgroup's pipeline); the warp-specialized pipelines take 0. x_axes: the cluster axes x is
    multicast over."""
    tf = gpu_common.transforms(BLOCK_K, jnp.float8_e4m3fn)
    dr = delay_release
    return [
        plgpu.BlockSpec(
            (bm, BLOCK_K), lambda kk: (0, first_step + kk), transforms=tf, delay_release=dr, collective_axes=x_axes
        ),
        plgpu.BlockSpec((bn, BLOCK_K), lambda kk: (0, first_step + kk), transforms=tf, delay_release=dr),
        plgpu.BlockSpec((1, bm), lambda kk: (first_step + kk, 0), delay_release=dr),
        plgpu.BlockSpec((1, bn), lambda kk: (first_step + kk, 0), delay_release=dr),
    ]


def scaled_k_loop(cfg, specs, steps, operands, interpret, scalar_ws=False):
    """One warpgroup's float32 [bm, bn] sum over `steps` (may be traced, may be 0) K steps of
    x_step . w_step^T * (x scales per row x w scales per column), promoted every step. operands: gmem views
    (x [bm, K], w [bn, K], xs [K/128, bm], ws [K/128, bn]) that `specs` (specs_for) tile. scalar_ws: every column
    of a step has the same w scale (uses_scalar_scale)."""
    bm, bn = specs[0].block_shape[0], specs[1].block_shape[0]

    def with_scratch(t_smem):
        def step(_, x_smem, w_smem, xs_smem, ws_smem, carry):
            xs, ws = xs_smem.at[0], ws_smem.at[0]
            return promoted_step(cfg, x_smem, w_smem, xs, ws, carry, t_smem, (bm, bn), interpret, scalar_ws)

        pipeline = plgpu.emit_pipeline(
            step,
            grid=(steps,),
            in_specs=specs,
            max_concurrent_steps=max(2, cfg.max_concurrent_steps),
            init_carry=zero_sum((bm, bn), interpret),
        )
        return pipeline(*operands)

    t_shape = gpu_common.scratch(interpret, (BLOCK_K, bn), jnp.float8_e4m3fn)
    return with_scratch(None) if t_shape is None else pl.run_scoped(with_scratch, t_shape)


def fp8_gmm(
    x_q,
    xs_t,
    w_q,
    ws_cols,
    group_sizes,
    *,
    config=None,
    interpret=False,
    out_dtype=jnp.bfloat16,
    w_scales="block",
    w_first=None,
):
    """[M, K] x [G, N, K] -> [M, N] in out_dtype (rows past sum(group_sizes): zeros). w_scales: "block" (ws_cols
    repeats 128 x 128 block scales over their columns) or "column" (any scale per column, e.g. tile scales of a
    weight gradient's rhs). w_first (int32 scalar, may be traced): w_q is a larger stack [T, N, K] whose groups
    w_first .. w_first + G - 1 are this product's (ws_cols stays the G groups' own)."""
    cfg = config or default_config(x_q.shape[1])
    check_config(cfg)
    if cfg.ring_loads:
        raise ValueError("fp8_gmm: a ring_loads config runs gpu_ring.fp8_gmm (ops.fp8_gmm picks it)")
    scalar_ws = uses_scalar_scale(cfg, w_scales)
    tiles = tiles_with_first(group_sizes, x_q.shape[0], cfg.block_m, w_first)
    if cfg.warp_specialized:
        return _fp8_gmm_ws(x_q, xs_t, w_q, ws_cols, tiles, cfg, interpret, out_dtype, scalar_ws)
    m, k = x_q.shape
    n = w_q.shape[1]
    bm, bn = cfg.block_m, cfg.block_n
    k_steps, n_tiles = k // BLOCK_K, n // bn
    cfg = dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, k_steps))
    count, tgroup, trow0, tlo, trows = tiles
    specs = specs_for(bm, bn)

    def body(count_ref, group_ref, row0_ref, lo_ref, rows_ref, x_gmem, xs_gmem, w_gmem, ws_gmem, out_gmem):
        def tile(_, lin, __):
            mt, nt = gpu_common.tile_order(lin, count_ref[0], n_tiles, cfg.grid_tile_n)
            gi = jnp.maximum(group_ref[mt], 0)
            row0, n0 = pl.multiple_of(row0_ref[mt], 8), nt * bn
            steps = jnp.where(group_ref[mt] >= 0, k_steps, 0)  # zero-tail tiles load nothing
            operands = tile_views((x_gmem, xs_gmem, w_gmem, ws_gmem), bm, bn, gi, row0, n0, count_ref[2])
            total = scaled_k_loop(cfg, specs, steps, operands, interpret, scalar_ws)

            @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((bm, bn), out_dtype))
            def _(out_smem):
                out_smem[...] = total.astype(out_dtype)
                plgpu.commit_smem()
                store_rows(out_smem, out_gmem, row0, lo_ref[mt], rows_ref[mt], n0, bm, bn)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        gpu_common.persistent_loop(count_ref[0] * n_tiles, tile)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(count, tgroup, trow0, tlo, trows, x_q, xs_t, w_q, ws_cols)


def tiles_with_first(group_sizes, m, bm, w_first):
    """gmm_tiles' tile metadata, its count array extended by w_first (0 if None): the kernels read the stack index
    of group 0 from count[2]."""
    count, *rest = gmm_tiles(group_sizes, m, bm)
    first = jnp.zeros((1,), jnp.int32) if w_first is None else jnp.reshape(w_first, (1,)).astype(jnp.int32)
    return (jnp.concatenate([count, first]), *rest)


def tile_views(gmem, bm, bn, gi, row0, n0, w_first=0):
    """A tile's gmem operands: x rows [row0, row0 + bm), group gi's w rows [n0, n0 + bn) (at w_first + gi of the
    stack), their scales. Looked up at trace time: experiments/fp8_bound_probe.py swaps it (--weights=shared)."""
    x_gmem, xs_gmem, w_gmem, ws_gmem = gmem
    return (
        x_gmem.at[pl.ds(row0, bm), :],
        w_gmem.at[gi + w_first].at[pl.ds(n0, bn), :],
        xs_gmem.at[:, pl.ds(row0, bm)],
        ws_gmem.at[gi].at[:, pl.ds(n0, bn)],
    )


def _stage_body(cfg, wg, half, bn, t_wg, interpret, scalar_ws, busy):
    """Compute warpgroup wg's pipeline body: its `half` rows of a K step, promoted into the carry. With
    skip_idle_wgs the pipeline passes the stage's consumed barriers before the carry, and busy says whether this
    warpgroup holds rows of the tile's group."""

    def mma(_, x_smem, w_smem, xs_smem, ws_smem, *rest):
        *consumed, carry = rest
        rows = pl.ds(wg * half, half)
        x, xs, ws, shape = x_smem.at[rows], xs_smem.at[0, rows], ws_smem.at[0], (half, bn)
        if cfg.skip_idle_wgs:
            return skipping_step(x, w_smem, xs, ws, carry, consumed, busy, t_wg, shape, interpret, scalar_ws)
        return promoted_step(cfg, x, w_smem, xs, ws, carry, t_wg, shape, interpret, scalar_ws)

    return mma


def _fp8_gmm_ws(x_q, xs_t, w_q, ws_cols, tiles, cfg, interpret, out_dtype, scalar_ws):
    """Warp-specialized fp8_gmm: tiles of block_m rows x block_n columns, compute warpgroup w of nw owns rows
    [w * block_m / nw, (w + 1) * block_m / nw) of each; the memory warpgroup (index nw) only loads."""
    m, k = x_q.shape
    n = w_q.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, BLOCK_K
    nw = gpu_common.num_wgs(cfg)
    half = bm // nw  # one compute warpgroup's rows
    k_steps, n_tiles = k // bk, n // bn
    mcs = ws_stages(cfg, out_dtype, k_steps)
    chain = k_steps % mcs == 0  # chained pipelines must end every tile on the same ring slot
    count, tgroup, trow0, tlo, trows = tiles
    cl = cfg.cluster_n
    if n_tiles % cl:
        raise ValueError(f"fp8_gmm: N={n} must be a multiple of cluster_n * block_n = {cl * bn} (ops.py pads)")
    n_pairs = n_tiles // cl  # a cluster's CTAs take N tiles cl * p + (its index in the cluster)
    specs = specs_for(bm, bn, delay_release=0, x_axes=("cluster",) if cl > 1 else ())

    def body(count_ref, group_ref, row0_ref, lo_ref, rows_ref, x_gmem, xs_gmem, w_gmem, ws_gmem, out_gmem):
        gmem = (x_gmem, xs_gmem, w_gmem, ws_gmem)
        n_all, n_real = count_ref[0], count_ref[1]
        allocs = gpu_common.pipeline(
            cfg, gpu_common.ignore, gpu_common.ignore, k_steps, specs, mcs, manual_release=cfg.skip_idle_wgs
        ).get_allocations(*tile_views(gmem, bm, bn, 0, 0, 0))

        def scoped(allocs, wg, t_wg, out_smem):
            cta = lax.axis_index("cluster") if cl > 1 else 0

            def own_rows(mt):  # this warpgroup's rows of tile mt that hold output: (first, count) within its half
                lo = lo_ref[mt] - wg * half
                clo = jnp.clip(lo, 0, half)
                return clo, jnp.clip(lo + rows_ref[mt], 0, half) - clo

            def store(mt, n0, where=None):  # where: (row0, first, count) read earlier, or None: read here
                row0, first, count = where if where is not None else (row0_ref[mt], *own_rows(mt))
                store_rows(out_smem.at[wg], out_gmem, row0 + wg * half, first, count, n0, half, bn)

            def tile(i, lin, n):
                # strips of grid_tile_n N tiles are grid_tile_n / cl cluster columns (0, row-major, stays 0)
                mt, pair = gpu_common.tile_order(lin, n_real, n_pairs, -(-cfg.grid_tile_n // cl))
                gi, row0, n0 = jnp.maximum(group_ref[mt], 0), pl.multiple_of(row0_ref[mt], 8), (pair * cl + cta) * bn
                early = cfg.early_store_rows or cfg.skip_idle_wgs  # skipping reads them at the start anyway
                where = (row0, *own_rows(mt)) if early else None
                busy = where[2] > 0 if cfg.skip_idle_wgs else None  # decided once per tile
                mma = _stage_body(cfg, wg, half, bn, t_wg, interpret, scalar_ws, busy)

                def ctx(eval_pipeline):
                    total = eval_pipeline(zero_sum((half, bn), interpret))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has left out_smem
                    out_smem.at[wg][...] = total.astype(out_dtype)
                    plgpu.commit_smem()
                    store(mt, n0, where)

                def run(state):
                    gpu_common.pipeline(cfg, mma, ctx, k_steps, specs, mcs, state, manual_release=cfg.skip_idle_wgs)(
                        *tile_views(gmem, bm, bn, gi, row0, n0, count_ref[2]), allocations=allocs
                    )

                gpu_common.chained(run, i, n, chain)

            gpu_common.persistent_loop(n_real * n_pairs, tile)

            def col0(pair):  # a cluster's CTAs take N tiles cl * pair + (its index in the cluster)
                return (pair * cl + cta) * bn

            # rows past sum(group_sizes): the compute warpgroups store zeros, no loads
            pl.when(wg < nw)(lambda: zero_tail(out_smem.at[wg], store, n_real, n_all, n_pairs, col0))

        t_shape = gpu_common.scratch(interpret, (nw, bk, bn), w_q.dtype)
        gpu_common.ws_scope(allocs, t_shape, plgpu.SMEM((nw, half, bn), out_dtype), scoped)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(count, tgroup, trow0, tlo, trows, x_q, xs_t, w_q, ws_cols)


def zero_tail(out_ref, store, first, end, n_pairs, col0):
    """The zero tail's row tiles first.. end - 1 stored as zeros by one compute warpgroup (out_ref: its
    staging buffer; store(row tile, first column))."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)
    plgpu.commit_smem()
    gpu_common.persistent_loop(
        (end - first) * n_pairs, lambda i, lin, n: store(first + lax.div(lin, n_pairs), col0(lax.rem(lin, n_pairs)))
    )
