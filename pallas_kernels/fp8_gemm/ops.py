"""Public FP8 GEMMs: shape checks and backend dispatch.

    out = fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype=jnp.bfloat16, backend="auto")  # w_q [G, N, K]
    out = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16, backend="auto")              # w_q [N, K]
    dw = fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes)  # a [K, M], b [N, M], tile-scaled along M -> [G, K, N]

Operands come from quantize_tiles / quantize_blocks (quantize.py). Backends: "gpu" (gpu.py: Mosaic GPU, Hopper
e4m3 wgmma with per-128-K promotion; on the H200 1.4-1.6x our bf16 gmm / XLA's bf16 dot at DeepSeek-V3's shapes,
no faster at K = 1024), "xla" (the reference: dequantize, float32 product) and "tpu" (the same reference, stated:
no TPU FP8 kernel yet). These ops take no platform, so "auto" is the reference; dsjax.runtime picks the model's
backend from the devices a run targets. fp8_gemm's dense weight gradient (rhs_tiles) runs the same GPU
kernel; fp8_tgmm (the grouped weight gradient, whose groups split the contraction) has its own (gpu_tgmm.py), which
needs groups laid out on 128-row steps (align_groups).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm import gpu, gpu_tgmm, reference
from pallas_kernels.fp8_gemm.quantize import E4M3, TILE, tiles

BACKENDS = ("auto", "gpu", "xla", "tpu")


def resolve_backend(backend: str) -> str:
    """ "gpu": the Mosaic GPU kernel (gpu.py; Hopper). "auto" (these ops know no platform) and "tpu" (no TPU FP8
    kernel) are the XLA reference."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    return "gpu" if backend == "gpu" else "xla"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype, interpret, config, rhs_tiles=False):
    """The kernel's operand layouts and tile multiples: scales transposed / expanded to columns, M padded to a
    multiple of 8 (and at least one row tile), K to the 128 scaling tile, N to the column tile. The kernel takes
    one scale per output column per K step, so tile-scaled rhs rows ([G, N, K/128], rhs_tiles) feed it as they are
    and 128 x 128 block scales are repeated over their block's columns."""
    cfg = config or gpu.GEMM_CONFIG
    m, k = x_q.shape
    g, n, _ = w_q.shape
    mp, kp, np_ = max(_round_up(m, 8), cfg.block_m), _round_up(k, TILE), _round_up(n, cfg.block_n * cfg.cluster_n)
    x_q = jnp.pad(x_q, ((0, mp - m), (0, kp - k)))
    xs_t = jnp.pad(x_s, ((0, mp - m), (0, 0)), constant_values=1.0).T
    w_q = jnp.pad(w_q, ((0, 0), (0, np_ - n), (0, kp - k)))
    ws_cols = jnp.swapaxes(w_s if rhs_tiles else jnp.repeat(w_s, TILE, axis=1)[:, :n], 1, 2)  # [G, K/128, N]
    ws_cols = jnp.pad(ws_cols, ((0, 0), (0, 0), (0, np_ - n)), constant_values=1.0)
    out = gpu.fp8_gmm(
        x_q,
        xs_t,
        w_q,
        ws_cols,
        group_sizes,
        config=cfg,
        interpret=interpret,
        out_dtype=out_dtype,
        w_scales="column" if rhs_tiles else "block",
    )
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


def fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, *, out_dtype=jnp.bfloat16, backend="auto", interpret=False, config=None):
    """Grouped FP8 matmul: rows of x_q sorted by group; [M, K] x [G, N, K] -> [M, N] in out_dtype. config: the
    GPU kernel's gpu.Fp8GpuConfig (None: its defaults)."""
    _check(x_q, x_s, w_q, w_s, grouped=True)
    if group_sizes.shape != (w_q.shape[0],):
        raise ValueError(f"group_sizes must be [G={w_q.shape[0]}], got {group_sizes.shape}")
    if resolve_backend(backend) == "gpu":
        return _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes.astype(jnp.int32), out_dtype, interpret, config)
    return reference.fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype=out_dtype)


def fp8_gemm(
    x_q, x_s, w_q, w_s, *, out_dtype=jnp.bfloat16, rhs_tiles=False, backend="auto", interpret=False, config=None
):
    """Dense FP8 matmul: [M, K] x [N, K] -> [M, N] in out_dtype. rhs_tiles: w_s are 1 x 128 tile scales
    [N, ceil(K / 128)] (both operands activations or gradients, as in a weight gradient: x.T and dy.T quantized
    along the tokens they contract)."""
    _check(x_q, x_s, w_q, w_s, grouped=False, rhs_tiles=rhs_tiles)
    if resolve_backend(backend) == "gpu":  # one group holding every row
        sizes = jnp.asarray([x_q.shape[0]], jnp.int32)
        return _gpu_gmm(x_q, x_s, w_q[None], w_s[None], sizes, out_dtype, interpret, config, rhs_tiles)
    return reference.fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=out_dtype, rhs_tiles=rhs_tiles)


def align_groups(group_sizes, m: int):
    """Row layout for the grouped weight gradient on the GPU: every group starts on a 128-row step.

    -> (index [M_aligned] int32, aligned sizes [G]): row p of the aligned layout is row index[p] of the original
    [M, ...] rows, or zero where index[p] == M (take_aligned applies it). M_aligned = round_up(M, 128) +
    128 * G bounds sum(round_up(size, 128)); aligned sizes are the sizes rounded up to 128 (the zero rows a
    group's last step holds). Rows past sum(group_sizes) are left out."""
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + TILE - 1) // TILE * TILE
    ends = jnp.cumsum(padded)
    p = jnp.arange(_round_up(m, TILE) + TILE * g, dtype=jnp.int32)
    owner = jnp.minimum(jnp.searchsorted(ends, p, side="right"), g - 1).astype(jnp.int32)
    offset = p - (ends - padded)[owner]
    valid = (p < ends[-1]) & (offset < sizes[owner])
    index = jnp.where(valid, (jnp.cumsum(sizes) - sizes)[owner] + offset, m)
    return index.astype(jnp.int32), padded


def take_aligned(x, index):
    """x [M, ...] in align_groups' layout: the rows at `index`, a zero row where index == M."""
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index]


def fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, *, out_dtype=jnp.float32, backend="auto", interpret=False, config=None):
    """Grouped weight gradient: a [K, M], b [N, M], both tile-scaled along M (quantize_tiles of the transposed
    activations and output gradients) -> [G, K, N]. backend "gpu" (gpu_tgmm.py) needs every group to start on a
    128-row step (align_groups), so no 128-token scaling tile spans two groups; given misaligned groups it returns
    NaN rather than a wrong gradient. The reference takes any groups."""
    _check(a_q, a_s, b_q, b_s, grouped=False, rhs_tiles=True)
    if resolve_backend(backend) != "gpu":
        return reference.fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, out_dtype=out_dtype)
    cfg = config or gpu.Fp8GpuConfig()
    k, m = a_q.shape
    n = b_q.shape[0]
    kp, mp, np_ = _round_up(k, cfg.block_m), _round_up(m, TILE), _round_up(n, cfg.block_n)
    a_q = jnp.pad(a_q, ((0, kp - k), (0, mp - m)))
    b_q = jnp.pad(b_q, ((0, np_ - n), (0, mp - m)))
    as_t = jnp.pad(a_s, ((0, kp - k), (0, 0)), constant_values=1.0).T
    bs_t = jnp.pad(b_s, ((0, np_ - n), (0, 0)), constant_values=1.0).T
    sizes = group_sizes.astype(jnp.int32)
    aligned = jnp.all((jnp.cumsum(sizes) - sizes) % TILE == 0)

    def kernel():
        out = gpu_tgmm.fp8_tgmm(a_q, as_t, b_q, bs_t, sizes, config=cfg, interpret=interpret, out_dtype=out_dtype)
        return out[:, :k, :n]

    return lax.cond(aligned, kernel, lambda: jnp.full((sizes.shape[0], k, n), jnp.nan, out_dtype))
