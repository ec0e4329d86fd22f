"""Grouped matmul (gmm) and its weight gradient (tgmm) in Pallas Mosaic TPU.

The grid walks "visits": (group, row block) pairs in row order, computed with jnp ops before the
kernel and passed as scalar-prefetch operands. Row blocks are aligned to block_m, so a block that
holds the end of one group and the start of the next is visited once per group; each visit masks the
rows outside its group (select, so NaN/Inf in foreign rows cannot leak) and adds into a float32 VMEM
accumulator that lives across consecutive visits of the same output block.

gmm grid (N tiles, visits, K tiles): output block (row block, N tile), written at its last visit.
Row blocks past sum(group_sizes) get one visit with no group, which writes zeros.
tgmm grid (K tiles, N tiles, visits): output block (group, K tile, N tile), written at the group's
last visit; an empty group gets one fully masked visit, so it writes zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul.reference import group_of


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    block_m: int = 128
    block_k: int = 128
    block_n: int = 128


def _round_up(x, m):
    return -(-x // m) * m


def _pad_to(x, shape):
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _bounds(group_sizes):
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def _expand(counts, firsts, length):
    """Visit t -> (owner, block): owner o repeats counts[o] times over blocks firsts[o], +1, ..."""
    cum = jnp.cumsum(counts)
    t = jnp.arange(length, dtype=jnp.int32)
    owner = jnp.minimum(group_of(cum, t), counts.shape[0] - 1)
    block = firsts[owner] + t - (cum - counts)[owner]
    valid = t < cum[-1]
    last = jnp.maximum(cum[-1] - 1, 0)
    return owner.astype(jnp.int32), jnp.where(valid, block, block[last]).astype(jnp.int32), valid


def gmm_visits(group_sizes, m, block_m):
    g = group_sizes.shape[0]
    nb = m // block_m
    starts, ends = _bounds(group_sizes)
    first = starts // block_m
    counts = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    tail = (ends[-1] + block_m - 1) // block_m  # first block holding no group's row
    counts = jnp.concatenate([counts, (nb - tail)[None]])
    firsts = jnp.concatenate([first, tail[None]])
    owner, block, valid = _expand(counts, firsts, nb + g)
    return jnp.where(valid, owner, g).astype(jnp.int32), block  # owner g: no group, zeros


def tgmm_visits(group_sizes, m, block_m):
    g = group_sizes.shape[0]
    nb = m // block_m
    starts, ends = _bounds(group_sizes)
    first = jnp.minimum(starts // block_m, nb - 1)
    counts = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 1)
    owner, block, valid = _expand(counts, first, nb + 2 * g)
    return owner, block, valid.astype(jnp.int32)


def _row_mask(block, start, end, shape):
    rows = block * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _call(kernel, grid, in_specs, out_spec, out_shape, scratch, interpret, num_prefetch):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_prefetch, grid=grid, in_specs=in_specs, out_specs=out_spec, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",) * 3),
        interpret=pltpu.InterpretParams() if interpret else False,
    )


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, config=None, interpret=False, out_dtype=None):
    """lhs [M, K] x rhs [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]."""
    cfg = config or TpuConfig()
    out_dtype = out_dtype or lhs.dtype
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bm, bk, bn = min(cfg.block_m, _round_up(m, 8)), min(cfg.block_k, k), min(cfg.block_n, n)
    mp, kp, np_ = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
    lhs = _pad_to(lhs, (mp, kp))  # zero K padding adds nothing; extra rows are past sum(gs)
    rhs = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    vgroup, vblock = gmm_visits(group_sizes, mp, bm)
    starts, ends = _bounds(group_sizes)
    nv = vgroup.shape[0]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(vg, vb, st, en, lhs_ref, rhs_ref, out_ref, acc_ref):
        t, kk = pl.program_id(1), pl.program_id(2)
        b, grp = vb[t], vg[t]
        first = (t == 0) | (vb[jnp.maximum(t - 1, 0)] != b)
        last = (t == nv - 1) | (vb[jnp.minimum(t + 1, nv - 1)] != b)

        @pl.when(first & (kk == 0))
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(grp < g)
        def _():
            gi = jnp.minimum(grp, g - 1)
            x = lhs_ref[...]
            x = jnp.where(_row_mask(b, st[gi], en[gi], x.shape), x, jnp.zeros_like(x))
            acc_ref[...] += lax.dot_general(
                x, rhs_ref[...], dims, precision=_precision(x.dtype), preferred_element_type=jnp.float32
            )

        @pl.when(last & (kk == pl.num_programs(2) - 1))
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    def rhs_map(ni, t, kk, vg, vb, st, en):
        gi = jnp.minimum(vg[t], g - 1)
        return (gi, ni, kk) if transpose_rhs else (gi, kk, ni)

    in_specs = [
        pl.BlockSpec((bm, bk), lambda ni, t, kk, vg, vb, st, en: (vb[t], kk)),
        pl.BlockSpec((None, bn, bk) if transpose_rhs else (None, bk, bn), rhs_map),
    ]
    out_spec = pl.BlockSpec((bm, bn), lambda ni, t, kk, vg, vb, st, en: (vb[t], ni))
    out = _call(
        kernel,
        (np_ // bn, nv, kp // bk),
        in_specs,
        out_spec,
        jax.ShapeDtypeStruct((mp, np_), out_dtype),
        [pltpu.VMEM((bm, bn), jnp.float32)],
        interpret,
        4,
    )(vgroup, vblock, starts, ends, lhs, rhs)
    return out[:m, :n]


def tgmm(lhs, dout, group_sizes, *, config=None, interpret=False, out_dtype=None):
    """lhs [M, K], dout [M, N] -> [G, K, N]; out[g] = lhs[rows of g].T @ dout[rows of g]."""
    cfg = config or TpuConfig()
    out_dtype = out_dtype or lhs.dtype
    m, k = lhs.shape
    n = dout.shape[1]
    g = group_sizes.shape[0]
    bm, bk, bn = min(cfg.block_m, _round_up(m, 8)), min(cfg.block_k, k), min(cfg.block_n, n)
    mp, kp, np_ = _round_up(m, bm), _round_up(k, bk), _round_up(n, bn)
    lhs, dout = _pad_to(lhs, (mp, kp)), _pad_to(dout, (mp, np_))
    vgroup, vblock, vvalid = tgmm_visits(group_sizes, mp, bm)
    starts, ends = _bounds(group_sizes)
    nv = vgroup.shape[0]

    def kernel(vg, vb, vv, st, en, lhs_ref, dout_ref, out_ref, acc_ref):
        t = pl.program_id(2)
        grp, b = vg[t], vb[t]
        first = (t == 0) | (vg[jnp.maximum(t - 1, 0)] != grp)
        last = (t == nv - 1) | (vg[jnp.minimum(t + 1, nv - 1)] != grp)

        @pl.when(first)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(vv[t] != 0)
        def _():
            x, y = lhs_ref[...], dout_ref[...]
            keep = _row_mask(b, st[grp], en[grp], (x.shape[0], 1))
            x = jnp.where(keep, x, jnp.zeros_like(x))
            y = jnp.where(keep, y, jnp.zeros_like(y))
            acc_ref[...] += lax.dot_general(
                x, y, (((0,), (0,)), ((), ())), precision=_precision(x.dtype), preferred_element_type=jnp.float32
            )

        @pl.when(last)
        def _():
            out_ref[...] = acc_ref[...].astype(out_ref.dtype)

    in_specs = [
        pl.BlockSpec((bm, bk), lambda ki, ni, t, vg, vb, vv, st, en: (vb[t], ki)),
        pl.BlockSpec((bm, bn), lambda ki, ni, t, vg, vb, vv, st, en: (vb[t], ni)),
    ]
    out_spec = pl.BlockSpec((None, bk, bn), lambda ki, ni, t, vg, vb, vv, st, en: (vg[t], ki, ni))
    out = _call(
        kernel,
        (kp // bk, np_ // bn, nv),
        in_specs,
        out_spec,
        jax.ShapeDtypeStruct((g, kp, np_), out_dtype),
        [pltpu.VMEM((bk, bn), jnp.float32)],
        interpret,
        5,
    )(vgroup, vblock, vvalid, starts, ends, lhs, dout)
    return out[:, :k, :n]
