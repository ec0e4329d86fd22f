"""FP8 e4m3 weights with 128x128 block scales: the format of the released DeepSeek-V3/R1 checkpoints.

A quantized weight W [out, in] is stored as Q (float8_e4m3fn, same shape) plus `<name>_scale_inv` S (float32,
[ceil(out / 128), ceil(in / 128)]), and W = Q * S[i // 128, j // 128]. Edge blocks are ragged: the 576-row
kv_a_proj_with_mqa has S of shape [5, 56], its last row block holding 64 rows.

Pure NumPy functions. They work 128 rows at a time, so converting a [18432, 7168] weight never builds a float32
copy of the whole tensor (only one row block of it).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

from pallas_kernels.fp8_gemm.quantize import AMAX_FLOOR, E4M3_MAX, INV_E4M3_MAX
from pallas_kernels.fp8_gemm.quantize import TILE as BLOCK

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)

# The tensors the released checkpoint stores in FP8: every attention projection, the dense MLPs, routed and shared
# experts (also inside the MTP block). Embeddings, lm_head, norms, the router (mlp.gate) and MTP's eh_proj stay bf16.
_FP8_NAME = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
)

QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


def is_fp8_weight(name: str) -> bool:
    """Whether the released format stores this HF tensor in FP8 (and so `--fp8` quantizes it)."""
    return _FP8_NAME.search(name) is not None


def scale_name(name: str) -> str:
    return name + "_scale_inv"


def scale_shape(shape, block: int = BLOCK) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"FP8 block scales need a 2-d weight, got shape {tuple(shape)}")
    return -(-shape[0] // block), -(-shape[1] // block)


def _per_column(row_of_scales: np.ndarray, cols: int, block: int) -> np.ndarray:
    """One row of block scales [ceil(cols / block)] -> one scale per column [cols] (the last block ragged)."""
    return np.repeat(row_of_scales, block)[:cols]


def _check(q, s, block, name):
    if q.ndim != 2:
        raise ValueError(f"{name}: FP8 weight must be 2-d, got shape {q.shape}")
    if s.shape != scale_shape(q.shape, block):
        raise ValueError(
            f"{name}: scale_inv has shape {s.shape}, but a {q.shape} weight with {block}x{block} blocks "
            f"needs {scale_shape(q.shape, block)}"
        )


# float8 -> float32 by table lookup (np.take), and float32 -> bf16 by integer round-to-nearest-even on the bit
# pattern: both several times faster than ml_dtypes' element-wise casts, which dominated conversion time.
_E4M3_TO_F32 = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _round_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 (finite, modified in place) -> the uint16 bit pattern of bf16(x), round to nearest even."""
    v = x.view(np.uint32)
    v += ((v >> 16) & 1) + 0x7FFF
    v >>= 16
    return v


def to_float32(a: np.ndarray) -> np.ndarray:
    """Exact widening to float32: bf16 by shifting its bits into the high half, e4m3 by table; ~10x ml_dtypes."""
    a = np.asarray(a)
    if a.dtype == _BF16:
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if a.dtype == E4M3:
        return np.take(_E4M3_TO_F32, a.view(np.uint8))
    return a.astype(np.float32)


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """np.asarray(a).astype(dtype) (no copy when equal), with the fast paths for bf16 <-> float32."""
    a, dtype = np.asarray(a), np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if dtype == np.float32:
        return to_float32(a)
    if dtype == _BF16 and a.dtype == np.float32 and not np.isnan(a).any():
        return _round_to_bf16_bits(a.copy()).astype(np.uint16).view(_BF16)
    return a.astype(dtype)


def dequantize(
    q: np.ndarray, scale_inv: np.ndarray, dtype=np.float32, block: int = BLOCK, name: str = "weight"
) -> np.ndarray:
    """Q [out, in] (e4m3) and S -> dtype(float32(Q) * S per block): the product is formed in float32 and rounded
    once, as the official code and transformers do, so bf16 output is bit-identical to theirs."""
    q, s = np.asarray(q), np.asarray(scale_inv, np.float32)
    _check(q, s, block, name)
    if q.dtype != E4M3:
        raise ValueError(f"{name}: expected a float8_e4m3fn weight, got {q.dtype}")
    dtype = np.dtype(dtype)
    out = np.empty(q.shape, dtype)
    codes = q.view(np.uint8)
    for b in range(s.shape[0]):
        rows = slice(b * block, (b + 1) * block)
        x = np.take(_E4M3_TO_F32, codes[rows])
        x *= _per_column(s[b], q.shape[1], block)
        if dtype == _BF16:
            out.view(np.uint16)[rows] = _round_to_bf16_bits(x)
        else:
            out[rows] = x
    return out


def quantize(w: np.ndarray, block: int = BLOCK, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """W [out, in] -> (Q e4m3, S float32): S = amax(|block|) / 448, Q = round-to-nearest-even(W / S).

    The block's largest entry maps to +-448, so the full e4m3 range is used. An all-zero block gets the smallest
    positive scale (any positive scale stores zeros exactly). Non-finite weights are an error: they would
    poison a whole block's scale.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: FP8 quantization needs a 2-d weight, got shape {w.shape}")
    rows_n, cols = w.shape
    s = np.empty(scale_shape(w.shape, block), np.float32)
    q = np.empty(w.shape, E4M3)
    pad = s.shape[1] * block - cols
    for b in range(s.shape[0]):
        rows = slice(b * block, (b + 1) * block)
        x = to_float32(w[rows])
        a = np.abs(x)
        if pad:
            a = np.pad(a, ((0, 0), (0, pad)))
        amax = a.reshape(a.shape[0], s.shape[1], block).max(axis=(0, 2))
        if not np.isfinite(amax).all():
            raise ValueError(
                f"{name}: non-finite values in rows {rows.start}:{min(rows.stop, rows_n)}; cannot quantize to FP8"
            )
        # quantize.py's formula (one source of the codes): x * (448 / amax), scale amax / 448, zero block scale 1
        zero = amax == 0
        amax = np.maximum(amax, np.float32(AMAX_FLOOR))
        s[b] = np.where(zero, np.float32(1), amax * INV_E4M3_MAX)
        # x * (448 / amax) can exceed 448 by a rounding error at the block maximum; clip so it cannot become NaN.
        x *= _per_column(np.where(zero, np.float32(1), np.float32(E4M3_MAX) / amax), cols, block)
        np.clip(x, -E4M3_MAX, E4M3_MAX, out=x)
        q.view(np.uint8)[rows] = e4m3_codes(x.reshape(-1)).reshape(x.shape)
    return q, s


def e4m3_codes(x: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """float32 (finite, |x| <= 448) -> float8_e4m3fn bit patterns, round to nearest even: equal to ml_dtypes' cast
    (tests check every e4m3 value, midpoint and neighbour) and 2-3x faster, working in L2-sized chunks.

    Normal range: round the 23-bit mantissa to 3 bits on the integer pattern (adding 0x7FFFF plus the kept lsb
    carries into the exponent when it should), then rebias the exponent 127 -> 7. Below 2^-6 e4m3 is subnormal,
    multiples of 2^-9: rint(|x| * 512), which is exact and rounds half to even."""
    out = np.empty(x.shape, np.uint8)
    for i in range(0, x.size, chunk):
        v = x[i : i + chunk]
        u = v.view(np.uint32)
        a = u & np.uint32(0x7FFFFFFF)
        r = a + (np.uint32(0x7FFFF) + ((a >> 20) & 1))
        code = ((r >> 20) - np.uint32(120 << 3)).astype(np.uint8)  # exponent << 3 | mantissa, rebiased
        sub = a < np.uint32(0x3C800000)  # |x| < 2^-6
        if sub.any():
            code[sub] = np.rint(np.abs(v[sub]) * np.float32(512)).astype(np.uint8)
        code |= ((u >> 24) & 0x80).astype(np.uint8)
        out[i : i + chunk] = code
    return out


def error_bound(w: np.ndarray, scale_inv: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Elementwise bound on |W - dequantize(quantize(W))|, in float32.

    e4m3 has 3 mantissa bits: round-to-nearest errs by at most 2^-4 relative for normal values, and by half the
    subnormal spacing (2^-10 in scaled units, i.e. 2^-10 * S) below 2^-6. The sum bounds both cases.
    """
    w = np.abs(to_float32(w))
    s = np.asarray(scale_inv, np.float32)
    per = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[: w.shape[0], : w.shape[1]]
    return w * 2.0**-4 + per * 2.0**-10
