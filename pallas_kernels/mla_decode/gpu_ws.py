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
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode import common, gpu_common
from pallas_kernels.mla_decode.gpu_common import BM, HALF

# Registers per thread (setmaxnreg): the producer gives up what the two consumer warpgroups take.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40


class CtaWork(NamedTuple):
    """What this CTA computes (traced ints): sequence `b`, KV split `split` and query rows from `m0`;
    the sequence's `length`, and its split's first block `start`, `steps` blocks, the first `nfull`
    of which need no mask."""

    b: Any
    split: Any
    m0: Any
    length: Any
    start: Any
    steps: Any
    nfull: Any


class Barriers(NamedTuple):
    """The CTA's barriers; the handshakes are in the module doc."""

    q_bar: Any  # Q has landed
    kv_full: Any  # [stages]: TMA -> wg0, wg1
    kv_free: Any  # [stages], 2 arrivals: wg0 + wg1 -> wg2
    p_full: Any  # wg0 -> wg1
    p_free: Any  # wg1 -> wg0


class KernelRefs(NamedTuple):
    """The kernel's GMEM operands, the CTA's smem buffers and its barriers."""

    q_ref: Any
    kv_ref: Any
    out_ref: Any
    lse_ref: Any
    q_smem: Any
    kv_smem: Any
    p_smem: Any
    vecs: Any  # [2, BM] float32: [0] alpha (1/l after the loop) for wg1, [1] lse
    kt_smem: Any  # K^T scratch in interpret mode, else None
    bars: Barriers


def _wg0(refs, work, dm):
    vec_smem, lse_smem = refs.vecs.at[0], refs.vecs.at[1]
    bars = refs.bars
    gpu_common.load_q(refs.q_ref, refs.q_smem, bars.q_bar, work.b, work.m0, dm)
    plgpu.barrier_wait(bars.q_bar.at[0])
    nchunks = HALF // dm.cfg.pv_chunk

    def handoff(t, vec):
        """Publish (P, vec) to wg1 once it has read the previous pair; t > 0 means one exists."""

        @pl.when(t > 0)
        def _():
            plgpu.barrier_wait(bars.p_free.at[0])

        vec_smem[...] = vec

    def step(t, carry, masked):
        o, m, l = carry
        slot = lax.rem(t, dm.stages)
        tile = refs.kv_smem.at[slot]
        plgpu.barrier_wait(bars.kv_full.at[slot])
        s = gpu_common.scores(refs.q_smem, tile, refs.kt_smem, dm)
        if masked:
            s = gpu_common.mask_scores(s, work.start + t, work.m0, work.length, dm)
        p, alpha, m, l = gpu_common.softmax_step(s, m, l)
        p16 = p.astype(dm.dtype)
        handoff(t, alpha)
        refs.p_smem[...] = p16
        plgpu.commit_smem()  # also orders the smem writes before wgmma's async reads of p_smem
        plgpu.barrier_arrive(bars.p_full.at[0])
        a = p16 if dm.cfg.p_in_registers and not dm.interpret else refs.p_smem
        o = gpu_common.pv_update(o, alpha, a, tile, 0, dm)
        plgpu.barrier_arrive(bars.kv_free.at[slot])
        return o, m, l

    carry = (
        tuple(gpu_common.zeros_acc(dm.cfg.pv_chunk, dm) for _ in range(nchunks)),
        gpu_common.row_full(common.M_INIT, dm),
        gpu_common.row_full(0.0, dm),
    )
    carry = lax.fori_loop(0, work.nfull, functools.partial(step, masked=False), carry)
    o, m, l = lax.fori_loop(work.nfull, work.steps, functools.partial(step, masked=True), carry)
    inv, lse = gpu_common.finish_rows(m, l)
    handoff(work.steps, inv)
    plgpu.commit_smem()
    plgpu.barrier_arrive(bars.p_full.at[0])
    out_view, lse_view = gpu_common.out_views(refs.out_ref, refs.lse_ref, work.b, work.split, work.m0, dm)
    gpu_common.store_half(o, inv, refs.q_smem.at[:, pl.ds(0, HALF)], out_view, 0, dm)
    gpu_common.store_lse(lse, lse_smem, lse_view, dm)
    plgpu.wait_smem_to_gmem(0)


def _wg1(refs, work, dm):
    vec_smem = refs.vecs.at[0]
    bars = refs.bars
    nchunks = HALF // dm.cfg.pv_chunk
    regs = dm.cfg.p_in_registers and not dm.interpret

    def step(t, o):
        slot = lax.rem(t, dm.stages)
        tile = refs.kv_smem.at[slot]
        plgpu.barrier_wait(bars.p_full.at[0])
        plgpu.barrier_wait(bars.kv_full.at[slot])  # makes the TMA-written tile visible to this warpgroup
        alpha = gpu_common.cast(vec_smem[...], "row", dm)
        if regs:
            a = gpu_common.cast(refs.p_smem[...], plgpu.Layout.WGMMA, dm)
            plgpu.barrier_arrive(bars.p_free.at[0])  # P and alpha are in registers now
        else:
            a = refs.p_smem
        o = gpu_common.pv_update(o, alpha, a, tile, HALF, dm)
        if not regs:
            plgpu.barrier_arrive(bars.p_free.at[0])  # the wgmma has finished reading p_smem
        plgpu.barrier_arrive(bars.kv_free.at[slot])
        return o

    o = lax.fori_loop(0, work.steps, step, tuple(gpu_common.zeros_acc(dm.cfg.pv_chunk, dm) for _ in range(nchunks)))
    plgpu.barrier_wait(bars.p_full.at[0])
    inv = gpu_common.cast(vec_smem[...], "row", dm)
    out_view, _ = gpu_common.out_views(refs.out_ref, refs.lse_ref, work.b, work.split, work.m0, dm)
    gpu_common.store_half(o, inv, refs.q_smem.at[:, pl.ds(HALF, HALF)], out_view, HALF, dm)
    plgpu.wait_smem_to_gmem(0)


def _producer(bt_ref, kv_ref, kv_smem, kv_full, kv_free, work, dm):
    b, start, steps = work.b, work.start, work.steps
    for i in range(dm.stages):
        pl.when(i < steps)(functools.partial(gpu_common.load_kv, bt_ref, kv_ref, kv_smem, kv_full, b, start + i, i, dm))

    def refill(t, c):
        slot = lax.rem(t, dm.stages)
        src = gpu_common.kv_block(bt_ref, kv_ref, b, start + t, dm)  # table read overlaps the wait
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
    length, start, steps, nfull = gpu_common.cta_ranges(len_ref, dm, split, b)
    work = CtaWork(b=b, split=split, m0=m0, length=length, start=start, steps=steps, nfull=nfull)
    tf = gpu_common.smem_transforms()

    def scoped(q_smem, kv_smem, p_smem, vecs, kt_smem, q_bar, kv_full, kv_free, p_full, p_free):
        wg = lax.axis_index("wg")
        bars = Barriers(q_bar=q_bar, kv_full=kv_full, kv_free=kv_free, p_full=p_full, p_free=p_free)
        refs = KernelRefs(
            q_ref=q_ref,
            kv_ref=kv_ref,
            out_ref=out_ref,
            lse_ref=lse_ref,
            q_smem=q_smem,
            kv_smem=kv_smem,
            p_smem=p_smem,
            vecs=vecs,
            kt_smem=kt_smem,
            bars=bars,
        )

        @pl.when(wg == 0)
        def _():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            _wg0(refs, work, dm)

        @pl.when(wg == 1)
        def _():
            plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
            _wg1(refs, work, dm)

        @pl.when(wg == 2)
        def _():
            plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")
            _producer(bt_ref, kv_ref, kv_smem, bars.kv_full, bars.kv_free, work, dm)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((BM, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((dm.stages, dm.bkv, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((BM, dm.bkv), dm.dtype, transforms=tf),
        plgpu.SMEM((2, BM), jnp.float32),  # [0]: alpha / 1/l for wg1, [1]: lse (one 1 KB slot)
        plgpu.SMEM((dm.d, dm.bkv), dm.dtype, transforms=tf) if dm.interpret else None,
        plgpu.Barrier(num_barriers=1),  # q loaded
        plgpu.Barrier(num_barriers=dm.stages),  # kv_full (TMA)
        plgpu.Barrier(num_arrivals=2, num_barriers=dm.stages),  # kv_free
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # p_full
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # p_free
        collective_axes="wg",
    )
