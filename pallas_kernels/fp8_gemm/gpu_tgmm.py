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
2 compute warpgroups sharing each tile's b rows, on one ring of smem slots that runs through all of a CTA's tiles
(_fp8_tgmm_ring). emit_pipeline_warp_specialized chains tiles only over static step counts, and a group's is
dynamic: with a pipeline per tile, each tile filled and drained its own (H100, V3's gate+up shape, 4 steps a tile:
428-429 against the ring's 459-473 TFLOP/s; small's expert shapes: the same within the noise, 2026-12-06).
warp_specialized=False runs one warpgroup (0.6x bf16 on V3's gate+up shape).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
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
    if cfg.ring_loads:  # its warp-specialized kernel always runs a ring; its tiles are whole
        raise ValueError("fp8_tgmm's GPU kernel loads whole tiles: ring_loads is fp8_gmm's only")
    if cfg.warp_specialized:
        return _fp8_tgmm_ring(a_q, as_t, b_q, bs_t, group_sizes, cfg, interpret, out_dtype)
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


def _fp8_tgmm_ring(a_q, as_t, b_q, bs_t, group_sizes, cfg, interpret, out_dtype):
    """Warp-specialized fp8_tgmm over one ring of `stages` smem slots for all of a CTA's tiles: K step t of the CTA
    (counted across its tiles) lives in slot t % stages. The memory warpgroup fills slot after slot, waiting only
    for the compute warpgroups to release a slot's previous use, so the next tile's loads run under the current
    tile's last steps and its store. Compute warpgroup w of nw owns rows [w * block_m / nw, (w + 1) * block_m / nw)
    of each tile (rows of K), all sharing its b tile."""
    k, _ = a_q.shape
    n = b_q.shape[0]
    g = group_sizes.shape[0]
    bm, bn = cfg.block_m, cfg.block_n
    nw = gpu_common.num_wgs(cfg)
    k_tiles, n_tiles = k // bm, n // bn
    stages = ws_stages(cfg, out_dtype)
    first, steps = group_steps(group_sizes)
    tf = gpu_common.transforms(BLOCK_K, jnp.float8_e4m3fn)

    def place(lin):  # a tile's group, first row (of K) and first column (of N)
        kt, nt = gpu_common.tile_order(lin % (k_tiles * n_tiles), k_tiles, n_tiles, cfg.grid_tile_n)
        return lin // (k_tiles * n_tiles), kt * bm, nt * bn

    def body(first_ref, steps_ref, a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem):
        num_tiles = g * k_tiles * n_tiles

        def ahead(lin, refs):
            # a tile's group's entries of refs, read a tile before they are used so the loads' latency passes
            # under the previous tile's K loop; past the last tile: the last group's, unused
            gi = jnp.minimum(lin // (k_tiles * n_tiles), g - 1)
            return tuple(r[gi] for r in refs)

        def scoped(ring, wg, t_wg, out_smem):
            @pl.when(wg == nw)
            def _():
                plgpu.set_max_registers(cfg.memory_registers, action="decrease")
                gmem = (a_gmem, b_gmem, as_gmem, bs_gmem)
                _ring_loads(ring, (stages, bm, bn), place, ahead, (first_ref, steps_ref), gmem, num_tiles)

            @pl.when(wg < nw)
            def _():
                plgpu.set_max_registers(gpu_common.compute_registers(cfg), action="increase")
                mine = pl.ds(wg * (bm // nw), bm // nw)

                def store(total, lin):
                    gi, k0, n0 = place(lin)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has left out_smem
                    out_smem.at[wg][...] = total.astype(out_dtype)
                    plgpu.commit_smem()
                    dst = out_gmem.at[gi].at[pl.ds(k0 + mine.start, mine.size), pl.ds(n0, bn)]
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], dst)

                step = _ring_step(cfg, ring, stages, mine, bn, t_wg, interpret)
                _ring_products(step, store, ahead, steps_ref, (bm // nw, bn), num_tiles, interpret)

        ring = dict(
            a=plgpu.SMEM((stages, bm, BLOCK_K), a_q.dtype, transforms=tf),
            b=plgpu.SMEM((stages, bn, BLOCK_K), b_q.dtype, transforms=tf),
            a_s=plgpu.SMEM((stages, 1, bm), jnp.float32),
            b_s=plgpu.SMEM((stages, 1, bn), jnp.float32),
            full=plgpu.Barrier(num_arrivals=4, num_barriers=stages),  # one arrival per operand's copy
            consumed=plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
        )
        t_shape = gpu_common.scratch(interpret, (nw, BLOCK_K, bn), b_q.dtype)
        gpu_common.ws_scope(ring, t_shape, plgpu.SMEM((nw, bm // nw, bn), out_dtype), scoped)
        plgpu.wait_smem_to_gmem(0)

    out_type = jax.ShapeDtypeStruct((g, k, n), out_dtype)
    return gpu_common.run(body, out_type, cfg, interpret)(first, steps, a_q, as_t, b_q, bs_t)


def _ring_step(cfg, ring, stages, mine, bn, t_wg, interpret):
    """A compute warpgroup's K step t of the ring: wait for slot t % stages to fill, run its rows `mine` of the
    step's product, release the slot as soon as the product and scales are in registers, promote into the sum."""

    def step(_, carry):
        t, total = carry
        slot, a, b, a_s, b_s = wait_slot(ring, t, stages, mine)
        release = functools.partial(plgpu.barrier_arrive, ring["consumed"].at[slot])
        total = promoted_step(cfg, a, b, a_s, b_s, total, t_wg, (mine.size, bn), interpret, release=release)
        return t + 1, total

    return step


def wait_slot(ring, t, stages, mine):
    """A ring's K step t once its slot t % stages has filled: (slot, a's rows `mine`, b, their scales)."""
    slot = lax.rem(t, stages)
    plgpu.barrier_wait(ring["full"].at[slot])
    return (
        slot,
        ring["a"].at[slot].at[mine],
        ring["b"].at[slot],
        ring["a_s"].at[slot].at[0, mine],
        ring["b_s"].at[slot].at[0],
    )


def _read_ahead_fold(num_tiles, ahead, refs, tile):
    """persistent_fold over this CTA's tiles of the ring's step counter t: tile(lin, t, values) -> t, values being
    refs' entries for the tile's group, read one tile earlier (ahead). Returns the CTA's step count."""
    nsm = lax.axis_size("sm")

    def body(lin, carry):
        t, values = carry
        upcoming = ahead(lin + nsm, refs)
        return tile(lin, t, values), upcoming

    t, _ = gpu_common.persistent_fold(num_tiles, body, (jnp.int32(0), ahead(lax.axis_index("sm"), refs)))
    return t


def _ring_products(step, store, ahead, steps_ref, shape, num_tiles, interpret):
    """A compute warpgroup's tiles: each one's K steps (step count read a tile ahead) summed and stored."""

    def tile(lin, t, values):
        (count,) = values
        t, total = lax.fori_loop(0, count, step, (t, zero_sum(shape, interpret)))
        store(total, lin)
        return t

    _read_ahead_fold(num_tiles, ahead, (steps_ref,), tile)


def _ring_loads(ring, shape, place, ahead, refs, gmem, num_tiles):
    """The memory warpgroup of _fp8_tgmm_ring: every K step of the CTA's tiles into the next slot, once the compute
    warpgroups have released that slot's previous step; then it waits out their last releases, so every barrier
    phase it began is complete when the kernel ends. refs: (first step, step count) of each group."""
    a_gmem, b_gmem, as_gmem, bs_gmem = gmem
    stages, bm, bn = shape  # the ring's slots, a tile's rows and columns

    def tile(lin, t, values):
        first, count = values
        _, k0, n0 = place(lin)

        def step(kk, t):
            slot = lax.rem(t, stages)
            pl.when(t >= stages)(lambda: plgpu.barrier_wait(ring["consumed"].at[slot]))
            r = first + kk
            cols = pl.ds(r * BLOCK_K, BLOCK_K)
            full = ring["full"].at[slot]
            plgpu.copy_gmem_to_smem(a_gmem.at[pl.ds(k0, bm), cols], ring["a"].at[slot], full)
            plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(n0, bn), cols], ring["b"].at[slot], full)
            plgpu.copy_gmem_to_smem(as_gmem.at[pl.ds(r, 1), pl.ds(k0, bm)], ring["a_s"].at[slot], full)
            plgpu.copy_gmem_to_smem(bs_gmem.at[pl.ds(r, 1), pl.ds(n0, bn)], ring["b_s"].at[slot], full)
            return t + 1

        return lax.fori_loop(0, count, step, t)

    total = _read_ahead_fold(num_tiles, ahead, refs, tile)

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(t):
        plgpu.barrier_wait(ring["consumed"].at[lax.rem(t, stages)])
