"""Public FP8 GEMMs: shape checks and backend dispatch.

    out = fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype=jnp.bfloat16, backend="auto")  # w_q [G, N, K]
    out = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16, backend="auto")              # w_q [N, K]
    dw = fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes)  # a [K, M], b [N, M], tile-scaled along M -> [G, K, N]

Operands come from quantize_tiles / quantize_blocks (quantize.py). Backends: "gpu" (gpu.py: Mosaic GPU, Hopper
e4m3 wgmma with per-128-K promotion; tested in interpret mode, not yet compiled on a GPU), "xla" (the reference:
dequantize, float32 product) and "tpu" (the same reference, stated: no TPU FP8 kernel yet). "auto" is the reference
until the GPU kernel is measured. fp8_tgmm (the weight gradient) is the reference on every backend.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.fp8_gemm import gpu, reference
from pallas_kernels.fp8_gemm.quantize import E4M3, TILE, tiles

BACKENDS = ("auto", "gpu", "xla", "tpu")


def resolve_backend(backend: str) -> str:
    """ "gpu": the Mosaic GPU kernel (gpu.py; Hopper). "auto" stays the XLA reference everywhere until that kernel
    has been compiled and measured on the GPU; "tpu" is the reference too (no TPU FP8 kernel)."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    return "gpu" if backend == "gpu" else "xla"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype, interpret):
    """The kernel's operand layouts and tile multiples: scales transposed / expanded to columns, M padded to a
    multiple of 8 (and at least one row tile), K to the 128 scaling tile, N to the column tile."""
    cfg = gpu.Fp8GpuConfig()
    m, k = x_q.shape
    g, n, _ = w_q.shape
    mp, kp, np_ = max(_round_up(m, 8), cfg.block_m), _round_up(k, TILE), _round_up(n, cfg.block_n)
    x_q = jnp.pad(x_q, ((0, mp - m), (0, kp - k)))
    xs_t = jnp.pad(x_s, ((0, mp - m), (0, 0)), constant_values=1.0).T
    w_q = jnp.pad(w_q, ((0, 0), (0, np_ - n), (0, kp - k)))
    ws_cols = jnp.swapaxes(jnp.repeat(w_s, TILE, axis=1)[:, :n], 1, 2)  # [G, K/128, N]
    ws_cols = jnp.pad(ws_cols, ((0, 0), (0, 0), (0, np_ - n)), constant_values=1.0)
    out = gpu.fp8_gmm(x_q, xs_t, w_q, ws_cols, group_sizes, interpret=interpret, out_dtype=out_dtype)
    return out[:m, :n]


def _check(x_q, x_s, w_q, w_s, grouped: bool, rhs_tiles: bool = False):
    want_w = 3 if grouped else 2
    if x_q.ndim != 2 or w_q.ndim != want_w:
        raise ValueError(
            f"x_q must be [M, K] and w_q {'[G, N, K]' if grouped else '[N, K]'}, got {x_q.shape}, {w_q.shape}"
        )
    if x_q.dtype != E4M3 or w_q.dtype != E4M3:
        raise ValueError(f"x_q and w_q must be float8_e4m3fn, got {x_q.dtype}, {w_q.dtype}")
    m, k = x_q.shape
    *lead, n, kw = w_q.shape
    if kw != k:
        raise ValueError(f"contraction mismatch: x_q has K={k}, w_q has K={kw} (w_q is K-major [..., N, K])")
    w_scales = (*lead, n if rhs_tiles else tiles(n), tiles(k))
    if x_s.shape != (m, tiles(k)) or w_s.shape != w_scales:
        raise ValueError(f"scales: x_s {x_s.shape} should be {(m, tiles(k))}, w_s {w_s.shape} should be {w_scales}")


def fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, *, out_dtype=jnp.bfloat16, backend="auto", interpret=False):
    """Grouped FP8 matmul: rows of x_q sorted by group; [M, K] x [G, N, K] -> [M, N] in out_dtype."""
    _check(x_q, x_s, w_q, w_s, grouped=True)
    if group_sizes.shape != (w_q.shape[0],):
        raise ValueError(f"group_sizes must be [G={w_q.shape[0]}], got {group_sizes.shape}")
    if resolve_backend(backend) == "gpu":
        return _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes.astype(jnp.int32), out_dtype, interpret)
    return reference.fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype=out_dtype)


def fp8_gemm(x_q, x_s, w_q, w_s, *, out_dtype=jnp.bfloat16, rhs_tiles=False, backend="auto", interpret=False):
    """Dense FP8 matmul: [M, K] x [N, K] -> [M, N] in out_dtype. rhs_tiles: w_s are 1 x 128 tile scales
    [N, ceil(K / 128)] (both operands activations or gradients, as in a weight gradient; reference only)."""
    _check(x_q, x_s, w_q, w_s, grouped=False, rhs_tiles=rhs_tiles)
    if resolve_backend(backend) == "gpu" and not rhs_tiles:  # one group holding every row
        sizes = jnp.asarray([x_q.shape[0]], jnp.int32)
        return _gpu_gmm(x_q, x_s, w_q[None], w_s[None], sizes, out_dtype, interpret)
    return reference.fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=out_dtype, rhs_tiles=rhs_tiles)


def fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, *, out_dtype=jnp.float32, backend="auto", interpret=False):
    """Grouped weight gradient: a [K, M], b [N, M], both tile-scaled along M (quantize_tiles of the transposed
    activations and output gradients) -> [G, K, N]."""
    del interpret
    _check(a_q, a_s, b_q, b_s, grouped=False, rhs_tiles=True)
    resolve_backend(backend)
    return reference.fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, out_dtype=out_dtype)
