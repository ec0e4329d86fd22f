"""Device-side pieces both Mosaic GPU MLA decode kernels share: the "simple" kernel (gpu.py) and the
warp-specialized "ws" kernel (gpu_ws.py). See gpu.py's module doc for the algorithm.

`dm` is the call's static sizes (gpu.Dims); every function here runs inside a kernel body.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode import common
from pallas_kernels.mla_decode.common import V_DIM

BM = 64  # query rows per CTA: the wgmma M tile
HALF = 256  # output columns per warpgroup (wgmma N <= 256)


def _row_layout():
    layout = plgpu.Layout.WGMMA
    return layout.reduce(1) if hasattr(layout, "reduce") else plgpu.Layout.WGMMA_ROW


def smem_transforms():
    """smem tiling + swizzle of the Q, KV and P buffers."""
    # 128-byte swizzle: 64 bf16 columns per tile, the layout wgmma and TMA both want.
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def cast(x, layout, dm):
    """plgpu.layout_cast; the interpreter has no layouts (and no rule for the primitive)."""
    if dm.interpret:
        return x
    return plgpu.layout_cast(x, _row_layout() if layout == "row" else layout)


def row_full(value, dm):
    """[BM] float32 row vector (row max / sum) filled with `value`, in the WGMMA row layout."""
    return cast(jnp.full((BM,), value, jnp.float32), "row", dm)


def zeros_acc(cols, dm):
    """[BM, cols] float32 zeros in the WGMMA layout: a fresh O accumulator chunk."""
    return cast(jnp.zeros((BM, cols), jnp.float32), plgpu.Layout.WGMMA, dm)


def rows_bcast(v, shape):
    """Broadcast a per-row vector [rows] to `shape` along the columns."""
    return lax.broadcast_in_dim(v, shape, [0])


def cta_ranges(len_ref, dm, split, b):
    """(length, first block, blocks, blocks before masking starts) of this CTA's split."""
    length = len_ref[b]
    start, steps = common.block_range(length, split, dm.splits, dm.bkv, dm.max_blocks)
    nfull = jnp.clip(common.full_blocks(length, dm.s_q, dm.bkv) - start, 0, steps)
    return length, start, steps, nfull


def kv_block(bt_ref, kv_ref, b, blk, dm):
    """GMEM view of block `blk` of sequence b: 64 rows inside one page, found in the block table."""
    row = blk * dm.bkv
    page = jnp.clip(bt_ref[b, lax.div(row, dm.page_size)], 0, dm.num_pages - 1)  # no wild TMA
    return kv_ref.at[page, pl.ds(pl.multiple_of(lax.rem(row, dm.page_size), dm.bkv), dm.bkv)]


def load_kv(bt_ref, kv_ref, kv_smem, kv_bar, b, blk, slot, dm):
    """TMA block `blk` of sequence b into ring slot `slot`."""
    plgpu.copy_gmem_to_smem(kv_block(bt_ref, kv_ref, b, blk, dm), kv_smem.at[slot], kv_bar.at[slot])


def load_q(q_ref, q_smem, q_bar, b, m0, dm):
    """TMA this CTA's query rows [m0, m0 + rq) of sequence b into q_smem."""
    dst = q_smem if dm.rq == BM else q_smem.at[pl.ds(0, dm.rq)]
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(m0, dm.rq)], dst, q_bar.at[0])


def scores(q_smem, tile, kt_smem, dm):
    """S = Q K^T * scale * log2(e) for one [bkv, 576] tile, float32 [64, bkv] in registers."""
    if kt_smem is None:
        k_t = plgpu.transpose_ref(tile, (1, 0))
    else:  # interpreter: no transposed wgmma operands
        kt_smem[...] = tile[...].T
        k_t = kt_smem

    def body(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_t)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((BM, dm.bkv), jnp.float32)) * dm.scale_log2


def mask_scores(s, blk, m0, length, dm):
    """-inf where row r (query (m0 + r) // H) may not see the position."""
    rows = cast(lax.broadcasted_iota(jnp.int32, s.shape, 0), plgpu.Layout.WGMMA, dm)
    cols = cast(lax.broadcasted_iota(jnp.int32, s.shape, 1), plgpu.Layout.WGMMA, dm)
    limit = lax.div(rows + m0, dm.h) + (length - dm.s_q + 1)
    return jnp.where(cols + blk * dm.bkv < limit, s, -jnp.inf)


def softmax_step(s, m, l):
    """Online softmax in base 2: new P (float32), rescale factor of the old O, new max and sum."""
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - rows_bcast(m_new, s.shape))
    return p, alpha, m_new, l * alpha + p.sum(axis=1)


def pv_update(o_chunks, alpha, a, tile, col0, dm):
    """Each O chunk (64 x pv_chunk, float32) <- chunk * alpha + P @ V[:, cols]. `a` is P in
    registers (bf16) or its smem ref."""
    cw = dm.cfg.pv_chunk
    inplace = dm.cfg.pv_inplace and not dm.interpret
    new = []
    for c, oc in enumerate(o_chunks):
        oc = oc * rows_bcast(alpha, oc.shape)
        v = tile.at[:, pl.ds(col0 + c * cw, cw)]
        if inplace:
            oc = pl.run_state(lambda acc_ref, v=v: plgpu.wgmma(acc_ref, a, v))(plgpu.ACC.init(oc))
        else:

            def fresh(acc_ref, v=v):
                plgpu.wgmma(acc_ref, a, v)
                return acc_ref[...]

            oc = oc + pl.run_scoped(fresh, plgpu.ACC((BM, cw), jnp.float32))
        new.append(oc)
    return tuple(new)


def finish_rows(m, l):
    """(1 / l or 0, natural-log lse or -inf) for the final row max (base 2) and sum."""
    inv = jnp.where(l > 0, 1.0 / l, 0.0)
    lse = jnp.where(l > 0, m * common.LN2 + jnp.log(l), -jnp.inf)
    return inv, lse


def store_half(o_chunks, inv, stage, out_view, col0, dm):
    """Normalise this warpgroup's 256 output columns, stage them in smem (`stage`: 64 x 256 of the
    Q buffer, free once the last S is computed) and TMA them out. With splits, also the bf16 residual
    (lo) 512 columns further."""
    cw = dm.cfg.pv_chunk
    o_chunks = [oc * rows_bcast(inv, oc.shape) for oc in o_chunks]
    parts = [o_chunks]
    if dm.splits > 1:
        parts.append([oc - oc.astype(dm.dtype).astype(jnp.float32) for oc in o_chunks])
    for i, chunks in enumerate(parts):
        if i:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the hi copy has left the stage
        for c, oc in enumerate(chunks):
            stage.at[:, pl.ds(c * cw, cw)][...] = oc.astype(dm.dtype)
        plgpu.commit_smem()
        # TMA wants a contiguous smem box: in the (8, 64)-tiled Q buffer that is 8 rows of the
        # column slice, so the stage leaves in 8-row pieces.
        for r in range(0, dm.rq, 8):
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(r, 8)], out_view.at[pl.ds(r, 8), pl.ds(i * V_DIM + col0, HALF)])


def store_lse(lse, lse_smem, lse_view, dm):
    """Stage the lse row vector in smem and TMA its first rq rows out."""
    lse_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(lse_smem if dm.rq == BM else lse_smem.at[pl.ds(0, dm.rq)], lse_view)


def out_views(out_ref, lse_ref, b, split, m0, dm):
    """GMEM views of this CTA's output rows and lse rows (per split when splitting)."""
    if dm.splits == 1:
        return out_ref.at[b, pl.ds(m0, dm.rq)], lse_ref.at[b, pl.ds(m0, dm.rq)]
    return out_ref.at[b, split, pl.ds(m0, dm.rq)], lse_ref.at[b, split, pl.ds(m0, dm.rq)]
