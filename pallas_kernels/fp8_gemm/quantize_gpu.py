"""DeepSeek-V3's FP8 quantization as single-pass GPU kernels (Pallas Triton), bit-equal to quantize.py's XLA ops
(on the H200 and H100 as in interpret mode: see to_e4m3 for the rounding both sides share).

    q, s = quantize_tiles(x)             # x [M, K] -> q [M, K], s [M, ceil(K / 128)]: 1 x 128 tiles along K
    q, s = quantize_blocks(w)            # w [..., K, N] -> q [..., N, K], s [..., N / 128, K / 128]: transposing
    q, s, qt, st = quantize_blocks(w, extra, transposed=True)  # + routed experts' `extra`, + both orientations
    q, s = quantize_tiles_t(x)           # == quantize_tiles(x.T): x [R, C] -> q [C, R], s [C, ceil(R / 128)]
    q, s = quantize_tiles_t(x, index)    # == quantize_tiles(take_aligned(x, index).T): rows gathered first
    q, s = quantize_tiles_t(x, index, w) # the gathered rows scaled by w [R'] first (float32)
    q, s = quantize_tiles_t(xq, None, None, xs)  # requantized: xq e4m3 [R, C] in 1 x 128 tiles (scales xs)
                                                 # dequantized as read, then as above (ops.requantize_tiles_t)

XLA runs each of these as a reduce fusion plus a cast (and a transpose or gather); here a program reads its tile
once, reduces, scales and casts in registers, and writes e4m3 (transposed where asked). On the H200 XLA takes up to
2x their time on small's activations (on par for arrays under ~1M elements, where launch costs rule), 3-9x on the
gathered operand below; quantize_tiles moves 3.2 TB/s, 80-90% of a cast-only pass (BENCHMARKS.md, 2026-12-04
fifth FP8 session). Reading x once for both of a layer's quantizations ran slower than the two passes each of the
three times it was tried (a masked-store kernel, 128 x 128 BlockSpec tiles, then 128 x 128 tiles in slices with the
row codes re-read from L2: 1.3x the passes' time, BENCHMARKS.md 2026-12-05), so ops.quantize_both runs two passes.

A weight gradient x^T . dy contracts the tokens, and FP8 wgmma takes both operands K-major, so its operands are
the activations and output gradients transposed, tile-scaled along the tokens. Done by XLA as gather, transpose,
amax and cast, each of those is a pass over the [tokens, features] array, and the gather + transpose fusion it
builds reads rows of a gathered layout column-wise: on the H200 it took 7 ms per expert operand of `small` (four
per MoE layer) against 0.2-1 ms for the FP8 GEMM that consumes it (experiments/BENCHMARKS.md, 2026-12-04 third
session). A quantize_tiles_t program reads a 128-row x `block_c`-column tile once (rows gathered through `index`,
which also marks zero rows), takes each column's amax over its 128 rows, scales and casts in registers and writes
the tile transposed: one read and one (half-size) write.

Given x_scale, the kernel requantizes: x is the e4m3 codes of an earlier 1 x 128 quantization along C, each code
multiplied by its tile's scale as it is read, as DeepSeek-V3 builds its weight-gradient operands from the forward's
tiles (its report, section 3.5.2). Read a byte at a time, a tile takes a register layout that Triton converts
through shared memory before the reduction, and the pass ran slower than the bf16 one it replaces though it reads
half the bytes (H100: 0.39-0.42 ms against 0.27-0.32 on small's experts' rows); reading the codes as uint16 pairs
and reducing the even and odd columns as two planes (_packed_kernel) takes it to 0.32-0.33 ms (BENCHMARKS.md,
2026-12-06 eighteenth FP8 session). So the layers requantize only where it spares a write (the SwiGLU's results).

The rows are padded to whole 128-row tiles with zeros (zero rows do not change a tile's amax), as quantize_tiles
pads its last axis; an all-zero column tile gets scale 1, and a NaN poisons its tile, as in quantize.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_gemm.quantize import AMAX_FLOOR, E4M3, E4M3_MAX, INV_E4M3_MAX, TILE, tiles


def nan_amax(t, axis=None):
    """max |t| along axis (float32), NaN if the tile holds one (XLA's max propagates NaN; Triton's float max,
    maxnumf, ignores it). Taken on the bits: |t|'s float32 bit patterns order as the values do, and every NaN's
    above +inf's, so one integer max finds the largest magnitude and any NaN at once (an AND and a max an element,
    where the float way took an abs, a max, a NaN test, a select and a second max: PTX 20-49% shorter, BENCHMARKS.md
    twenty-fourth FP8 session; with to_e4m3's cast, the transposing and requantizing passes 10-30% faster on the
    H100, bit-equal compiled: twenty-fifth)."""
    bits = lax.bitcast_convert_type(t.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF
    top = jnp.max(bits, axis=axis)
    return jnp.where(top > 0x7F800000, jnp.nan, lax.bitcast_convert_type(top, jnp.float32))


def to_e4m3(t, amax):
    """(t * (448 / amax) as e4m3, scale amax * (1 / 448)) as quantize.py computes them, the division once per tile
    (amax is the tile's, broadcastable to t). Triton's float32 division is the approximate div.full, and so is
    XLA's on the GPU (experiments/bench_fp8_quantize.py --probe: 448 / amax equal on 2^20 values, 29% of them an
    ulp off IEEE), so the multipliers agree; the interpreter divides as XLA does on the CPU. quantize.py clips to
    +-448 before the cast; here the cast alone gives the same codes: |t| <= amax (floored amax only larger), so
    the product passes 448 by a rounding error at most, which the cast rounds to 448 (Hopper's cvt.rn.satfinite and
    the interpreter's round-to-nearest alike; e4m3fn turns NaN only from 464 up), and NaN stays NaN. That spares
    four instructions an element (clip, NaN test, select) in passes that issue ~25 per element."""
    zero = amax == 0
    # amax is NaN where the tile holds one (nan_amax): jnp.maximum lowers to Triton's NaN-ignoring max, so put it back
    amax = jnp.where(zero, 1.0, jnp.where(amax != amax, jnp.nan, jnp.maximum(amax, AMAX_FLOOR)))
    scale = jnp.where(zero, 1.0, amax * INV_E4M3_MAX)
    return (t * jnp.where(zero, 1.0, E4M3_MAX / amax)).astype(E4M3), scale


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
    if x_ref.dtype == E4M3:  # Triton's lowering casts no `other` to float8: masked lanes zeroed after the load
        tile = jnp.where(ok, pltriton.load(x_ref.at[src[:, None], col[None, :]], mask=ok).astype(jnp.float32), 0.0)
    else:
        tile = pltriton.load(x_ref.at[src[:, None], col[None, :]], mask=ok, other=0).astype(jnp.float32)
    return src, row_ok, ok, tile


BLOCK_C = 64  # columns per program: a 128 x 64 bf16 tile is 16 KiB of registers across 4 warps
# The requantizer (x_scale given): 128 columns of e4m3 codes read as uint16 pairs where C is even (_packed_kernel).
# On the H100 at small's experts' rows (237,568 x 1024, BENCHMARKS.md eighteenth FP8 session) 0.320-0.329 ms,
# against 0.38-0.40 for the same tile in bytes and 0.36-0.49 for 32 or 64 columns (2-8 warps); uint32 quads
# (pack=4) tie the pairs (0.319-0.321 ms, nineteenth FP8 session; 0.247-0.255 against 0.257-0.258 with the
# bit-wise nan_amax, twenty-fifth), so the default stays 2.
BLOCK_C_E4M3 = 128
PACK = 2


def _kernel(index_ref, rs_ref, xs_ref, x_ref, q_ref, s_ref, *, rows, cols, block_c, gather, blocked, row_scale, tiled):
    if blocked:  # x_ref is this program's [128, block_c] tile
        t = x_ref[...].astype(jnp.float32)
    else:
        col = pl.program_id(1) * block_c + jnp.arange(block_c, dtype=jnp.int32)
        src, row_ok, _, t = _load_rows(index_ref, x_ref, col, rows, cols, gather)
        if tiled:  # x holds e4m3 codes of 1 x 128 tiles along C: this program's columns lie in one of them
            tile = pl.program_id(1) * block_c // TILE
            t = t * pltriton.load(xs_ref.at[src, tile], mask=row_ok[:, 0], other=0)[:, None]
    if row_scale:
        t = t * rs_ref[...][:, None]
    q, scale = to_e4m3(t, nan_amax(t, axis=0)[None, :])  # one scale per column over the tile's 128 rows
    q_ref[...] = q.T
    s_ref[...] = scale


def _packed_kernel(index_ref, rs_ref, xs_ref, x_ref, q_ref, s_ref, *, rows, cols, block_c, gather, row_scale, pack):
    """_kernel's requantization (x_scale given) with `pack` e4m3 codes read as one unsigned integer (2: uint16
    pairs, 4: uint32 quads), x_ref [R, C / pack]: the columns j, j + pack, ... (byte j of each) reduced and stored as
    their own plane. Loaded as bytes, a tile takes a register layout that Triton converts through shared memory
    before the column reduction."""
    width = block_c // pack
    colp = pl.program_id(1) * width + jnp.arange(width, dtype=jnp.int32)
    src = index_ref[...] if gather else pl.program_id(0) * TILE + jnp.arange(TILE, dtype=jnp.int32)
    row_ok = src < rows
    ok = row_ok[:, None] & (colp < cols // pack)[None, :]
    words = pltriton.load(x_ref.at[src[:, None], colp[None, :]], mask=ok, other=0)
    row_s = pltriton.load(xs_ref.at[src, pl.program_id(1) * block_c // TILE], mask=row_ok, other=0)[:, None]
    for j in range(pack):
        code = ((words >> (8 * j)) & 0xFF).astype(jnp.uint8)
        t = lax.bitcast_convert_type(code, E4M3).astype(jnp.float32) * row_s
        if row_scale:
            t = t * rs_ref[...][:, None]
        q, scale = to_e4m3(t, nan_amax(t, axis=0)[None, :])
        out = pack * jnp.arange(width, dtype=jnp.int32) + j  # this plane's columns: rows of the transposed output
        pltriton.store(q_ref.at[out[:, None], jnp.arange(TILE, dtype=jnp.int32)[None, :]], q.T)
        pltriton.store(s_ref.at[jnp.zeros((width,), jnp.int32), out], scale[0])


@functools.partial(jax.jit, static_argnames=("interpret", "block_c", "num_warps", "blocked", "pack"))
def quantize_tiles_t(
    x,
    index=None,
    row_scale=None,
    x_scale=None,
    *,
    interpret: bool = False,
    block_c: int | None = None,
    num_warps: int = 4,
    blocked: bool = False,
    pack: int | None = None,
):
    """x [R, C] (index None) -> (q float8_e4m3fn [C, R], s float32 [C, ceil(R / 128)]) = quantize_tiles(x.T).
    With index [R'] int32 (ops.align_groups' layout: row p is x[index[p]], a zero row where index[p] >= R; R' a
    multiple of 128): q [C, R'], s [C, R' / 128] = quantize_tiles(take_aligned(x, index).T). row_scale [R'] (or [R]
    without index) float32: each output row multiplied by its entry (in float32, before the amax), e.g. the routing
    weights of the experts' rows gathered from the tokens' gradient. x_scale [R, ceil(C / 128)] float32: x is e4m3
    codes in 1 x 128 tiles along C (quantize_tiles' output) and each is dequantized (code * its tile's scale, in
    float32) as it is read, before the row scale: DeepSeek-V3's requantization of the forward's tiles into the
    weight gradient's (block_c must divide 128); pack (None: PACK) codes are read as one integer (_packed_kernel)
    where it divides C and block_c, else one by one. blocked (no index, row_scale or x_scale, 128 dividing R and
    block_c dividing C): the input tiles as BlockSpec blocks, no masked pointer loads."""
    rows, cols = x.shape
    tiled = x_scale is not None
    block_c = block_c or (BLOCK_C_E4M3 if tiled else BLOCK_C)
    if tiled and (x.dtype != E4M3 or x_scale.shape != (rows, tiles(cols)) or TILE % block_c):
        raise ValueError(
            f"x_scale: x must be e4m3 codes with scales [{rows}, {tiles(cols)}] and block_c must divide {TILE}, got "
            f"{x.dtype}, {x_scale.shape}, block_c={block_c}"
        )
    gather, out_rows, index, idx_spec = _rows_source(x, index)
    row_tiles, col_blocks = tiles(out_rows), -(-cols // block_c)
    scaled = row_scale is not None
    if scaled and row_scale.shape != (out_rows,):
        raise ValueError(f"row_scale must be [{out_rows}] (one per output row), got {row_scale.shape}")
    rs = jnp.pad(row_scale.astype(jnp.float32), (0, row_tiles * TILE - out_rows)) if scaled else jnp.zeros((TILE,))
    rs_spec = pl.BlockSpec((TILE,), (lambda r, c: (r,)) if scaled else (lambda r, c: (0,)))
    xs = x_scale.astype(jnp.float32) if tiled else jnp.zeros((1, 1), jnp.float32)
    xs_spec = pl.BlockSpec(xs.shape, lambda r, c: (0, 0))
    blocked = blocked and not (gather or scaled or tiled) and rows % TILE == 0 and cols % block_c == 0
    pack = PACK if pack is None else pack
    if pack not in (1, 2, 4):
        raise ValueError(f"pack must be 1, 2 or 4 (codes per load), got {pack}")
    if tiled and pack > 1 and cols % pack == 0 and block_c % pack == 0:  # a bitcast to wider words, no copy
        x = lax.bitcast_convert_type(x.reshape(rows, cols // pack, pack), {2: jnp.uint16, 4: jnp.uint32}[pack])
        kernel = functools.partial(_packed_kernel, gather=gather, row_scale=scaled, pack=pack)
    else:
        kernel = functools.partial(_kernel, gather=gather, blocked=blocked, row_scale=scaled, tiled=tiled)
    x_spec = pl.BlockSpec((TILE, block_c) if blocked else x.shape, lambda r, c: (r, c) if blocked else (0, 0))
    q, s = pl.pallas_call(
        functools.partial(kernel, rows=rows, cols=cols, block_c=block_c),
        grid=(row_tiles, col_blocks),
        in_specs=[idx_spec, rs_spec, xs_spec, x_spec],
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
        name="fp8_requantize_tiles_t" if tiled else "fp8_quantize_tiles_t",
    )(index, rs, xs, x)
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


def _blocks_kernel(w_ref, e_ref, *out_refs, k: int, n: int, groups: int, extra: int):
    g, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, j = g // (groups + extra), g % (groups + extra)  # a layer's own groups, then its `extra` ones
    kk = kb * TILE + jnp.arange(TILE, dtype=jnp.int32)
    nn = nb * TILE + jnp.arange(TILE, dtype=jnp.int32)
    ok = (kk < k)[:, None] & (nn < n)[None, :]
    # groups past w's come from `extra` (masked loads: only one of the two is read)
    own, other = ok & (j < groups), ok & (j >= groups)
    b = pltriton.load(
        w_ref.at[layer * groups + jnp.minimum(j, groups - 1), kk[:, None], nn[None, :]], mask=own, other=0
    )
    if extra:
        at = (layer * extra + jnp.maximum(j - groups, 0), kk[:, None], nn[None, :])
        b = jnp.where(j < groups, b, pltriton.load(e_ref.at[at], mask=other, other=0))
    b = b.astype(jnp.float32)
    amax = jnp.full((1, TILE), nan_amax(b), jnp.float32)  # one scale per 128 x 128 block, as a row
    q, scale = to_e4m3(b, amax)
    q_ref, s_ref, *t_ref = out_refs
    if t_ref:  # N-major, the dgrad's operand (transposed_blocks' layout); stored first: the other order crashes
        # ptxas -O0 (error 11; XLA's --xla_backend_optimization_level=0, as the tests set on the CPU)
        pltriton.store(t_ref[0].at[g, kk[:, None], nn[None, :]], q, mask=ok)
    pltriton.store(q_ref.at[g, nn[:, None], kk[None, :]], q.T, mask=ok.T)  # K-major: [N, K]
    s_ref[...] = jnp.full((1, 1, 1), jnp.max(scale), jnp.float32)  # the row's entries are equal


@functools.partial(jax.jit, static_argnames=("transposed", "interpret"))
def quantize_blocks(w, extra=None, *, transposed: bool = False, interpret: bool = False):
    """w [..., K, N] -> (q float8_e4m3fn [..., N, K], s float32 [..., ceil(N / 128), ceil(K / 128)]) =
    quantize.quantize_blocks(w): transposed while quantized, in one pass over the master weights. extra [..., S, K,
    N] beside w [..., G, K, N] (the same leading axes): quantize_blocks of the two stacked along G (-> [..., G + S, N,
    K]) with no concatenated copy of the master weights (the routed experts' and the shared experts' weights in one
    grouped GEMM; with a leading layer axis, every layer's at once). transposed: also (q^T [..., K, N], s^T), =
    quantize.transposed_blocks(q, s), written by the same pass (a stack of every layer's blocks, whose per-layer
    transposes would each be a pass over the whole stack)."""
    *lead, k, n = w.shape
    if extra is not None:
        if not lead or extra.shape[:-3] != tuple(lead[:-1]) or extra.shape[-2:] != (k, n) or extra.dtype != w.dtype:
            raise ValueError(
                f"extra must be [..., S, {k}, {n}] {w.dtype} beside w {w.shape} (the same leading axes), got "
                f"{extra.shape} {extra.dtype}"
            )
    groups = lead[-1] if lead else 1
    layers = math.prod(lead[:-1])
    extras = 0 if extra is None else extra.shape[-3]
    lead = [*lead[:-1], groups + extras] if lead else []
    w3 = w.reshape(layers * groups, k, n)
    e3 = w3 if extra is None else extra.reshape(layers * extras, k, n)
    g, kt, nt = layers * (groups + extras), tiles(k), tiles(n)
    whole = lambda a: pl.BlockSpec(a.shape, lambda g, i, j: (0,) * len(a.shape))  # noqa: E731
    q_type = [jax.ShapeDtypeStruct((g, n, k), E4M3), jax.ShapeDtypeStruct((g, nt, kt), jnp.float32)]
    out_specs = [whole(q_type[0]), pl.BlockSpec((1, 1, 1), lambda g, i, j: (g, j, i))]
    if transposed:
        q_type.append(jax.ShapeDtypeStruct((g, k, n), E4M3))
        out_specs.append(whole(q_type[-1]))
    q, s, *t = pl.pallas_call(
        functools.partial(_blocks_kernel, k=k, n=n, groups=groups, extra=extras),
        grid=(g, kt, nt),
        in_specs=[whole(w3), whole(e3)],
        out_specs=out_specs,
        out_shape=q_type,
        compiler_params=_params(8),
        interpret=interpret,
        name="fp8_quantize_blocks",
    )(w3, e3)
    q, s = q.reshape(*lead, n, k), s.reshape(*lead, nt, kt)
    if not transposed:
        return q, s
    return q, s, t[0].reshape(*lead, k, n), jnp.swapaxes(s, -1, -2)
