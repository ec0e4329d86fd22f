"""The warp-specialized MLA decode kernel ("ws"): 3 warpgroups per CTA of 64 query rows.

wg0: S = Q K^T (64 x 64 per block, 576 deep), mask, online softmax, then O[:, :256] += P V.
     It hands P (bf16) and the rescale factors alpha to wg1 through smem (p_smem, vec_smem).
wg1: O[:, 256:] = O * alpha + P V[:, 256:] for each block.
wg2: the producer: TMA copies of KV blocks, located through the block table, into a ring of
     `stages` smem slots, each released when both consumers are done with it (kv_free: 2 arrivals).

Handshakes per block t (slot = t % stages):
  kv_full[slot]  TMA -> wg0, wg1       the block has landed
  p_full         wg0 -> wg1            P_t and alpha_t are in smem
  p_free         wg1 -> wg0            wg1 has read P_t, alpha_t (wg0 waits before writing P_{t+1})
  kv_free[slot]  wg0 + wg1 -> wg2      the slot may be refilled
After its loop wg0 sends one more p_full carrying 1/l instead of alpha, so wg1 can normalise its half.
With one P buffer wg0's softmax of block t+1 overlaps wg1's PV of block t; a second P buffer would not
fit next to Q and two 72 KB KV stages.

The output is staged through the Q buffer: wg0 writes columns [0, 256) after its last S; wg1 writes
[256, 512) only after the final p_full, which wg0 sends after its last S, so Q is no longer read.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode import common
from pallas_kernels.mla_decode import gpu as g


def _wg0(refs, ctx, dm):
    (q_ref, kv_ref, out_ref, lse_ref, q_smem, kv_smem, p_smem, vecs, kt_smem, bars) = refs
    vec_smem, lse_smem = vecs.at[0], vecs.at[1]
    q_bar, kv_full, kv_free, p_full, p_free = bars
    b, split, m0, length, start, steps, nfull = ctx
    g.load_q(q_ref, q_smem, q_bar, b, m0, dm)
    plgpu.barrier_wait(q_bar.at[0])
    nchunks = g.HALF // dm.cfg.pv_chunk

    def handoff(t, vec):
        """Publish (P, vec) to wg1 once it has read the previous pair; t > 0 means one exists."""
        @pl.when(t > 0)
        def _():
            plgpu.barrier_wait(p_free.at[0])
        vec_smem[...] = vec

    def step(t, carry, masked):
        o, m, l = carry
        slot = lax.rem(t, dm.stages)
        tile = kv_smem.at[slot]
        plgpu.barrier_wait(kv_full.at[slot])
        s = g.scores(q_smem, tile, kt_smem, dm)
        if masked:
            s = g.mask_scores(s, start + t, m0, length, dm)
        p, alpha, m, l = g.softmax_step(s, m, l)
        p16 = p.astype(dm.dtype)
        handoff(t, alpha)
        p_smem[...] = p16
        plgpu.commit_smem()  # also orders the smem writes before wgmma's async reads of p_smem
        plgpu.barrier_arrive(p_full.at[0])
        a = p16 if dm.cfg.p_in_registers and not dm.interpret else p_smem
        o = g.pv_update(o, alpha, a, tile, 0, dm)
        plgpu.barrier_arrive(kv_free.at[slot])
        return o, m, l

    carry = (tuple(g.zeros_acc(dm.cfg.pv_chunk, dm) for _ in range(nchunks)),
             g.row_full(common.M_INIT, dm), g.row_full(0.0, dm))
    carry = lax.fori_loop(0, nfull, functools.partial(step, masked=False), carry)
    o, m, l = lax.fori_loop(nfull, steps, functools.partial(step, masked=True), carry)
    inv, lse = g.finish_rows(m, l)
    handoff(steps, inv)
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_full.at[0])
    out_view, lse_view = g.out_views(out_ref, lse_ref, b, split, m0, dm)
    g.store_half(o, inv, q_smem.at[:, pl.ds(0, g.HALF)], out_view, 0, dm)
    g.store_lse(lse, lse_smem, lse_view, dm)
    plgpu.wait_smem_to_gmem(0)


def _wg1(refs, ctx, dm):
    (_, _, out_ref, lse_ref, q_smem, kv_smem, p_smem, vecs, _, bars) = refs
    vec_smem = vecs.at[0]
    _, kv_full, kv_free, p_full, p_free = bars
    b, split, m0, _, _, steps, _ = ctx
    nchunks = g.HALF // dm.cfg.pv_chunk
    regs = dm.cfg.p_in_registers and not dm.interpret

    def step(t, o):
        slot = lax.rem(t, dm.stages)
        tile = kv_smem.at[slot]
        plgpu.barrier_wait(p_full.at[0])
        plgpu.barrier_wait(kv_full.at[slot])  # makes the TMA-written tile visible to this warpgroup
        alpha = g.cast(vec_smem[...], "row", dm)
        if regs:
            a = g.cast(p_smem[...], plgpu.Layout.WGMMA, dm)
            plgpu.barrier_arrive(p_free.at[0])  # P and alpha are in registers now
        else:
            a = p_smem
        o = g.pv_update(o, alpha, a, tile, g.HALF, dm)
        if not regs:
            plgpu.barrier_arrive(p_free.at[0])  # the wgmma has finished reading p_smem
        plgpu.barrier_arrive(kv_free.at[slot])
        return o

    o = lax.fori_loop(0, steps, step, tuple(g.zeros_acc(dm.cfg.pv_chunk, dm) for _ in range(nchunks)))
    plgpu.barrier_wait(p_full.at[0])
    inv = g.cast(vec_smem[...], "row", dm)
    out_view, _ = g.out_views(out_ref, lse_ref, b, split, m0, dm)
    g.store_half(o, inv, q_smem.at[:, pl.ds(g.HALF, g.HALF)], out_view, g.HALF, dm)
    plgpu.wait_smem_to_gmem(0)


def _producer(bt_ref, kv_ref, kv_smem, kv_full, kv_free, ctx, dm):
    b, _, _, _, start, steps, _ = ctx
    for i in range(dm.stages):
        pl.when(i < steps)(functools.partial(
            g.load_kv, bt_ref, kv_ref, kv_smem, kv_full, b, start + i, i, dm))

    def refill(t, c):
        slot = lax.rem(t, dm.stages)
        src = g.kv_block(bt_ref, kv_ref, b, start + t, dm)  # table read overlaps the wait
        plgpu.barrier_wait(kv_free.at[slot])  # both consumers are done with block t - stages
        plgpu.copy_gmem_to_smem(src, kv_smem.at[slot], kv_full.at[slot])
        return c

    lax.fori_loop(dm.stages, jnp.maximum(steps, dm.stages), refill, None)

    # Observe the last releases too. Nothing needs them on a GPU, but the interpreter insists that a
    # thread that waited on a barrier saw every one of its phases.
    def drain(t, c):
        plgpu.barrier_wait(kv_free.at[lax.rem(t, dm.stages)])
        return c

    lax.fori_loop(jnp.maximum(steps - dm.stages, 0), steps, drain, None)


def body(len_ref, bt_ref, q_ref, kv_ref, out_ref, lse_ref, *, dm):
    split, b = lax.axis_index("split"), lax.axis_index("b")
    m0 = lax.axis_index("m") * dm.rq
    length, start, steps, nfull = g.cta_ranges(len_ref, dm, split, b)
    ctx = (b, split, m0, length, start, steps, nfull)
    tf = g.smem_transforms()

    def scoped(q_smem, kv_smem, p_smem, vecs, kt_smem, *bars):
        wg = lax.axis_index("wg")
        refs = (q_ref, kv_ref, out_ref, lse_ref, q_smem, kv_smem, p_smem, vecs, kt_smem, bars)

        @pl.when(wg == 0)
        def _():
            plgpu.set_max_registers(232, action="increase")
            _wg0(refs, ctx, dm)

        @pl.when(wg == 1)
        def _():
            plgpu.set_max_registers(232, action="increase")
            _wg1(refs, ctx, dm)

        @pl.when(wg == 2)
        def _():
            plgpu.set_max_registers(40, action="decrease")
            _producer(bt_ref, kv_ref, kv_smem, bars[1], bars[2], ctx, dm)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((g.BM, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((dm.stages, dm.bkv, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((g.BM, dm.bkv), dm.dtype, transforms=tf),
        plgpu.SMEM((2, g.BM), jnp.float32),  # [0]: alpha / 1/l for wg1, [1]: lse (one 1 KB slot)
        plgpu.SMEM((dm.d, dm.bkv), dm.dtype, transforms=tf) if dm.interpret else None,
        plgpu.Barrier(num_barriers=1),  # q loaded
        plgpu.Barrier(num_barriers=dm.stages),  # kv_full (TMA)
        plgpu.Barrier(num_arrivals=2, num_barriers=dm.stages),  # kv_free
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # p_full
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # p_free
        collective_axes="wg",
    )
