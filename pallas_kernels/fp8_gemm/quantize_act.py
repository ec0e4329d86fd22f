"""An activation and the 1 x 128 tile quantization of its result in one pass (Pallas Triton): the SwiGLU forward
and backward of the FP8 layers (dsjax.layers.fp8: routed experts, shared experts, dense MLPs).

    h, (hq, hs) = act_quantize(gu, act, dtype)        # gu [R, 2I] = [gate | up]: h = act(gate, up, dtype) [R, I],
                                                      # (hq, hs) = quantize_tiles(h)
    dgu, (dq, ds) = act_bwd_quantize(gu, dh, act)     # dgu = [d gate | d up] [R, 2I], the vjp of act at (gate, up)
                                                      # applied to dh [R, I]; (dq, ds) = quantize_tiles(dgu)
    None, (hq, hs) = act_quantize(gu, act, dtype, keep=False)  # the tiles only: h is not written

`act(gate, up, dtype)` is the model's own function (dsjax.layers.mlp.swiglu), traced into the kernel, and its
backward is JAX's vjp of it, so the kernels hold no activation math of their own. I must be a multiple of 128: a
program's 128 columns of h (or of d gate / d up) are then one scaling tile, and the tiles of [d gate | d up] are
those of each half. Values are the unfused path's (XLA's act, then quantize_tiles on its result): the result is
rounded to `dtype` before it is quantized, as the unfused path stores it; in interpret mode bit-equal, on a GPU
equal where Triton's transcendental functions round as XLA's do (a sigmoid an ulp apart can move a bf16 value by
one step and its code by one e4m3 step).

Why: unfused, the experts' SwiGLU writes h (or d[gate | up]) in the compute dtype and quantize_tiles reads it back.
Here the quantizer's read and its launch disappear: per MoE layer of `small` 200 MB less read in the forward and
400 MB in the backward. The quantizations along the rows (the weight gradients' operands, tiles of 128 rows) stay
a separate pass: reading a tile once for both axes measured slower on the H200 each of the three times it was
tried, the last (128 x 128 tiles in slices, row codes recomputed from L2, neither h nor d[gate | up] written) 5x
slower than this kernel plus the transposing pass (BENCHMARKS.md, 2026-12-05). That pass now requantizes these
kernels' e4m3 tiles (ops.requantize_tiles_t), so with keep=False the result is not written at all: on the H100 at
small's experts the backward takes 0.40 ms instead of 0.57, the forward 0.25 instead of 0.32 (BENCHMARKS.md,
2026-12-06 eighteenth FP8 session).
experiments/bench_fp8_quantize.py --act times the fused and unfused paths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_gemm.quantize import E4M3, TILE
from pallas_kernels.fp8_gemm.quantize_gpu import nan_amax, to_e4m3

# Rows per program: the backward keeps ~6 row x 128 float32 arrays live (gate, up, dh, sigmoid, d gate, d up), so
# its tiles are smaller than quantize_gpu's 64 rows. Measured on the H200 ([204800, 1024], BENCHMARKS.md,
# 2026-12-05): 16 rows x 4 warps 0.337 / 0.629 ms (fwd / bwd), 32 x 4 0.358 / 0.675, 64 x 4 0.404 / 0.818.
BLOCK_R = 16


def _check(name, gu, dh=None):
    rows, width = gu.shape
    if gu.ndim != 2 or width % (2 * TILE):
        raise ValueError(f"{name}: gu must be [R, 2I] = [gate | up] with I a multiple of {TILE}, got {gu.shape}")
    if dh is not None and dh.shape != (rows, width // 2):
        raise ValueError(f"{name}: dh must be [R, I] = {(rows, width // 2)}, got {dh.shape}")


def _tile(ref, row, col, ok):
    return pltriton.load(ref.at[row[:, None], col[None, :]], mask=ok, other=0)


def _store_quantized(t, out_ref, q_ref, row, col, ok):
    """t (float32 [block_r, 128], already rounded to the compute dtype) stored (unless out_ref is None), and its
    codes along the rows; returns the tile scales [block_r]."""
    if out_ref is not None:
        pltriton.store(out_ref.at[row[:, None], col[None, :]], t.astype(out_ref.dtype), mask=ok)
    q, scale = to_e4m3(t, nan_amax(t, axis=1)[:, None])  # one scale per row over the tile's 128 columns
    pltriton.store(q_ref.at[row[:, None], col[None, :]], q, mask=ok)
    return scale[:, 0]


def _coords(rows: int, block_r: int):
    row = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
    col = pl.program_id(1) * TILE + jnp.arange(TILE, dtype=jnp.int32)
    return row, col, jnp.broadcast_to((row < rows)[:, None], (block_r, TILE))


def _fwd_kernel(gu_ref, *refs, act, dtype, half: int, rows: int, block_r: int):
    h_ref, q_ref, s_ref = refs if len(refs) == 3 else (None, *refs)
    row, col, ok = _coords(rows, block_r)
    gate, up = _tile(gu_ref, row, col, ok), _tile(gu_ref, row, col + half, ok)
    h = act(gate, up, dtype).astype(jnp.float32)
    s_ref[...] = _store_quantized(h, h_ref, q_ref, row, col, ok)[None, :]


@functools.partial(jax.jit, static_argnames=("act", "dtype", "keep", "interpret", "block_r", "num_warps"))
def act_quantize(
    gu, act, dtype, *, keep: bool = True, interpret: bool = False, block_r: int = BLOCK_R, num_warps: int = 4
):
    """gu [R, 2I] = [gate | up] (I % 128 == 0) -> (h [R, I] = act(gate, up, dtype), (q e4m3 [R, I], s float32
    [R, I / 128]) = quantize_tiles(h)) in one pass. keep False: h is not written (None), only its tiles."""
    _check("act_quantize", gu)
    rows, half = gu.shape[0], gu.shape[1] // 2
    row_blocks = -(-rows // block_r)
    whole = pl.BlockSpec((rows, 2 * half), lambda r, c: (0, 0))
    out = pl.BlockSpec((rows, half), lambda r, c: (0, 0))
    h_type = [jax.ShapeDtypeStruct((rows, half), dtype)] if keep else []
    *h, q, s = pl.pallas_call(
        functools.partial(_fwd_kernel, act=act, dtype=dtype, half=half, rows=rows, block_r=block_r),
        grid=(row_blocks, half // TILE),
        in_specs=[whole],
        out_specs=[out] * len(h_type) + [out, pl.BlockSpec((1, block_r), lambda r, c: (c, r))],
        out_shape=[
            *h_type,
            jax.ShapeDtypeStruct((rows, half), E4M3),
            jax.ShapeDtypeStruct((half // TILE, row_blocks * block_r), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="fp8_act_quantize",
    )(gu)
    return (h[0] if keep else None), (q, s[:, :rows].T)


def _bwd_kernel(gu_ref, dh_ref, *refs, act, half: int, rows: int, block_r: int):
    d_ref, q_ref, s_ref = refs if len(refs) == 3 else (None, *refs)
    row, col, ok = _coords(rows, block_r)
    gate, up = _tile(gu_ref, row, col, ok), _tile(gu_ref, row, col + half, ok)
    dh = _tile(dh_ref, row, col, ok)
    dgate, dup = jax.vjp(lambda a, b: act(a, b, dh.dtype), gate, up)[1](dh)
    for i, (t, offset) in enumerate(((dgate, 0), (dup, half))):  # the gate half's tiles, then the up half's
        scale = _store_quantized(t.astype(jnp.float32), d_ref, q_ref, row, col + offset, ok)
        s_ref[i] = scale[None, :]


@functools.partial(jax.jit, static_argnames=("act", "keep", "interpret", "block_r", "num_warps"))
def act_bwd_quantize(
    gu, dh, act, *, keep: bool = True, interpret: bool = False, block_r: int = BLOCK_R, num_warps: int = 4
):
    """gu [R, 2I] = [gate | up] (I % 128 == 0), dh [R, I] -> (dgu [R, 2I] in gu's dtype = the vjp of act(gate, up,
    dh.dtype) at (gate, up) applied to dh, [d gate | d up]; (q e4m3 [R, 2I], s float32 [R, 2I / 128]) =
    quantize_tiles(dgu)) in one pass. keep False: dgu is not written (None), only its tiles."""
    _check("act_bwd_quantize", gu, dh)
    rows, half = gu.shape[0], gu.shape[1] // 2
    row_blocks, col_tiles = -(-rows // block_r), half // TILE
    whole = pl.BlockSpec((rows, 2 * half), lambda r, c: (0, 0))
    d_type = [jax.ShapeDtypeStruct((rows, 2 * half), gu.dtype)] if keep else []
    *d, q, s = pl.pallas_call(
        functools.partial(_bwd_kernel, act=act, half=half, rows=rows, block_r=block_r),
        grid=(row_blocks, col_tiles),
        in_specs=[whole, pl.BlockSpec((rows, half), lambda r, c: (0, 0))],
        out_specs=[whole] * len(d_type) + [whole, pl.BlockSpec((2, 1, block_r), lambda r, c: (0, c, r))],
        out_shape=[
            *d_type,
            jax.ShapeDtypeStruct((rows, 2 * half), E4M3),
            jax.ShapeDtypeStruct((2, col_tiles, row_blocks * block_r), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="fp8_act_bwd_quantize",
    )(gu, dh)
    return (d[0] if keep else None), (q, s.reshape(2 * col_tiles, -1)[:, :rows].T)
