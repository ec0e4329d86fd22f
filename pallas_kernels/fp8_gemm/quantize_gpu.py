"""DeepSeek-V3's FP8 quantization as single-pass GPU kernels (Pallas Triton), bit-equal to quantize.py's XLA ops
(on the H200 as in interpret mode: see to_e4m3 for the rounding both sides share).

    q, s = quantize_tiles(x)             # x [M, K] -> q [M, K], s [M, ceil(K / 128)]: 1 x 128 tiles along K
    q, s = quantize_blocks(w)            # w [..., K, N] -> q [..., N, K], s [..., N / 128, K / 128]: transposing
    q, s = quantize_tiles_t(x)           # == quantize_tiles(x.T): x [R, C] -> q [C, R], s [C, ceil(R / 128)]
    q, s = quantize_tiles_t(x, index)    # == quantize_tiles(take_aligned(x, index).T): rows gathered first
    q, s = quantize_tiles_t(x, index, w) # the gathered rows scaled by w [R'] first (float32)
    (q, s), (qt, st) = quantize_both(x)  # quantize_tiles(x) and quantize_tiles_t(x), x read from memory once

XLA runs each of these as a reduce fusion plus a cast (and a transpose or gather); here a program reads its tile
once, reduces, scales and casts in registers, and writes e4m3 (transposed where asked). On the H200 XLA takes up to
2x their time on small's activations (on par for arrays under ~1M elements, where launch costs rule), 3-9x on the
gathered operand below; quantize_tiles moves 3.2 TB/s, 80-90% of a cast-only pass (BENCHMARKS.md, 2026-12-04
fifth FP8 session). Reading x once for both of a layer's quantizations ran slower than the two passes the two times
it was tried (a masked-store kernel, then 128 x 128 BlockSpec tiles); quantize_both here is a third design, untimed
(see its doc), which ops.quantize_both does not call yet.

A weight gradient x^T . dy contracts the tokens, and FP8 wgmma takes both operands K-major, so its operands are
the activations and output gradients transposed, tile-scaled along the tokens. Done by XLA as gather, transpose,
amax and cast, each of those is a pass over the [tokens, features] array, and the gather + transpose fusion it
builds reads rows of a gathered layout column-wise: on the H200 it took 7 ms per expert operand of `small` (four
per MoE layer) against 0.2-1 ms for the FP8 GEMM that consumes it (experiments/BENCHMARKS.md, 2026-12-04 third
session). A quantize_tiles_t program reads a 128-row x `block_c`-column tile once (rows gathered through `index`,
which also marks zero rows), takes each column's amax over its 128 rows, scales and casts in registers and writes
the tile transposed: one read and one (half-size) write.

The rows are padded to whole 128-row tiles with zeros (zero rows do not change a tile's amax), as quantize_tiles
pads its last axis; an all-zero column tile gets scale 1, and a NaN poisons its tile, as in quantize.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_gemm.quantize import AMAX_FLOOR, E4M3, E4M3_MAX, INV_E4M3_MAX, TILE, tiles


def nan_amax(t, axis=None):
    """max |t| along axis, NaN if the tile holds one: Triton's max ignores NaN (maxnumf), XLA's propagates it."""
    has_nan = jnp.max(jnp.where(t != t, 1.0, 0.0), axis=axis) > 0
    return jnp.where(has_nan, jnp.nan, jnp.max(jnp.abs(t), axis=axis))


def to_e4m3(t, amax):
    """(t * (448 / amax) as e4m3, scale amax * (1 / 448)) as quantize.py computes them, the division once per tile
    (amax is the tile's, broadcastable to t). Triton's float32 division is the approximate div.full, and so is
    XLA's on the GPU (experiments/bench_fp8_quantize.py --probe: 448 / amax equal on 2^20 values, 29% of them an
    ulp off IEEE), so the multipliers agree; the interpreter divides as XLA does on the CPU. The clip
    (NaN-ignoring in Triton) sees finite values only: NaN stays NaN, as quantize.py's clip keeps it."""
    zero = amax == 0
    # Triton's max ignores NaN (maxnumf): a NaN amax is put back after the floor
    amax = jnp.where(zero, 1.0, jnp.where(amax != amax, jnp.nan, jnp.maximum(amax, AMAX_FLOOR)))
    scale = jnp.where(zero, 1.0, amax * INV_E4M3_MAX)
    y = t * jnp.where(zero, 1.0, E4M3_MAX / amax)
    return jnp.where(y != y, jnp.nan, jnp.clip(y, -E4M3_MAX, E4M3_MAX)).astype(E4M3), scale


def _params(num_warps=4):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def _rows_source(x, index):
    """The row layout a transposing kernel reads: (gather, output rows, index operand, its BlockSpec). Without an
    index the rows are x's own (a dummy index keeps one kernel signature)."""
    gather = index is not None
    if gather and (index.ndim != 1 or index.shape[0] % TILE):
        raise ValueError(f"index must be [R'] with R' a multiple of {TILE}, got {index.shape}")
    if not gather:
        return False, x.shape[0], jnp.zeros((TILE,), jnp.int32), pl.BlockSpec((TILE,), lambda r, c: (0,))
    return True, index.shape[0], index, pl.BlockSpec((TILE,), lambda r, c: (r,))


def _load_rows(index_ref, x_ref, col, rows: int, cols: int, gather: bool):
    """(this program's 128 source rows, row validity [128, 1], element validity, the float32 tile [128, len(col)]).
    Out-of-range rows / columns are masked loads (zeros, no memory access); unclamped column offsets stay
    contiguous, so Triton vectorizes the loads."""
    src = index_ref[...] if gather else pl.program_id(0) * TILE + jnp.arange(TILE, dtype=jnp.int32)
    row_ok = (src < rows)[:, None]
    ok = row_ok & (col < cols)[None, :]
    tile = pltriton.load(x_ref.at[src[:, None], col[None, :]], mask=ok, other=0).astype(jnp.float32)
    return src, row_ok, ok, tile


BLOCK_C = 64  # columns per program: a 128 x 64 bf16 tile is 16 KiB of registers across 4 warps


def _kernel(index_ref, rs_ref, x_ref, q_ref, s_ref, *, rows, cols, block_c, gather, blocked, row_scale):
    if blocked:  # x_ref is this program's [128, block_c] tile
        t = x_ref[...].astype(jnp.float32)
    else:
        col = pl.program_id(1) * block_c + jnp.arange(block_c, dtype=jnp.int32)
        _, _, _, t = _load_rows(index_ref, x_ref, col, rows, cols, gather)
    if row_scale:
        t = t * rs_ref[...][:, None]
    q, scale = to_e4m3(t, nan_amax(t, axis=0)[None, :])  # one scale per column over the tile's 128 rows
    q_ref[...] = q.T
    s_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("interpret", "block_c", "num_warps", "blocked"))
def quantize_tiles_t(
    x,
    index=None,
    row_scale=None,
    *,
    interpret: bool = False,
    block_c: int = BLOCK_C,
    num_warps: int = 4,
    blocked: bool = False,
):
    """x [R, C] (index None) -> (q float8_e4m3fn [C, R], s float32 [C, ceil(R / 128)]) = quantize_tiles(x.T).
    With index [R'] int32 (ops.align_groups' layout: row p is x[index[p]], a zero row where index[p] >= R; R' a
    multiple of 128): q [C, R'], s [C, R' / 128] = quantize_tiles(take_aligned(x, index).T). row_scale [R'] (or [R]
    without index) float32: each output row multiplied by its entry (in float32, before the amax), e.g. the routing
    weights of the experts' rows gathered from the tokens' gradient. blocked (no index or row_scale, 128 dividing R
    and block_c dividing C): the input tiles as BlockSpec blocks, no masked pointer loads."""
    rows, cols = x.shape
    gather, out_rows, index, idx_spec = _rows_source(x, index)
    row_tiles, col_blocks = tiles(out_rows), -(-cols // block_c)
    scaled = row_scale is not None
    if scaled and row_scale.shape != (out_rows,):
        raise ValueError(f"row_scale must be [{out_rows}] (one per output row), got {row_scale.shape}")
    rs = jnp.pad(row_scale.astype(jnp.float32), (0, row_tiles * TILE - out_rows)) if scaled else jnp.zeros((TILE,))
    rs_spec = pl.BlockSpec((TILE,), (lambda r, c: (r,)) if scaled else (lambda r, c: (0,)))
    blocked = blocked and not gather and not scaled and rows % TILE == 0 and cols % block_c == 0
    x_spec = pl.BlockSpec((TILE, block_c) if blocked else (rows, cols), lambda r, c: (r, c) if blocked else (0, 0))
    kernel = functools.partial(
        _kernel, rows=rows, cols=cols, block_c=block_c, gather=gather, blocked=blocked, row_scale=scaled
    )
    q, s = pl.pallas_call(
        kernel,
        grid=(row_tiles, col_blocks),
        in_specs=[idx_spec, rs_spec, x_spec],
        out_specs=[
            pl.BlockSpec((block_c, TILE), lambda r, c: (c, r)),
            pl.BlockSpec((1, block_c), lambda r, c: (r, c)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((col_blocks * block_c, row_tiles * TILE), E4M3),
            jax.ShapeDtypeStruct((row_tiles, col_blocks * block_c), jnp.float32),
        ],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="fp8_quantize_tiles_t",
    )(index, rs, x)
    return q[:cols, :out_rows], s[:, :cols].T


def _tiles_kernel(x_ref, q_ref, s_ref, *, rows: int, cols: int, block_r: int, blocked: bool):
    if blocked:  # x_ref / q_ref are this program's [block_r, 128] tiles
        t = x_ref[...].astype(jnp.float32)
    else:
        row = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
        col = pl.program_id(1) * TILE + jnp.arange(TILE, dtype=jnp.int32)
        ok = (row < rows)[:, None] & (col < cols)[None, :]
        t = pltriton.load(x_ref.at[row[:, None], col[None, :]], mask=ok, other=0).astype(jnp.float32)
    q, scale = to_e4m3(t, nan_amax(t, axis=1)[:, None])  # one scale per row over the tile's 128 columns
    if blocked:
        q_ref[...] = q
    else:
        pltriton.store(q_ref.at[row[:, None], col[None, :]], q, mask=ok)
    s_ref[...] = scale.T


@functools.partial(jax.jit, static_argnames=("interpret", "block_r", "num_warps", "blocked"))
def quantize_tiles(x, *, interpret: bool = False, block_r: int = 64, num_warps: int = 4, blocked: bool = False):
    """x [M, K] -> (q float8_e4m3fn [M, K], s float32 [M, ceil(K / 128)]) = quantize.quantize_tiles(x).
    blocked (where block_r divides M and 128 divides K): the tiles as BlockSpec blocks, no masked pointer loads
    (untimed; bench_fp8_quantize.py --sweep compares)."""
    rows, cols = x.shape
    row_blocks, col_tiles = -(-rows // block_r), tiles(cols)
    blocked = blocked and rows % block_r == 0 and cols % TILE == 0
    tile = pl.BlockSpec((block_r, TILE), lambda r, c: (r, c))
    whole = pl.BlockSpec((rows, cols), lambda r, c: (0, 0))
    q, s = pl.pallas_call(
        functools.partial(_tiles_kernel, rows=rows, cols=cols, block_r=block_r, blocked=blocked),
        grid=(row_blocks, col_tiles),
        in_specs=[tile if blocked else whole],
        out_specs=[
            tile if blocked else whole,
            pl.BlockSpec((1, block_r), lambda r, c: (c, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((rows, cols), E4M3),
            jax.ShapeDtypeStruct((col_tiles, row_blocks * block_r), jnp.float32),
        ],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="fp8_quantize_tiles",
    )(x)
    return q, s[:, :rows].T


def _blocks_kernel(w_ref, q_ref, s_ref, *, k: int, n: int):
    g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kk = kb * TILE + jnp.arange(TILE, dtype=jnp.int32)
    nn = nb * TILE + jnp.arange(TILE, dtype=jnp.int32)
    ok = (kk < k)[:, None] & (nn < n)[None, :]
    b = pltriton.load(w_ref.at[g, kk[:, None], nn[None, :]], mask=ok, other=0).astype(jnp.float32)
    amax = jnp.full((1, TILE), nan_amax(b), jnp.float32)  # one scale per 128 x 128 block, as a row
    q, scale = to_e4m3(b, amax)
    pltriton.store(q_ref.at[g, nn[:, None], kk[None, :]], q.T, mask=ok.T)  # K-major: [N, K]
    s_ref[...] = jnp.full((1, 1, 1), jnp.max(scale), jnp.float32)  # the row's entries are equal


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_blocks(w, *, interpret: bool = False):
    """w [..., K, N] -> (q float8_e4m3fn [..., N, K], s float32 [..., ceil(N / 128), ceil(K / 128)]) =
    quantize.quantize_blocks(w): transposed while quantized, in one pass over the master weights."""
    *lead, k, n = w.shape
    w3 = w.reshape(-1, k, n)
    g, kt, nt = w3.shape[0], tiles(k), tiles(n)
    q, s = pl.pallas_call(
        functools.partial(_blocks_kernel, k=k, n=n),
        grid=(g, kt, nt),
        in_specs=[pl.BlockSpec((g, k, n), lambda g, i, j: (0, 0, 0))],
        out_specs=[
            pl.BlockSpec((g, n, k), lambda g, i, j: (0, 0, 0)),
            pl.BlockSpec((1, 1, 1), lambda g, i, j: (g, j, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((g, n, k), E4M3), jax.ShapeDtypeStruct((g, nt, kt), jnp.float32)],
        compiler_params=_params(8),
        interpret=interpret,
        name="fp8_quantize_blocks",
    )(w3)
    return q.reshape(*lead, n, k), s.reshape(*lead, nt, kt)


def _nan_max(a, b):
    """max(a, b) that keeps a NaN (Triton's maximum drops it)."""
    return jnp.where((a != a) | (b != b), jnp.nan, jnp.maximum(a, b))


def quantize_two_ways(values, outs, row, row_ok, col0, cols: int, half: int):
    """Inside a Triton program: both quantizations of [128, 128] tiles (rows `row`, columns col0 ..) of one or more
    results, produced as 128 x `half` float32 slices by values(col, ok) -> a tuple of [128, half] arrays (one per
    result; out-of-range entries 0). Each slice's column codes (128 x 1 tiles along the rows) are complete and
    written at once while the rows' maxima accumulate; the row codes (1 x 128 tiles) then come from producing the
    slices again, whose inputs this program has just brought into L2. outs: per result (q_ref [., C'] and qt_ref
    [C', .] e4m3, written by masked pointer stores at columns col + offset; s_ref and st_ref: this program's
    blocks of its row and column scales, [1, 128] after `index`, a static leading index or () (Triton lowers
    one indexer per access, so no .at views); index; offset). One read of the inputs from memory and two e4m3
    writes per element, instead of a stored result read back by two passes."""
    amax = [None] * len(outs)
    for h in range(TILE // half):
        col = col0 + h * half + jnp.arange(half, dtype=jnp.int32)
        ok = row_ok & (col < cols)[None, :]
        for i, ((_, _, qt_ref, st_ref, index, offset), t) in enumerate(zip(outs, values(col, ok))):
            qt, st = to_e4m3(t, nan_amax(t, axis=0)[None, :])
            pltriton.store(qt_ref.at[col[:, None] + offset, row[None, :]], qt.T, mask=ok.T)
            st_ref[(slice(None), *index, slice(h * half, (h + 1) * half))] = st
            amax[i] = nan_amax(t, axis=1) if amax[i] is None else _nan_max(amax[i], nan_amax(t, axis=1))
    for h in range(TILE // half):
        col = col0 + h * half + jnp.arange(half, dtype=jnp.int32)
        ok = row_ok & (col < cols)[None, :]
        for (q_ref, s_ref, _, _, index, offset), t, m in zip(outs, values(col, ok), amax):
            q, scale = to_e4m3(t, m[:, None])
            pltriton.store(q_ref.at[row[:, None], col[None, :] + offset], q, mask=ok)
            s_ref[(*index, slice(None), slice(None))] = scale.T


def two_way_call(kernel, inputs, rows: int, cols: int, results: int, num_warps: int, interpret: bool, name: str):
    """The pallas_call of a quantize_two_ways kernel: a (128-row tiles, cols / 128 column tiles) grid writing
    `results` arrays of `cols` columns side by side (result i at columns i * cols; cols ragged only with one
    result): codes [R, results * cols] and their transpose (masked pointer stores), row scales through [results,
    1, 128] blocks and column scales through [1, results, 128] blocks (the kernel indexes result i as (i,)).
    Returns ((q, s), (qt, st)) as quantize_tiles and quantize_tiles_t lay them out."""
    row_tiles, col_tiles, width = tiles(rows), tiles(cols), results * cols
    whole = lambda shape: pl.BlockSpec(shape, lambda r, c: (0, 0))  # noqa: E731 - masked pointer access
    q, s, qt, st = pl.pallas_call(
        kernel,
        grid=(row_tiles, col_tiles),
        in_specs=[whole(x.shape) for x in inputs],
        out_specs=[
            whole((rows, width)),
            pl.BlockSpec((results, 1, TILE), lambda r, c: (0, c, r)),
            whole((width, rows)),
            pl.BlockSpec((1, results, TILE), lambda r, c: (r, 0, c)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((rows, width), E4M3),
            jax.ShapeDtypeStruct((results, col_tiles, row_tiles * TILE), jnp.float32),
            jax.ShapeDtypeStruct((width, rows), E4M3),
            jax.ShapeDtypeStruct((row_tiles, results, col_tiles * TILE), jnp.float32),
        ],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name=name,
    )(*inputs)
    s = s.reshape(results * col_tiles, -1)[:, :rows].T
    return (q, s), (qt, st[:, :, :cols].reshape(row_tiles, width).T)


def _both_kernel(x_ref, q_ref, s_ref, qt_ref, st_ref, *, rows: int, cols: int, half: int):
    row = pl.program_id(0) * TILE + jnp.arange(TILE, dtype=jnp.int32)
    row_ok = (row < rows)[:, None]

    def values(col, ok):
        return (pltriton.load(x_ref.at[row[:, None], col[None, :]], mask=ok, other=0).astype(jnp.float32),)

    quantize_two_ways(
        values, ((q_ref, s_ref, qt_ref, st_ref, (0,), 0),), row, row_ok, pl.program_id(1) * TILE, cols, half
    )


@functools.partial(jax.jit, static_argnames=("interpret", "half", "num_warps"))
def quantize_both(x, *, interpret: bool = False, half: int = 64, num_warps: int = 4):
    """x [R, C] -> ((q [R, C], s [R, ceil(C / 128)]) = quantize_tiles(x), (qt [C, R], st [C, ceil(R / 128)]) =
    quantize_tiles_t(x)), x read from memory once. A program takes a 128 x 128 tile as two 128 x `half` slices
    (the 128 x 64 tiles quantize_tiles_t runs fastest on, 64 float32 values a thread over 4 warps): each slice's
    column codes are complete and written at once while the rows' maxima accumulate; the row codes then come from
    reading the slices again, which this program has just brought into L2. Memory traffic: one bf16 read and two
    e4m3 writes per element (4 bytes) against the two passes' two reads (6 bytes). Untimed on a GPU
    (experiments/bench_fp8_quantize.py --both); the two earlier one-read designs measured slower than the passes."""
    if TILE % half:
        raise ValueError(f"quantize_both: half must divide {TILE}, got {half}")
    rows, cols = x.shape
    kernel = functools.partial(_both_kernel, rows=rows, cols=cols, half=half)
    return two_way_call(kernel, (x,), rows, cols, 1, num_warps, interpret, "fp8_quantize_both")
