"""MLA decode over a paged latent cache in Pallas Mosaic GPU (Hopper): config, launch, the "simple" kernel.

Rows: a sequence's s_q * H query rows (row r = query r // H, head r % H) are cut into CTA tiles of 64
rows (one wgmma M tile). For every block of 64 cache rows (576 wide: 512 latent | 64 rope), the CTA
computes S = Q K^T over all 576 columns with one wgmma, an online float32 softmax (exp2, scores
pre-scaled by scale * log2 e), and O += P V where V is the first 512 columns of the same smem tile, so
each cache row is read once for all the heads in the tile. Blocks are located through the block
table: block j of a sequence is rows (j * 64) % page_size.. of page block_table[b, j * 64 // page_size],
one TMA copy each (page_size % 64 == 0).

Kernels (GpuConfig.kernel):
  "ws": 3 warpgroups per CTA (gpu_ws.py). wg0 computes S and the softmax and O[:, :256]; wg1 computes
    O[:, 256:] from the P and rescale factors wg0 leaves in smem; wg2 issues the TMA copies into a
    2-stage ring. FlashMLA's Hopper split of the 64 x 512 output between two warpgroups.
  "simple": 1 warpgroup per CTA (this file) owning 256 output columns; the two column halves are
    separate CTAs that both compute S (1.5x the FLOPs), with no inter-warpgroup traffic. The fallback
    if the "ws" kernel does not compile, and a reference point for memory-bound shapes.
  Both are built from the device-side pieces in gpu_common.py (S, online softmax, P V, stores).
Shared memory: Q 72 KB + 2 KV stages of 72 KB + P 8 KB + 1 KB of row vectors leaves 2 KB of the
227 KB an H100/H200 block may use, so the KV block is 64 rows and the ring has 2 stages (and the 2 KB
that Pallas reserves for cross-warp reductions by default is turned off: ours stay inside warps).

Split-KV: grid axis "split" cuts each sequence's blocks into ranges (common.block_range); with more
than one split the kernel writes per-split outputs as bf16 hi + lo pairs (about 16 mantissa bits, no
extra smem needed to stage float32) and their lse, and common.combine merges them with jnp ops.

Interpret mode (CPU) runs the same bodies. jax 0.10's GPU interpreter takes wgmma operands only as
smem refs without transposes and has no run_state, so there K^T is copied into a scratch buffer,
P is read back from smem, and O is updated as O + (P V from a zeroed accumulator).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mla_decode import common, gpu_common, gpu_ws
from pallas_kernels.mla_decode.common import V_DIM
from pallas_kernels.mla_decode.gpu_common import BM, HALF


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """kernel: "ws" or "simple" (see the module doc). num_splits: 0 = enough to fill the SMs.
    p_in_registers: the PV wgmma reads P from registers (else from smem). pv_inplace: O is rescaled
    and accumulated in place (run_state on an initialised accumulator); else O += P V through a zeroed
    accumulator, `pv_chunk` columns at a time (fewer registers live)."""

    kernel: str = "ws"
    block_kv: int = 64
    num_stages: int = 2
    num_splits: int = 0
    p_in_registers: bool = True
    pv_inplace: bool = True
    pv_chunk: int = 256
    num_sms: int | None = None  # None: the device's SM count (16 in interpret mode)


# The conservative fallback: only smem-operand wgmmas and fresh accumulators.
SIMPLE_CONFIG = GpuConfig(kernel="simple", p_in_registers=False, pv_inplace=False, pv_chunk=128)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call."""

    s_q: int
    h: int
    rq: int  # query rows a CTA loads and stores (< 64 for small s_q * H)
    d: int
    num_pages: int
    page_size: int
    max_pages: int
    splits: int
    bkv: int
    stages: int
    scale_log2: float
    dtype: object
    cfg: GpuConfig
    interpret: bool

    @property
    def max_blocks(self):
        return self.max_pages * self.page_size // self.bkv


def unsupported(q, kv_pages, config):
    cfg = config or GpuConfig()
    d, page_size = kv_pages.shape[-1], kv_pages.shape[1]
    if cfg.kernel not in ("ws", "simple"):
        return f"unknown kernel {cfg.kernel!r}"
    if cfg.block_kv != 64:
        return "block_kv must be 64 (wgmma K groups of 64 with 128-byte swizzle; smem fits 2 stages)"
    if d % 64 or d <= V_DIM:
        return f"row width must be {V_DIM} + a multiple of 64, got {d}"
    if page_size % cfg.block_kv:
        return f"page_size {page_size} must be a multiple of block_kv {cfg.block_kv}"
    if not 1 <= cfg.num_stages <= 2:
        return "num_stages must be 1 or 2 (shared memory)"
    if HALF % cfg.pv_chunk or cfg.pv_chunk % 64:
        return f"pv_chunk must divide {HALF} in multiples of 64"
    return None


def interpret_params():
    """Mosaic GPU interpret params; the public name moved between jax releases."""
    for name in ("InterpretParams", "InterpretGPUParams"):
        if hasattr(plgpu, name):
            return getattr(plgpu, name)()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _simple_body(len_ref, bt_ref, q_ref, kv_ref, out_ref, lse_ref, *, dm):
    x, split, b = lax.axis_index("m"), lax.axis_index("split"), lax.axis_index("b")
    half = lax.rem(x, 2)  # adjacent CTAs share a sequence's rows, so one L2 fill serves both
    m0 = lax.div(x, 2) * dm.rq
    length, start, steps, nfull = gpu_common.cta_ranges(len_ref, dm, split, b)
    col0 = half * HALF
    nchunks = HALF // dm.cfg.pv_chunk
    tf = gpu_common.smem_transforms()

    def scoped(q_smem, kv_smem, p_smem, lse_smem, kt_smem, q_bar, kv_bar):
        gpu_common.load_q(q_ref, q_smem, q_bar, b, m0, dm)
        for i in range(dm.stages):
            pl.when(i < steps)(
                functools.partial(gpu_common.load_kv, bt_ref, kv_ref, kv_smem, kv_bar, b, start + i, i, dm)
            )
        plgpu.barrier_wait(q_bar.at[0])

        def step(t, carry, masked):
            o, m, l = carry
            slot = lax.rem(t, dm.stages)
            blk = start + t
            tile = kv_smem.at[slot]
            plgpu.barrier_wait(kv_bar.at[slot])
            s = gpu_common.scores(q_smem, tile, kt_smem, dm)
            if masked:
                s = gpu_common.mask_scores(s, blk, m0, length, dm)
            p, alpha, m, l = gpu_common.softmax_step(s, m, l)
            p16 = p.astype(dm.dtype)
            if p_smem is not None:
                p_smem[...] = p16
                plgpu.commit_smem()
            o = gpu_common.pv_update(o, alpha, p16 if p_smem is None else p_smem, tile, col0, dm)

            # The slot's last reader (the PV wgmma) has completed: refill it.
            @pl.when(t + dm.stages < steps)
            def _():
                gpu_common.load_kv(bt_ref, kv_ref, kv_smem, kv_bar, b, blk + dm.stages, slot, dm)

            return o, m, l

        carry = (
            tuple(gpu_common.zeros_acc(dm.cfg.pv_chunk, dm) for _ in range(nchunks)),
            gpu_common.row_full(common.M_INIT, dm),
            gpu_common.row_full(0.0, dm),
        )
        carry = lax.fori_loop(0, nfull, functools.partial(step, masked=False), carry)
        o, m, l = lax.fori_loop(nfull, steps, functools.partial(step, masked=True), carry)
        inv, lse = gpu_common.finish_rows(m, l)
        out_view, lse_view = gpu_common.out_views(out_ref, lse_ref, b, split, m0, dm)
        gpu_common.store_half(o, inv, q_smem.at[:, pl.ds(0, HALF)], out_view, col0, dm)
        pl.when(half == 0)(lambda: gpu_common.store_lse(lse, lse_smem, lse_view, dm))
        plgpu.wait_smem_to_gmem(0)

    p_in_smem = dm.interpret or not dm.cfg.p_in_registers
    pl.run_scoped(
        scoped,
        plgpu.SMEM((BM, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((dm.stages, dm.bkv, dm.d), dm.dtype, transforms=tf),
        plgpu.SMEM((BM, dm.bkv), dm.dtype, transforms=tf) if p_in_smem else None,
        plgpu.SMEM((BM,), jnp.float32),
        plgpu.SMEM((dm.d, dm.bkv), dm.dtype, transforms=tf) if dm.interpret else None,
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=dm.stages),
    )


def compiler_params():
    kw = dict(approx_math=True)
    # Row reductions of the WGMMA layout stay inside a warp, so they need no smem scratch; the
    # default 2 KB reservation would push Q + 2 KV stages + P past the 227 KB limit.
    if "reduction_scratch_bytes" in {f.name for f in dataclasses.fields(plgpu.CompilerParams)}:
        kw["reduction_scratch_bytes"] = 0
    return plgpu.CompilerParams(**kw)


def _num_sms(cfg, interpret):
    if cfg.num_sms is not None:
        return cfg.num_sms
    return 16 if interpret else jax.devices()[0].core_count


def mla_decode(q, kv_pages, block_table, lengths, *, softmax_scale, config=None, interpret=False):
    """See ops.mla_decode; inputs already checked. Returns (out [B, s_q, H, 512], lse [B, s_q, H])."""
    cfg = config or GpuConfig()
    problem = unsupported(q, kv_pages, cfg)
    if problem:
        raise ValueError(f"mla_decode gpu: {problem}")
    b, s_q, h, d = q.shape
    num_pages, page_size, _ = kv_pages.shape
    rows = s_q * h
    rows_p = common.round_up(rows, 8) if rows <= BM else common.round_up(rows, BM)
    rq = min(rows_p, BM)
    m_blocks = rows_p // rq
    ncol = 2 if cfg.kernel == "simple" else 1
    max_blocks = block_table.shape[1] * page_size // cfg.block_kv
    splits = cfg.num_splits or common.auto_splits(b * m_blocks * ncol, _num_sms(cfg, interpret), max_blocks)
    splits = max(1, min(splits, max_blocks))
    dm = Dims(
        s_q=s_q,
        h=h,
        rq=rq,
        d=d,
        num_pages=num_pages,
        page_size=page_size,
        max_pages=block_table.shape[1],
        splits=splits,
        bkv=cfg.block_kv,
        stages=cfg.num_stages,
        scale_log2=float(softmax_scale) * common.LOG2E,
        dtype=q.dtype,
        cfg=cfg,
        interpret=bool(interpret),
    )
    if splits == 1:
        out_type = (jax.ShapeDtypeStruct((b, rows_p, V_DIM), q.dtype), jax.ShapeDtypeStruct((b, rows_p), jnp.float32))
    else:
        out_type = (
            jax.ShapeDtypeStruct((b, splits, rows_p, 2 * V_DIM), q.dtype),
            jax.ShapeDtypeStruct((b, splits, rows_p), jnp.float32),
        )
    kw = dict(
        out_type=out_type,
        grid=(m_blocks * ncol, splits, b),
        grid_names=("m", "split", "b"),
        compiler_params=compiler_params(),
    )
    if cfg.kernel == "simple":
        body = functools.partial(_simple_body, dm=dm)
    else:
        body = functools.partial(gpu_ws.body, dm=dm)
        kw.update(num_threads=3, thread_name="wg")
    if interpret:
        kw["interpret"] = interpret_params()
    q2 = common.pad_rows(q.reshape(b, rows, d), rows_p)
    out, lse = plgpu.kernel(body, **kw)(lengths, block_table, q2, kv_pages)
    if splits > 1:
        o32 = out[..., :V_DIM].astype(jnp.float32) + out[..., V_DIM:].astype(jnp.float32)
        out, lse = common.combine(o32, lse, q.dtype)
    return (out[:, :rows].reshape(b, s_q, h, V_DIM), lse[:, :rows].reshape(b, s_q, h))
