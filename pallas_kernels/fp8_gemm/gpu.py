"""FP8 grouped matmul in Pallas Mosaic GPU (Hopper): e4m3 wgmma with DeepSeek-V3's per-128-K promotion.

One warpgroup per CTA, persistent over the tiles of the bf16 gmm (pallas_kernels/grouped_matmul/gpu.py: same
tile list, tile order, ragged-row stores and zero tail). K steps by 128, the scaling granularity: each step's
wgmma (both operands K-major, as FP8 wgmma requires) accumulates into a fresh register accumulator, which is then
scaled by the step's activation-tile scales (one per row) and weight-block scales (one per column, expanded from
the 128 x 128 blocks before the kernel) and added into the float32 running sum. That bounds every hardware
accumulation to 128 products (Hopper's FP8 wgmma accumulates with ~14 bits), the promotion DeepSeek describes.

Operands (ops.py builds them from quantize_tiles / quantize_blocks):
  x_q [M, K] e4m3, xs_t [K/128, M] float32 (tile scales, transposed: a tile's rows are one contiguous load)
  w_q [G, N, K] e4m3 (K-major), ws_cols [G, K/128, N] float32 (each block scale repeated over its 128 columns)
Requires M % 8 == 0, M >= block_m, K % 128 == 0, N % block_n == 0 (ops.py pads).
Not yet warp-specialized (the bf16 gmm's memory/compute warpgroup split and tile chaining are the next step).
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
from pallas_kernels.grouped_matmul.gpu import gmm_tiles, store_rows

BLOCK_K = 128  # = the scaling tile: one promotion per K step


@dataclasses.dataclass(frozen=True)
class Fp8GpuConfig:
    # 64: the running sum and each step's fresh accumulator are both live, 2 x 64 x 128 float32 = 128 registers a
    # thread in one warpgroup (two 128-row accumulators would need 256, past the 255-register limit)
    block_m: int = 64
    block_n: int = 128
    max_concurrent_steps: int = 4
    grid_tile_n: int = 8  # tile order: strips of this many N tiles (as the bf16 gmm's forward)
    num_sms: int | None = None  # None: the device's SM count (2 in interpret mode)
    warp_specialized: bool = False  # gpu_common reads it: one warpgroup


def _vector(ref, layout, interpret):
    """A 1-D smem vector in registers, laid out to broadcast along the accumulator's rows or columns. jax 0.10's
    GPU interpreter has no plgpu.load; a plain read stands in for it there."""
    return ref[...] if interpret else plgpu.load(ref, (), layout=layout)


def fp8_gmm(x_q, xs_t, w_q, ws_cols, group_sizes, *, config=None, interpret=False, out_dtype=jnp.bfloat16):
    """[M, K] x [G, N, K] -> [M, N] in out_dtype (rows past sum(group_sizes): zeros)."""
    cfg = config or Fp8GpuConfig()
    m, k = x_q.shape
    n = w_q.shape[1]
    bm, bn, bk = cfg.block_m, cfg.block_n, BLOCK_K
    k_steps, n_tiles = k // bk, n // bn
    mcs = max(2, min(cfg.max_concurrent_steps, k_steps))
    count, tgroup, trow0, tlo, trows = gmm_tiles(group_sizes, m, bm)
    tf = gpu_common.transforms(bk, x_q.dtype)
    specs = [
        plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=tf, delay_release=1),
        plgpu.BlockSpec((bn, bk), lambda kk: (0, kk), transforms=tf, delay_release=1),
        plgpu.BlockSpec((1, bm), lambda kk: (kk, 0), delay_release=1),
        plgpu.BlockSpec((1, bn), lambda kk: (kk, 0), delay_release=1),
    ]
    t_shape = gpu_common.scratch(interpret, (bk, bn), w_q.dtype)
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def body(count_ref, group_ref, row0_ref, lo_ref, rows_ref, x_gmem, xs_gmem, w_gmem, ws_gmem, out_gmem):
        def tile(_, lin, __):
            mt, nt = gpu_common.tile_order(lin, count_ref[0], n_tiles, cfg.grid_tile_n)
            gi = jnp.maximum(group_ref[mt], 0)
            row0, n0 = pl.multiple_of(row0_ref[mt], 8), nt * bn
            steps = jnp.where(group_ref[mt] >= 0, k_steps, 0)  # zero-tail tiles load nothing

            def with_scratch(t_smem):
                def step(_, x_smem, w_smem, xs_smem, ws_smem, total):
                    def product(acc_ref):
                        plgpu.wgmma(acc_ref, x_smem, gpu_common.transposed(w_smem, t_smem))
                        return acc_ref[...]

                    part = pl.run_scoped(product, plgpu.ACC((bm, bn), jnp.float32))
                    xs = _vector(xs_smem.at[0], row_layout, interpret)
                    ws = _vector(ws_smem.at[0], col_layout, interpret)
                    scale = lax.broadcast_in_dim(xs, (bm, bn), [0]) * lax.broadcast_in_dim(ws, (bm, bn), [1])
                    return total + part * scale

                zero = jnp.zeros((bm, bn), jnp.float32)
                if not interpret:  # the interpreter has no layouts
                    zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
                return plgpu.emit_pipeline(
                    step, grid=(steps,), in_specs=specs, max_concurrent_steps=mcs, init_carry=zero
                )(
                    x_gmem.at[pl.ds(row0, bm), :],
                    w_gmem.at[gi].at[pl.ds(n0, bn), :],
                    xs_gmem.at[:, pl.ds(row0, bm)],
                    ws_gmem.at[gi].at[:, pl.ds(n0, bn)],
                )

            total = with_scratch(None) if t_shape is None else pl.run_scoped(with_scratch, t_shape)

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
