"""fp8_gmm's warp-specialized kernel over a load ring that fetches only the rows a tile holds (Fp8GpuConfig.ring_loads).

The pipelined kernel (gpu.py) loads every K step's whole block_m x 128 x tile, whether or not its rows belong to
the tile's group: on the gate+up bench's Dirichlet groups a group's last tile is partly filled and 192-row tiles
stream 17% more rows than M, and the kernel runs 918-990 TFLOP/s there against 1,038-1,070 where every tile is full
(H200, experiments/fp8_bound_probe.py). Skipping the idle warpgroups' wgmma alone did not pay (skip_idle_wgs): their
rows were still loaded. Here the memory warpgroup runs its own ring of `stages` smem slots through all of a CTA's
tiles (as fp8_tgmm's `_fp8_tgmm_ring`): each K step it copies x in block_m / compute_wgs row shares, only the shares
a compute warpgroup has rows of, and arrives on the slot's barrier for each skipped one, so the barrier completes
with the bytes that did come. A compute warpgroup without rows in its tile releases every slot at once and runs no
wgmma (gpu.skipping_step); the others run gpu.py's promoted K step. Same tiles, tile order, ragged stores and zero
tail as gpu.py; a warpgroup's row share and count are read at its tile's start, and with early_store_rows its first
output row too. default_config runs this kernel, with early_store_rows, at K <= 1024: on the H100 10% faster than
gpu.py's at small's gate+up shape and level at V3's (BENCHMARKS.md, twenty-fourth FP8 session).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_gemm import gpu
from pallas_kernels.fp8_gemm.gpu_config import BLOCK_K, check_config, ws_stages
from pallas_kernels.fp8_gemm.gpu_tgmm import wait_slot
from pallas_kernels.grouped_matmul import gpu_common
from pallas_kernels.grouped_matmul.gpu import store_rows


def fp8_gmm(x_q, xs_t, w_q, ws_cols, group_sizes, cfg, interpret, out_dtype, w_scales, w_first):
    """gpu.fp8_gmm's contract and operands, for a warp-specialized config with ring_loads (one CTA per cluster)."""
    check_config(cfg)
    if not cfg.warp_specialized or cfg.cluster_n != 1:
        raise ValueError(f"fp8_gmm: ring_loads needs warp_specialized=True and cluster_n=1, got {cfg}")
    m, k = x_q.shape
    n = w_q.shape[1]
    bm, bn, nw = cfg.block_m, cfg.block_n, gpu_common.num_wgs(cfg)
    half, k_steps, n_tiles = bm // nw, k // BLOCK_K, n // bn
    stages = ws_stages(cfg, out_dtype, k_steps)
    scalar_ws = gpu.uses_scalar_scale(cfg, w_scales)
    tiles = gpu.tiles_with_first(group_sizes, m, bm, w_first)
    tf = gpu_common.transforms(BLOCK_K, jnp.float8_e4m3fn)

    def body(count_ref, group_ref, row0_ref, lo_ref, rows_ref, x_gmem, xs_gmem, w_gmem, ws_gmem, out_gmem):
        n_all, n_real = count_ref[0], count_ref[1]

        def place(lin):  # a tile's row tile, first load row, first column and group
            mt, nt = gpu_common.tile_order(lin, n_real, n_tiles, cfg.grid_tile_n)
            return mt, pl.multiple_of(row0_ref[mt], 8), nt * bn, jnp.maximum(group_ref[mt], 0)

        def share(mt, wg):  # warpgroup wg's rows of tile mt that hold output: (first, count) within its share
            lo = lo_ref[mt] - wg * half
            first = jnp.clip(lo, 0, half)
            return first, jnp.clip(lo + rows_ref[mt], 0, half) - first

        def scoped(ring, wg, t_wg, out_smem):
            @pl.when(wg == nw)
            def _():
                plgpu.set_max_registers(cfg.memory_registers, action="decrease")
                gmem = (x_gmem, xs_gmem, w_gmem, ws_gmem)
                _loads(ring, (stages, nw, half, bn, k_steps), place, share, gmem, count_ref[2], n_real * n_tiles)

            @pl.when(wg < nw)
            def _():
                plgpu.set_max_registers(gpu_common.compute_registers(cfg), action="increase")

                def store(mt, n0, first, count, row0=None):
                    row0 = row0_ref[mt] if row0 is None else row0
                    store_rows(out_smem.at[wg], out_gmem, row0 + wg * half, first, count, n0, half, bn)

                def tile(lin, t):
                    mt, row0, n0, _ = place(lin)
                    # early_store_rows: the tile's first output row as read here, its latency under the K loop
                    row0 = row0 if cfg.early_store_rows else None
                    first, count = share(mt, wg)
                    step = _step(ring, stages, wg, half, bn, count > 0, t_wg, interpret, scalar_ws)
                    t, total = lax.fori_loop(0, k_steps, step, (t, gpu.zero_sum((half, bn), interpret)))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has left out_smem
                    out_smem.at[wg][...] = total.astype(out_dtype)
                    plgpu.commit_smem()
                    store(mt, n0, first, count, row0)
                    return t

                gpu_common.persistent_fold(n_real * n_tiles, tile, jnp.int32(0))
                zero = lambda mt, n0: store(mt, n0, *share(mt, wg))  # noqa: E731
                gpu.zero_tail(out_smem.at[wg], zero, n_real, n_all, n_tiles, lambda nt: nt * bn)

        ring = dict(  # fp8_tgmm's ring layout (gpu_tgmm.wait_slot reads it): a = x, b = w
            a=plgpu.SMEM((stages, bm, BLOCK_K), x_q.dtype, transforms=tf),
            b=plgpu.SMEM((stages, bn, BLOCK_K), w_q.dtype, transforms=tf),
            a_s=plgpu.SMEM((stages, 1, bm), jnp.float32),
            b_s=plgpu.SMEM((stages, 1, bn), jnp.float32),
            full=plgpu.Barrier(num_arrivals=nw + 3, num_barriers=stages),  # x's shares (copied or not), w, scales
            consumed=plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
        )
        t_shape = gpu_common.scratch(interpret, (nw, BLOCK_K, bn), w_q.dtype)
        gpu_common.ws_scope(ring, t_shape, plgpu.SMEM((nw, half, bn), out_dtype), scoped)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((m, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(*tiles, x_q, xs_t, w_q, ws_cols)


def _step(ring, stages, wg, half, bn, busy, t_wg, interpret, scalar_ws):
    """A compute warpgroup's K step t: wait for slot t % stages, then gpu.skipping_step on its row share (released
    right after the wgmma's wait, or at once where the warpgroup has no rows in the tile)."""
    mine = pl.ds(wg * half, half)

    def step(_, carry):
        t, total = carry
        slot, x, w, xs, ws = wait_slot(ring, t, stages, mine)
        consumed = [ring["consumed"].at[slot]]
        total = gpu.skipping_step(x, w, xs, ws, total, consumed, busy, t_wg, (half, bn), interpret, scalar_ws)
        return t + 1, total

    return step


def _loads(ring, shape, place, share, gmem, w_first, num_tiles):
    """The memory warpgroup: every K step of the CTA's tiles into the next slot once the compute warpgroups have
    released its previous use; x's row shares only where a compute warpgroup has rows (a bare arrival otherwise),
    in one copy where all have (with 3 TMA copies of 64 rows a step against the pipelined kernel's one of 192, the
    ring ran 4% under it at V3's shape, whose tiles are nearly all full; with the one copy, level: H100,
    BENCHMARKS.md twenty-third and twenty-fourth FP8 sessions).
    Then it waits out the last releases, so every barrier phase it began is complete when the kernel ends."""
    x_gmem, xs_gmem, w_gmem, ws_gmem = gmem
    stages, nw, half, bn, k_steps = shape

    def tile(lin, t):
        mt, row0, n0, gi = place(lin)
        busy = [share(mt, c)[1] > 0 for c in range(nw)]

        every = functools.reduce(jnp.logical_and, busy)

        def step(kk, t):
            slot = lax.rem(t, stages)
            pl.when(t >= stages)(lambda: plgpu.barrier_wait(ring["consumed"].at[slot]))
            cols, full = pl.ds(kk * BLOCK_K, BLOCK_K), ring["full"].at[slot]

            @pl.when(every)  # a full tile (most of them): x in one copy, the other shares' arrivals bare
            def _():
                plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(row0, nw * half), cols], ring["a"].at[slot], full)
                for _ in range(nw - 1):
                    plgpu.barrier_arrive(full)

            @pl.when(jnp.logical_not(every))
            def _():
                for c in range(nw):
                    src = x_gmem.at[pl.ds(pl.multiple_of(row0 + c * half, 8), half), cols]
                    dst = ring["a"].at[slot].at[pl.ds(c * half, half)]
                    pl.when(busy[c])(lambda src=src, dst=dst: plgpu.copy_gmem_to_smem(src, dst, full))
                    pl.when(jnp.logical_not(busy[c]))(lambda: plgpu.barrier_arrive(full))

            plgpu.copy_gmem_to_smem(w_gmem.at[gi + w_first].at[pl.ds(n0, bn), cols], ring["b"].at[slot], full)
            plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(kk, 1), pl.ds(row0, nw * half)], ring["a_s"].at[slot], full)
            plgpu.copy_gmem_to_smem(ws_gmem.at[gi].at[pl.ds(kk, 1), pl.ds(n0, bn)], ring["b_s"].at[slot], full)
            return t + 1

        return lax.fori_loop(0, k_steps, step, t)

    total = gpu_common.persistent_fold(num_tiles, tile, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(t):
        plgpu.barrier_wait(ring["consumed"].at[lax.rem(t, stages)])
