"""MLA decode over a paged latent cache in Pallas Mosaic TPU.

Grid (sequence, split, page step). The block table and lengths are scalar-prefetch operands, so the
KV BlockSpec's index map sends each step's DMA straight to the page it needs; steps past a split's
last page repeat that page's block index, which Pallas does not fetch again. Each step attends all of
the sequence's s_q * H query rows to one page (QK^T over the full 576-wide rows, P V over the first
512 columns of the same VMEM block, so a page is read once for all heads) with an online float32
softmax in VMEM scratch; the last step normalises and writes the output and lse.

Split-KV as on GPU (common.py): with num_splits > 1 the outputs are float32 partials that
common.combine merges. Rows past a sequence's length are zeroed before P V, so stale or NaN cache rows
in its last page cannot reach the output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla_decode import common
from pallas_kernels.mla_decode.common import V_DIM


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    num_splits: int = 1  # > 1 lets megacore / multi-core chips share long sequences


def unsupported(q, kv_pages, config):
    if kv_pages.shape[1] % 8:
        return f"page_size must be a multiple of 8, got {kv_pages.shape[1]}"
    if q.shape[-1] <= V_DIM:
        return f"row width must exceed {V_DIM}, got {q.shape[-1]}"
    return None


def _kernel(
    len_ref, bt_ref, q_ref, kv_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, s_q, h, splits, page, max_pages, scale
):
    b, sp, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    start, steps = common.block_range(length, sp, splits, page, max_pages)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, common.M_INIT)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(j < steps)
    def _():
        q = q_ref[...]
        kv = kv_ref[...]
        rows = q.shape[0]
        pos0 = (start + j) * page
        kv_pos = pos0 + lax.broadcasted_iota(jnp.int32, (page, 1), 0)
        kv = jnp.where(kv_pos < length, kv, jnp.zeros_like(kv))
        s = lax.dot_general(q, kv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * scale
        row = lax.broadcasted_iota(jnp.int32, (rows, page), 0)
        query = jnp.zeros_like(row)
        for k in range(1, s_q):  # query index of row r is r // H; s_q is tiny
            query = query + jnp.where(row >= k * h, 1, 0)
        cols = pos0 + lax.broadcasted_iota(jnp.int32, (rows, page), 1)
        s = jnp.where(cols < length - s_q + 1 + query, s, -jnp.inf)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_old - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(kv.dtype), kv[:, :V_DIM], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        l = l_sc[...]
        inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        o_ref[...] = (acc_sc[...] * inv).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def mla_decode(q, kv_pages, block_table, lengths, *, softmax_scale, config=None, interpret=False):
    """See ops.mla_decode; inputs already checked. Returns (out [B, s_q, H, 512], lse [B, s_q, H])."""
    cfg = config or TpuConfig()
    b, s_q, h, d = q.shape
    num_pages, page, _ = kv_pages.shape
    max_pages = block_table.shape[1]
    rows = s_q * h
    rows_p = common.round_up(rows, 8)
    splits = max(1, min(cfg.num_splits, max_pages))
    per = common.cdiv(max_pages, splits)
    q2 = common.pad_rows(q.reshape(b, rows, d), rows_p)
    table = block_table.reshape(-1)

    def kv_map(bi, sp, j, len_ref, bt_ref):
        start, steps = common.block_range(len_ref[bi], sp, splits, page, max_pages)
        # Past the split's last page: repeat its block index, so nothing new is fetched. An empty
        # split reads table column 0, and a table entry is clipped into range: entries past a
        # sequence's pages may hold anything.
        jj = jnp.where(steps > 0, start + jnp.clip(j, 0, steps - 1), 0)
        return jnp.clip(bt_ref[bi * max_pages + jj], 0, num_pages - 1), 0, 0

    out_dtype = q.dtype if splits == 1 else jnp.float32
    kernel = lambda *refs: _kernel(
        *refs, s_q=s_q, h=h, splits=splits, page=page, max_pages=max_pages, scale=float(softmax_scale)
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, splits, per),
            in_specs=[
                pl.BlockSpec((None, rows_p, d), lambda bi, sp, j, *_: (bi, 0, 0)),
                pl.BlockSpec((None, page, d), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, rows_p, V_DIM), lambda bi, sp, j, *_: (bi, sp, 0, 0)),
                pl.BlockSpec((None, None, rows_p, 1), lambda bi, sp, j, *_: (bi, sp, 0, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((rows_p, 1), jnp.float32),
                pltpu.VMEM((rows_p, 1), jnp.float32),
                pltpu.VMEM((rows_p, V_DIM), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, splits, rows_p, V_DIM), out_dtype),
            jax.ShapeDtypeStruct((b, splits, rows_p, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(lengths, table, q2, kv_pages)
    lse = lse[..., 0]
    if splits == 1:
        out, lse = out[:, 0], lse[:, 0]
    else:
        out, lse = common.combine(out, lse, q.dtype)
    return out[:, :rows].reshape(b, s_q, h, V_DIM), lse[:, :rows].reshape(b, s_q, h)
