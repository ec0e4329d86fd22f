"""Public FP8 GEMMs and quantizers: shape checks and backend dispatch.

    x_q, x_s = quantize_tiles(x, backend="auto")       # also quantize_blocks(w), quantize_tiles_t(x[, index[,
                                                       # row_scale]]), quantize_both(x[, index]) = tiles + tiles_t
    t_q, t_s = requantize_tiles_t(x_q, x_s[, index[, row_scale]])  # = quantize_tiles_t(dequantized x_q, ...)
    h, (h_q, h_s) = act_quantize(gu, act, dtype)       # an activation fused with its quantization (and its
                                                       # backward: act_bwd_quantize(gu, dh, act))
    out = fp8_gmm(x_q, x_s, w_q, w_s, group_sizes, out_dtype=jnp.bfloat16, backend="auto")  # w_q [G, N, K]
    out = fp8_gmm(..., group_sizes, group_offset=l * G)   # w_q [L * G, N, K]: groups l * G.. of a stack, in place
    out = fp8_gemm(x_q, x_s, w_q, w_s, out_dtype=jnp.bfloat16, backend="auto")              # w_q [N, K]
    dw = fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes)  # a [K, M], b [N, M], tile-scaled along M -> [G, K, N]

Operands come from quantize_tiles / quantize_blocks / quantize_tiles_t: quantize.py's XLA ops, or with backend "gpu"
their single-pass Pallas Triton kernels (quantize_gpu.py, bit-equal). GEMM backends: "gpu" (gpu.py: Mosaic GPU,
Hopper e4m3 wgmma with per-128-K promotion; on the H200 1.4-1.6x our bf16 gmm / XLA's bf16 dot at DeepSeek-V3's
shapes, 1.0-1.3x at K = 512-1024), "xla" (the reference: dequantize, float32 product) and "tpu" (the same reference,
stated: no TPU FP8 kernel yet). These ops take no platform, so "auto" is the reference; dsjax.runtime picks the
model's backend from the devices a run targets. fp8_gemm's dense weight gradient (rhs_tiles) runs the same GPU
kernel; fp8_tgmm (the grouped weight gradient, whose groups split the contraction) has its own (gpu_tgmm.py), which
needs groups laid out on 128-row steps (align_groups).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_gemm import gpu, gpu_config, gpu_ring, gpu_tgmm, quantize, quantize_act, quantize_gpu, reference
from pallas_kernels.fp8_gemm.quantize import E4M3, TILE, tiles
from pallas_kernels.grouped_matmul import gpu_common
from pallas_kernels.grouped_matmul.reference import group_of

BACKENDS = ("auto", "gpu", "xla", "tpu")


def resolve_backend(backend: str) -> str:
    """ "gpu": the Mosaic GPU kernel (gpu.py; Hopper). "auto" (these ops know no platform) and "tpu" (no TPU FP8
    kernel) are the XLA reference."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")
    return "gpu" if backend == "gpu" else "xla"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# The kernels run under jit so that a model's many call sites of one kernel shape are traced and lowered to Mosaic GPU
# once, not once per site (jit caches a function's trace by shapes and static arguments, and a module lowers a
# cached trace to one function): an unrolled FP8 train step has ~250 kernel sites of ~40 distinct kernels, and
# lowering each site on its own took 80+ s of Python per compile.
@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9))
def _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes, first, out_dtype, interpret, config, rhs_tiles=False):
    """The kernel's operand layouts and tile multiples: scales transposed / expanded to columns, M padded to a
    multiple of 8 (and at least one row tile), K to the 128 scaling tile, N to the column tile. The kernel takes
    one scale per output column per K step, so tile-scaled rhs rows ([G, N, K/128], rhs_tiles) feed it as they are
    and 128 x 128 block scales are repeated over their block's columns. first (int32 scalar or None): the groups'
    weights are w_q[first : first + G] of a larger stack, which the kernel indexes in place (only their scales,
    1/32 of the weights' bytes, are cut out here)."""
    m, k = x_q.shape
    cfg = config or gpu_config.default_config(_round_up(k, TILE))
    g, (_, n, _) = group_sizes.shape[0], w_q.shape
    if first is not None:
        w_s = lax.dynamic_slice_in_dim(w_s, first, g, axis=0)
    mp, kp, np_ = max(_round_up(m, 8), cfg.block_m), _round_up(k, TILE), _round_up(n, cfg.block_n * cfg.cluster_n)
    x_q = jnp.pad(x_q, ((0, mp - m), (0, kp - k)))
    xs_t = jnp.pad(x_s, ((0, mp - m), (0, 0)), constant_values=1.0).T
    if (np_, kp) != (n, k):
        w_q = jnp.pad(w_q, ((0, 0), (0, np_ - n), (0, kp - k)))
    ws_cols = jnp.swapaxes(w_s if rhs_tiles else jnp.repeat(w_s, TILE, axis=1)[:, :n], 1, 2)  # [G, K/128, N]
    ws_cols = jnp.pad(ws_cols, ((0, 0), (0, 0), (0, np_ - n)), constant_values=1.0)
    w_scales = "column" if rhs_tiles else "block"
    if cfg.ring_loads:
        out = gpu_ring.fp8_gmm(x_q, xs_t, w_q, ws_cols, group_sizes, cfg, interpret, out_dtype, w_scales, first)
    else:
        out = gpu.fp8_gmm(
            x_q,
            xs_t,
            w_q,
            ws_cols,
            group_sizes,
            config=cfg,
            interpret=interpret,
            out_dtype=out_dtype,
            w_scales=w_scales,
            w_first=first,
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


def fp8_gmm(
    x_q,
    x_s,
    w_q,
    w_s,
    group_sizes,
    *,
    group_offset=None,
    out_dtype=jnp.bfloat16,
    backend="auto",
    interpret=False,
    config=None,
):
    """Grouped FP8 matmul: rows of x_q sorted by group; [M, K] x [G, N, K] -> [M, N] in out_dtype. config: the
    GPU kernel's Fp8GpuConfig (None: its defaults). group_offset (an int32 scalar, may be traced): w_q / w_s are
    a larger stack [T, ...] (e.g. every layer's experts, quantize_blocks of [L, E, K, N] flattened) and group g
    takes w_q[group_offset + g]: on the GPU the kernel reads the stack in place, where a slice would be copied out
    first (XLA materializes a custom call's operands)."""
    _check(x_q, x_s, w_q, w_s, grouped=True)
    g = group_sizes.shape
    if (g != (w_q.shape[0],)) if group_offset is None else (len(g) != 1 or g[0] > w_q.shape[0]):
        what = f"[G={w_q.shape[0]}]" if group_offset is None else f"[G <= {w_q.shape[0]}] with group_offset"
        raise ValueError(f"group_sizes must be {what}, got {g}")
    first = None if group_offset is None else jnp.asarray(group_offset, jnp.int32)
    if resolve_backend(backend) == "gpu":
        return _gpu_gmm(x_q, x_s, w_q, w_s, group_sizes.astype(jnp.int32), first, out_dtype, interpret, config)
    if first is not None:
        w_q, w_s = (lax.dynamic_slice_in_dim(a, first, g[0], axis=0) for a in (w_q, w_s))
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
        return _gpu_gmm(x_q, x_s, w_q[None], w_s[None], sizes, None, out_dtype, interpret, config, rhs_tiles)
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
    owner = jnp.minimum(group_of(ends, p), g - 1).astype(jnp.int32)
    offset = p - (ends - padded)[owner]
    valid = (p < ends[-1]) & (offset < sizes[owner])
    index = jnp.where(valid, (jnp.cumsum(sizes) - sizes)[owner] + offset, m)
    return index.astype(jnp.int32), padded


def aligned_positions(group_sizes, m: int):
    """The inverse of align_groups' index: pos [M] int32, row r of the group-sorted rows -> its row in the aligned
    layout (index[pos[r]] == r); rows past sum(group_sizes) -> M_aligned (outside the layout)."""
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + TILE - 1) // TILE * TILE
    shift = (jnp.cumsum(padded) - padded) - (jnp.cumsum(sizes) - sizes)  # zero rows before each group
    r = jnp.arange(m, dtype=jnp.int32)
    owner = group_of(jnp.cumsum(sizes), r)  # G past the last group
    out = r + shift[jnp.minimum(owner, g - 1)]
    return jnp.where(owner < g, out, _round_up(m, TILE) + TILE * g).astype(jnp.int32)


def take_aligned(x, index):
    """x [M, ...] in align_groups' layout: the rows at `index`, a zero row where index == M."""
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index]


def quantize_tiles(x, *, backend="auto", interpret=False):
    """x [M, K] -> (e4m3 [M, K], float32 scales [M, ceil(K / 128)]) per 1 x 128 tile (quantize.py); backend "gpu":
    one pass in a Pallas Triton kernel (quantize_gpu.py), bit-equal."""
    if resolve_backend(backend) == "gpu":
        return quantize_gpu.quantize_tiles(x, interpret=interpret)
    return quantize.quantize_tiles(x)


def quantize_blocks(w, extra=None, *, transposed=False, backend="auto", interpret=False):
    """w [..., K, N] -> (K-major e4m3 [..., N, K], float32 scales [..., ceil(N / 128), ceil(K / 128)]) per 128 x 128
    block (quantize.py); backend "gpu": transposed and quantized in one Pallas Triton pass, bit-equal. extra [..., S,
    K, N] beside w [..., G, K, N] (the same leading axes, e.g. layers): the blocks of both stacked along G ([..., G +
    S, ...]), on the GPU without a concatenated copy of the weights. transposed: also transposed_blocks of them (the
    dgrad's operand), on the GPU from the same pass."""
    if resolve_backend(backend) == "gpu":
        return quantize_gpu.quantize_blocks(w, extra, transposed=transposed, interpret=interpret)
    q, s = quantize.quantize_blocks(w if extra is None else jnp.concatenate([w, extra], axis=-3))
    return (q, s, *quantize.transposed_blocks(q, s)) if transposed else (q, s)


def quantize_tiles_t(x, index=None, row_scale=None, *, backend="auto", interpret=False):
    """A weight gradient's operand: quantize_tiles(x.T) ([R, C] -> e4m3 [C, R], scales [C, ceil(R / 128)]), or with
    align_groups' index quantize_tiles(take_aligned(x, index).T); row_scale (float32, one per output row): those
    rows multiplied by it first, in float32. backend "gpu": one fused gather + scale + transpose + quantize pass
    (quantize_gpu.py, Pallas Triton), bit-equal; otherwise XLA's ops."""
    if resolve_backend(backend) == "gpu":
        return quantize_gpu.quantize_tiles_t(x, index, row_scale, interpret=interpret)
    rows = x if index is None else take_aligned(x, index)
    if row_scale is not None:
        rows = rows.astype(jnp.float32) * row_scale.astype(jnp.float32)[:, None]
    return quantize.quantize_tiles(rows.T)


def requantize_tiles_t(x_q, x_s, index=None, row_scale=None, *, backend="auto", interpret=False):
    """A weight gradient's operand from the forward's (or dgrad's) e4m3 tiles, as DeepSeek-V3 builds it (its report,
    section 3.5.2: read out, dequantized, transposed, re-quantized into 128 x 1 tiles): quantize_tiles_t(
    dequantize_tiles(x_q, x_s), index, row_scale). x_q [R, C] e4m3 in 1 x 128 tiles along C with scales x_s [R,
    ceil(C / 128)] -> e4m3 [C, R'], scales [C, ceil(R' / 128)]. A pass over the e4m3 codes (1 byte an element)
    instead of the compute-dtype values (2), which the layers then need not keep or write at all; the price is a
    second rounding of each element. backend "gpu": quantize_gpu.quantize_tiles_t's kernel dequantizing as it
    reads, bit-equal to XLA's ops here."""
    if resolve_backend(backend) == "gpu":
        return quantize_gpu.quantize_tiles_t(x_q, index, row_scale, x_s, interpret=interpret)
    return quantize_tiles_t(quantize.dequantize_tiles(x_q, x_s), index, row_scale, backend=backend)


def quantize_both(x, index=None, *, backend="auto", interpret=False):
    """(quantize_tiles(x), quantize_tiles_t(x, index)): a layer's forward operand and its weight-gradient operand
    (or the output gradient's dgrad and wgrad operands), two passes over x. Reading x once for both ran slower on
    the H200 each time it was tried: a masked-store kernel 1.8x, BlockSpec 128 x 128 tiles 1.4x, and the same fused
    with the experts' SwiGLU forward / backward 1.1x / 1.2x (BENCHMARKS.md, 2026-12-04, fourth and fifth FP8
    sessions), 128 x 128 tiles in slices with the row codes re-read from L2 1.3x, fused 5x (2026-12-05); the two
    passes run near a copy's bandwidth. The XLA path zeroes the rows index leaves out (past
    sum(group_sizes)), which only its reference product reads; the GPU kernels read no row outside a group."""
    if index is not None and resolve_backend(backend) != "gpu":
        used = jnp.zeros((x.shape[0] + 1,), bool).at[index].set(True)[:-1]
        x = jnp.where(used[:, None], x, jnp.zeros((), x.dtype))
    return quantize_tiles(x, backend=backend, interpret=interpret), quantize_tiles_t(
        x, index, backend=backend, interpret=interpret
    )


def _fused_act(gu, backend) -> bool:
    """Whether quantize_act's kernels run: the GPU backend, and I a multiple of 128 (a scaling tile of [d gate | d up]
    would otherwise span both halves)."""
    return resolve_backend(backend) == "gpu" and gu.shape[-1] % (2 * TILE) == 0


def act_quantize(gu, act, dtype, *, keep=True, backend="auto", interpret=False):
    """gu [R, 2I] = [gate | up] -> (h = act(gate, up, dtype) [R, I], quantize_tiles(h)): an activation and its
    forward operand. backend "gpu" with I % 128 == 0: one Pallas Triton pass (quantize_act.py); otherwise act
    (XLA), then quantize_tiles. keep False: h itself is not returned (None), and the kernel does not write it."""
    if _fused_act(gu, backend):
        return quantize_act.act_quantize(gu, act, jnp.dtype(dtype), keep=keep, interpret=interpret)
    h = act(*jnp.split(gu, 2, axis=-1), dtype)
    return (h if keep else None), quantize_tiles(h, backend=backend, interpret=interpret)


def act_bwd_quantize(gu, dh, act, *, keep=True, backend="auto", interpret=False):
    """gu [R, 2I] = [gate | up], dh [R, I] -> (dgu = [d gate | d up] [R, 2I], the vjp of act(gate, up, dh.dtype) at
    (gate, up) applied to dh; quantize_tiles(dgu)): the activation's backward and the activation gradient's dgrad
    operand. backend "gpu" with I % 128 == 0: one Pallas Triton pass (quantize_act.py). keep False: dgu itself is
    not returned (None), and the kernel does not write it."""
    if _fused_act(gu, backend):
        return quantize_act.act_bwd_quantize(gu, dh, act, keep=keep, interpret=interpret)
    grads = jax.vjp(lambda a, b: act(a, b, dh.dtype), *jnp.split(gu, 2, axis=-1))[1](dh)
    dgu = jnp.concatenate(grads, axis=-1)
    return (dgu if keep else None), quantize_tiles(dgu, backend=backend, interpret=interpret)


def fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, *, out_dtype=jnp.float32, backend="auto", interpret=False, config=None):
    """Grouped weight gradient: a [K, M], b [N, M], both tile-scaled along M (quantize_tiles of the transposed
    activations and output gradients) -> [G, K, N]. backend "gpu" (gpu_tgmm.py) needs every group to start on a
    128-row step (align_groups), so no 128-token scaling tile spans two groups; given misaligned groups it returns
    NaN rather than a wrong gradient. The reference takes any groups."""
    _check(a_q, a_s, b_q, b_s, grouped=False, rhs_tiles=True)
    if resolve_backend(backend) != "gpu":
        return reference.fp8_tgmm(a_q, a_s, b_q, b_s, group_sizes, out_dtype=out_dtype)
    cfg = config or gpu_tgmm.TGMM_CONFIG
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
        return _gpu_tgmm(a_q, as_t, b_q, bs_t, sizes, cfg, interpret, out_dtype)[:, :k, :n]

    return lax.cond(aligned, kernel, lambda: jnp.full((sizes.shape[0], k, n), jnp.nan, out_dtype))


def fp8_wgrad(a_q, a_s, b_q, b_s, *, splits=None, backend="auto", interpret=False, config=None):
    """Dense weight gradient: a [K, M], b [N, M], tile-scaled along M -> float32 [K, N] (= fp8_gemm(..., rhs_tiles=
    True)). On the GPU it runs fp8_tgmm's kernel with the contraction cut into `splits` chunks of whole 128-row
    steps, as groups, summed after: a weight gradient has few output tiles over a long contraction (small's
    1024 x 3072 is 192 tiles of 128 x 128 for 132 SMs), and the chunks fill the waves, as split-K does. splits
    None: wgrad_splits' choice."""
    _check(a_q, a_s, b_q, b_s, grouped=False, rhs_tiles=True)
    if resolve_backend(backend) != "gpu":
        return reference.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=jnp.float32, rhs_tiles=True)
    cfg = config or gpu_tgmm.TGMM_CONFIG
    (k, m), n = a_q.shape, b_q.shape[0]
    if m == 0:
        return jnp.zeros((k, n), jnp.float32)
    splits = splits or wgrad_splits(k, m, n, gpu_common.num_sms(cfg, interpret), cfg)
    chunk = _round_up(-(-m // splits), TILE)
    sizes = [min(chunk, m - i * chunk) for i in range(-(-m // chunk))]
    parts = fp8_tgmm(a_q, a_s, b_q, b_s, jnp.asarray(sizes, jnp.int32), backend="gpu", interpret=interpret, config=cfg)
    return jnp.sum(parts, axis=0)


def wgrad_splits(k: int, m: int, n: int, num_sms: int, cfg, max_splits: int = 8) -> int:
    """Contraction chunks for fp8_wgrad: the fewest whose (chunk, output tile) work items keep >= 85% of the SMs'
    slots busy over the waves they take (else the best), each chunk keeping at least 8 steps of 128 rows."""
    tiles_kn = -(-k // cfg.block_m) * -(-n // cfg.block_n)
    fill = lambda s: tiles_kn * s / (-(-tiles_kn * s // num_sms) * num_sms)  # noqa: E731
    options = [s for s in range(1, max_splits + 1) if s == 1 or -(-m // TILE) // s >= 8]
    good = [s for s in options if fill(s) >= 0.85]
    return good[0] if good else max(options, key=fill)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))  # under jit: one trace per kernel shape (see _gpu_gmm)
def _gpu_tgmm(a_q, as_t, b_q, bs_t, sizes, cfg, interpret, out_dtype):
    return gpu_tgmm.fp8_tgmm(a_q, as_t, b_q, bs_t, sizes, config=cfg, interpret=interpret, out_dtype=out_dtype)
