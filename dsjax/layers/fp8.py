"""FP8 training GEMMs with DeepSeek-V3's recipe (its report, section 3.3), behind ModelConfig.fp8 = "e4m3".

All three GEMMs of a linear layer or an expert layer take e4m3 operands with fine-grained scales
(pallas_kernels/fp8_gemm): forward x . W (x in 1 x 128 tiles along K, W in 128 x 128 blocks), the activation
gradient dy . W^T (dy in tiles along N, W's blocks, which are the same blocks transposed) and the weight gradient
x^T . dy (both in 1 x 128 tiles along the rows they contract; for the experts, each expert's tokens on tiles of
their own, as ops.align_groups lays them out). Products accumulate in float32; outputs and the
activation gradient come back in the compute dtype, the weight gradient in the weight's dtype. Everything else
(embedding, output head, router, norms, attention core, MTP's eh_proj) stays in the compute dtype or float32.

Entry points: fp8_dot (a Linear), fp8_dots (Linears on one input, e.g. q_a_proj + kv_a_proj: one quantization of x
and one GEMM), fp8_mlp (a SwiGLU MLP: the dense layers' and the shared experts'), fp8_expert_ffn (the routed
experts' SwiGLU and combine on rows in align_groups' layout, the tokens and their gradient quantized in token
space; on local tokens the MoE layer puts its shared experts in the same grouped GEMMs, as extra groups holding
every token with weight 1, so the tokens and their gradient are quantized once for both) and fp8_grouped_matmul
(one expert projection, for expert parallelism's received rows).

The residuals are the input's weight-gradient operand (x^T quantized along the tokens, for the experts on
align_groups' layout) instead of x, and the forward's quantized weight, whose transposed blocks are the dgrad's
operand. A SwiGLU's results (h, and d[gate | up] in the backward) are not written in the compute dtype at all when
the weight gradients are e4m3: their weight-gradient operands are requantized from the 1 x 128 e4m3 tiles that the
activation's pass writes for the next GEMM (_act_operand; DeepSeek-V3's workflow, at the price of a second
rounding). With wgrad False (ModelConfig.fp8_wgrad "none"; "experts": False for the projections and dense MLPs)
the weight gradients run in the compute dtype from x and dy as they are (x kept instead of its e4m3 transpose):
forward and dgrad stay the recipe's, bit for bit, and the two transposing quantization passes per layer, the cost
that outweighs FP8's gain at small's widths, are gone.
With fp8_backend "gpu" (dsjax.runtime's "auto" on Hopper) every quantization is a Pallas Triton pass
(quantize_gpu.py, bit-equal to XLA's, at 80-90% of a cast-only pass's bandwidth) and every GEMM a Mosaic GPU
kernel; every SwiGLU (experts, shared experts, dense MLPs) quantizes its result along I in the same pass
(act_quantize / act_bwd_quantize). On the H200 (experiments/BENCHMARKS.md, the fifth to eighth FP8 sessions) the
recipe pays where DeepSeek-V3's widths put it: a 3-layer slice at V3's widths steps 1.09x faster in FP8 than in
BF16. At small's widths (1024 / 512) it runs 1.05x slower (114.2k vs 119.7k tokens/s over 1,000 steps), 1.017x
with wgrad False (H100; two 1,000-step runs a side end with a mean training loss 0.05% above BF16's, whose own two
runs end 1.8% apart: the routers amplify any rounding difference), and with the experts alone in FP8
(ModelConfig.fp8_layers "experts") faster than BF16 (paired step timing on an H100: 1.017x with fp8_gmm's load
ring and the quantizers' bit-wise amax, 1.004x / 1.008x slower on an H100 / H200 before them; 1,000-step runs on
two H100s: +1.8% tokens/s on each, three FP8 runs' mean training loss 0.22% below two BF16 runs'). Its FP8 GEMMs beat
bf16's, but each operand's two quantization passes (~6 bytes per element) cost about what FP8 saves in the GEMMs
at small's widths (break-even where K N / (K + N) ~ 560; V3's layers are 3-9x past it: BENCHMARKS.md, "FP8 at
small's widths"). Fusing both quantizations into one read measured slower in three designs; what remains is to
fuse them into the passes that produce the operands or into the GEMMs.

A scanned segment's expert weights are quantized for all its layers in one pass before the scan (ExpertBlocks,
built by dsjax.layers.moe.stacked_expert_blocks from the stacked parameters), both orientations at once; each
layer's grouped GEMMs read their groups of those stacks in place (fp8_gmm's group_offset). Quantized per layer, the
scan's float32 slice of each stacked weight was copied out before the Pallas quantizer read it (8.9 GB a step of
`small`), and each dgrad operand transposed by XLA (2.45 GB).

Under a bound mesh each FP8 layer runs per device (on_local_tokens): the kernels are Pallas calls, which XLA's
partitioner cannot split.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dsjax.layers.rows import gather_rows
from pallas_kernels.fp8_gemm import (
    act_bwd_quantize,
    act_quantize,
    align_groups,
    fp8_gemm,
    fp8_gmm,
    fp8_tgmm,
    fp8_wgrad,
    quantize_blocks,
    quantize_both,
    quantize_tiles,
    quantize_tiles_t,
    requantize_tiles_t,
    resolve_backend,
    transposed_blocks,
)
from pallas_kernels.grouped_matmul import tgmm
from sharding.rules import logical_spec


def on_local_tokens(fn, x, *weights):
    """fn(x, *weights) on each device's tokens when a mesh is bound (sharding.rules.activate): the FP8 kernels are
    Pallas calls, which have no partitioning rule, so under a sharded jit XLA would gather every operand onto every
    device and run the whole layer on each. x [B, T, K] (or [N, K]) is split as its logical ("batch", "seq")
    layout says; the weights enter whole (XLA gathers FSDP shards before the call, as it does for a sharded dot;
    a tensor-parallel split of them is gathered too) and shard_map's transpose sums their gradients over the
    devices. Without a mesh, or inside a shard_map already, fn runs as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return fn(x, *weights)
    names = ("batch", "seq", None) if x.ndim == 3 else ("batch",) + (None,) * (x.ndim - 1)
    spec = logical_spec(names, mesh, x.shape, nn.get_logical_axis_rules())
    return jax.shard_map(fn, in_specs=(spec, *[P()] * len(weights)), out_specs=spec, check_vma=False)(x, *weights)


def _operands(x, wgrad, backend, index=None):
    """x [M, K] in 1 x 128 tiles along K (a forward's or dgrad's operand) and what the weight gradient reads of x:
    x^T quantized along the tokens (wgrad in e4m3; for grouped rows on align_groups' layout, `index`), or x itself
    (wgrad False: the weight gradient in the compute dtype)."""
    if wgrad:
        return quantize_both(x, index, backend=backend)
    return quantize_tiles(x, backend=backend), x


def _act_operand(values, tiles, wgrad, backend):
    """The weight gradient's operand of an activation's result (SwiGLU's h, or d[gate | up] in the backward): with
    wgrad, its transpose in tiles along the tokens, requantized from its 1 x 128 e4m3 tiles (the GEMM operand the
    activation's pass writes), as DeepSeek-V3 does; that pass then need not write the values at all (values None:
    act_quantize / act_bwd_quantize with keep=False). Measured on the H100 at small's experts (BENCHMARKS.md,
    eighteenth FP8 session): the SwiGLU passes plus this one take 0.42 / 0.72 ms a layer against 0.49 / 0.90 for
    writing h / d[gate | up] and quantizing them along the tokens. The price is a second rounding of the operand.
    Without wgrad: the values, for the compute-dtype weight gradient."""
    return requantize_tiles_t(*tiles, backend=backend) if wgrad else values


def _weight_grad(a, b, wgrad, backend, sizes=None):
    """The weight gradient a^T . b over the tokens, float32 [K, N] (or [G, K, N] per group of rows of `sizes`): from
    _operands' / _act_operand's residuals, in e4m3 (wgrad) or in their compute dtype (ModelConfig.fp8_wgrad
    False: no transposing quantization; at small's widths those passes cost more than the FP8 GEMM saves)."""
    if wgrad and sizes is None:
        return fp8_wgrad(*a, *b, backend=backend)
    if wgrad:
        return fp8_tgmm(*a, *b, sizes, out_dtype=jnp.float32, backend=backend)
    if sizes is None:
        return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    on_gpu = resolve_backend(backend) == "gpu" and a.dtype in (jnp.bfloat16, jnp.float16)
    return tgmm(a, b, sizes, backend="gpu" if on_gpu else "xla", preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_dot(x: jax.Array, w: jax.Array, backend: str = "auto", wgrad: bool = True) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x.dtype, forward and dgrad in e4m3 (pallas_kernels.fp8_gemm `backend`),
    the weight gradient too unless wgrad is False."""
    return _fp8_dot_fwd(x, w, backend, wgrad)[0]


def _fp8_dot_fwd(x, w, backend, wgrad):
    k, n = w.shape
    # with wgrad, x's weight-gradient operand (x^T, tiles along the tokens) is quantized here and kept instead of
    # x: an e4m3 residual half x's size, and no pass over x in the backward
    (xq, xs), x_t = _operands(x.reshape(-1, k), wgrad, backend)
    wq, ws = quantize_blocks(w, backend=backend)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=x.dtype, backend=backend).reshape(*x.shape[:-1], n)
    return y, (x_t, wq, ws, _dtype_of(x), _dtype_of(w))


def _fp8_dot_bwd(backend, wgrad, res, dy):
    x_t, wq, ws, like_x, like_w = res
    n, k = wq.shape
    (dq, ds), dy_t = _operands(dy.reshape(-1, n), wgrad, backend)
    dx = fp8_gemm(dq, ds, *transposed_blocks(wq, ws), out_dtype=like_x.dtype, backend=backend)
    dw = _weight_grad(x_t, dy_t, wgrad, backend)
    return dx.reshape(*dy.shape[:-1], k), dw.astype(like_w.dtype)


def _dtype_of(x):
    return jnp.zeros((0,), x.dtype)  # an empty array carries a dtype through the residuals


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_grouped_matmul(rows, w, sizes, backend: str = "auto", wgrad: bool = True) -> jax.Array:
    """Expert-sorted rows [M, K] x w [G, K, N] -> [M, N] in rows.dtype (rows past sum(sizes): zero), in e4m3 (the
    weight gradient too unless wgrad is False). With `backend` bound, the signature of dsjax.layers.moe_ops'
    grouped matmuls."""
    return _fp8_gmm_fwd(rows, w, sizes, backend, wgrad)[0]


def _fp8_gmm_fwd(rows, w, sizes, backend, wgrad):
    # the weight gradient takes each expert's tokens on their own 128-token scaling tiles (zero rows between
    # experts, align_groups' layout); that operand comes from the forward's read of the rows, as in _fp8_dot_fwd
    index, aligned = align_groups(sizes, rows.shape[0]) if wgrad else (None, None)
    (xq, xs), rows_t = _operands(rows, wgrad, backend, index)
    wq, ws = quantize_blocks(w, backend=backend)
    out = fp8_gmm(xq, xs, wq, ws, sizes, out_dtype=rows.dtype, backend=backend)
    return out, (rows_t, wq, ws, _dtype_of(rows), _dtype_of(w), sizes, index, aligned)


def _fp8_gmm_bwd(backend, wgrad, res, dy):
    rows_t, wq, ws, like_rows, like_w, sizes, index, aligned = res
    (dq, ds), dy_t = _operands(dy, wgrad, backend, index)
    drows = fp8_gmm(dq, ds, *transposed_blocks(wq, ws), sizes, out_dtype=like_rows.dtype, backend=backend)
    dw = _weight_grad(rows_t, dy_t, wgrad, backend, aligned if wgrad else sizes)  # bf16: on the rows as sorted
    return drows, dw.astype(like_w.dtype), None


fp8_grouped_matmul.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)


class ExpertBlocks(NamedTuple):
    """Every layer of a scanned segment's expert weights quantized at once (expert_stacks), for fp8_expert_ffn:
    gate_up and down are quantize_blocks(..., transposed=True) of the stacks [L, G, K, N] flattened to L * G groups
    ((q, s) the forward's operand, (q^T, s^T) the dgrad's), and `layer` the layer whose groups the GEMMs read
    (layer * G onward). A scan cuts a stacked weight per layer, and XLA copies that slice out before a Pallas call
    reads it: cut in float32 from the master weights, the copies were 8.9 GB a step of `small` (the FP8 experts'
    step gap to BF16, BENCHMARKS.md sixteenth session); the GEMMs read these stacks in place (fp8_gmm's
    group_offset), and the transposes come from the same pass."""

    gate_up: tuple
    down: tuple
    layer: jax.Array


def expert_stacks(gate_up, down, backend="auto") -> ExpertBlocks:
    """ExpertBlocks (layer 0) of every layer's expert weights: gate_up [L, E, D, 2I] and down [L, E, I, D], each or
    a tuple (routed [L, E, ...], shared [L, S, ...]: each layer's shared experts as groups E..E+S-1, as
    fp8_expert_ffn's tuples). No gradient flows through them: fp8_expert_ffn returns the weight gradients as the
    cotangents of its per-layer float32 weights, which it reads for their dtype only."""

    def stack(w):
        parts = w if isinstance(w, tuple) else (w,)
        blocks = quantize_blocks(*map(lax.stop_gradient, parts), transposed=True, backend=backend)
        return tuple(b.reshape(-1, *b.shape[2:]) for b in blocks)

    return ExpertBlocks(stack(gate_up), stack(down), jnp.zeros((), jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def fp8_expert_ffn(x, order, inverse, sizes, weights, gate_up, down, blocks, combine, act, backend="auto", wgrad=True):
    """The routed experts' SwiGLU and their combine, every GEMM in e4m3, on rows in align_groups' layout (each
    expert's rows start on a 128-row step, zero rows between): no 128-row scaling tile of a weight gradient spans
    two experts, so every quantization is of plain tiles. x [N, D] tokens; order [R]: the (token * k + choice) pair
    on each layout row, N * k on a zero row; inverse [N * k]: each pair's layout row; sizes [E]: each expert's
    rows, its zero rows included (multiples of 128); weights [N, k] the combine weights; gate_up [E, D, 2I] (gate |
    up), down [E, I, D]; combine(y [R, D], inverse, weights) -> [N, D] (dsjax.layers.moe_ops' combine); act(gate,
    up, dtype) -> h (dsjax.layers.mlp's swiglu, differentiated for the backward). Returns [N, D] in x.dtype.
    gate_up and down may each be a tuple (routed [E, ...], shared [S, ...]): the shared experts as groups E..E+S-1
    of the same grouped GEMMs (moe_ops.with_shared_experts lays out their rows); their gradients come back as a
    tuple of the same parts. blocks (ExpertBlocks or None): the weights' e4m3 blocks, quantized for every layer
    at once; gate_up and down then give the gradients' dtype and shape only (their values are not read).

    Both ends quantize in token space, as DeepSeek-V3 quantizes before dispatch: a 1 x 128 tile lies within one
    token's row, so the forward's rows are the tokens' e4m3 tiles gathered, and the backward's output gradient of
    a row (its routing weight times its token's gradient) is the token gradient's tiles gathered with the weight
    folded into their scales. Neither the rows nor their gradient is ever written in the compute dtype, and the
    k-times-larger rows are not read to quantize them; the weight gradients' operands (tiles along the rows) are
    gathered from the tokens by the transposing quantizer. Numerically fp8_grouped_matmul per projection on the
    gathered rows, but for the output gradient's rounding (weight times gradient is not rounded to the compute
    dtype first). wgrad False: the weight gradients in the compute dtype, from the tokens and h as they are."""
    return _expert_ffn_fwd(x, order, inverse, sizes, weights, gate_up, down, blocks, combine, act, backend, wgrad)[0]


def _expert_ffn_fwd(x, order, inverse, sizes, weights, gate_up, down, blocks, combine, act, backend, wgrad):
    dt = x.dtype
    token = order // weights.shape[1]  # N on a zero row: out of range, read as a zero row below
    xq, xs = quantize_tiles(x, backend=backend)
    words = resolve_backend(backend) == "gpu"  # rows.gather_rows: word gathers on GPUs only
    rows = gather_rows(xq, token, words), xs.at[token].get(mode="fill", fill_value=1)
    # gate_up's weight-gradient operand, from the tokens (in the compute dtype: the tokens, gathered in the backward)
    x_t = quantize_tiles_t(x, token, backend=backend) if wgrad else x
    if blocks is None:
        w1, w2, first = _expert_blocks(gate_up, backend), _expert_blocks(down, backend), None
    else:
        w1, w2, first = blocks.gate_up, blocks.down, blocks.layer * sizes.shape[0]
    gmm = functools.partial(fp8_gmm, group_sizes=sizes, group_offset=first, out_dtype=dt, backend=backend)
    gu = gmm(*rows, *w1[:2])
    # SwiGLU fused with h's quantization along I (h itself written only for the compute-dtype weight gradient)
    h, (hq, hs) = act_quantize(gu, act, dt, keep=not wgrad, backend=backend)
    h_t = _act_operand(h, (hq, hs), wgrad, backend)  # the down projection's weight-gradient operand
    y = gmm(hq, hs, *w2[:2])
    # the dgrads' operands: the weights' transposed blocks
    res = (x_t, w1[2:], gu, h_t, w2[2:], first, y, order, inverse, sizes, weights)
    return combine(y, inverse, weights), (*res, _stack_like(gate_up), _stack_like(down))


def _expert_ffn_bwd(combine, act, backend, wgrad, res, g):
    (x_t, w1t, gu, h_t, w2t, first, y, order, inverse, sizes, weights, like_w1, like_w2) = res
    k = weights.shape[1]
    token = order // k
    dweights = jax.vjp(lambda w: combine(y, inverse, w), weights)[1](g)[0]
    # a row's output gradient is weight * g[token]: g's tiles gathered, the weight folded into their scales (zero
    # rows: weight 0)
    w_row = weights.reshape(-1).astype(jnp.float32).at[order].get(mode="fill", fill_value=0)
    gq, gs = quantize_tiles(g, backend=backend)
    words = resolve_backend(backend) == "gpu"
    dq = gather_rows(gq, token, words)
    ds = gs.at[token].get(mode="fill", fill_value=1) * w_row[:, None]
    if wgrad:
        dy_t = quantize_tiles_t(g, token, w_row, backend=backend)
    else:  # the rows' output gradient in the compute dtype, as the BF16 combine's backward gives it
        dy_t = (g.at[token].get(mode="fill", fill_value=0).astype(jnp.float32) * w_row[:, None]).astype(g.dtype)
        x_t = gather_rows(x_t, token, words)
    gmm = functools.partial(fp8_gmm, group_sizes=sizes, group_offset=first, out_dtype=g.dtype, backend=backend)
    dh = gmm(dq, ds, *w2t)
    dw2 = _weight_grad(h_t, dy_t, wgrad, backend, sizes)
    # d[gate | up], fused with its dgrad operand (and not written itself where the wgrad requantizes that operand)
    dgu, (gq, gs) = act_bwd_quantize(gu, dh, act, keep=not wgrad, backend=backend)
    drows = gmm(gq, gs, *w1t)
    dw1 = _weight_grad(x_t, _act_operand(dgu, (gq, gs), wgrad, backend), wgrad, backend, sizes)
    # each token's k rows sit at inverse[token * k + j]: gathered back and summed (no scatter-add)
    dx = drows[inverse].reshape(-1, k, drows.shape[-1]).sum(1, dtype=jnp.float32).astype(g.dtype)
    return dx, None, None, None, dweights, _unstack(dw1, like_w1), _unstack(dw2, like_w2), None


fp8_expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)


def _expert_blocks(w, backend):
    """The e4m3 blocks of an expert weight stack and their transposes (q, s, q^T, s^T): [E, K, N], or (routed [E, K,
    N], shared [S, K, N]) as one stack of E + S groups (quantize_blocks' `extra`: no concatenated copy of the master
    weights)."""
    return quantize_blocks(*(w if isinstance(w, tuple) else (w,)), transposed=True, backend=backend)


def _stack_like(w):
    """What the backward needs of an expert weight stack (or tuple of stacks): each part's group count and dtype,
    carried by empty arrays [G, 0]."""
    like = lambda a: jnp.zeros((a.shape[0], 0), a.dtype)  # noqa: E731
    return tuple(map(like, w)) if isinstance(w, tuple) else like(w)


def _unstack(dw, like):
    """A stacked weight gradient [sum G, K, N] split back into the parts `like` describes, in their dtypes."""
    if not isinstance(like, tuple):
        return dw.astype(like.dtype)
    cuts = list(itertools.accumulate(part.shape[0] for part in like[:-1]))
    return tuple(d.astype(part.dtype) for d, part in zip(jnp.split(dw, cuts), like))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fp8_mlp(x, gate, up, down, act, backend="auto", wgrad=True):
    """A SwiGLU MLP in e4m3 (dense layers, shared experts): act(x @ gate, x @ up) @ down for x [..., D], gate and
    up [D, I], down [I, D]; act(gate, up, dtype) is dsjax.layers.mlp's swiglu. Numerically fp8_dots([gate, up]),
    act, then fp8_dot(down); the activation and its backward quantize their results in the same pass
    (act_quantize / act_bwd_quantize), as in fp8_expert_ffn; wgrad False: weight gradients in the compute dtype."""
    return _mlp_fwd(x, gate, up, down, act, backend, wgrad)[0]


def _mlp_fwd(x, gate, up, down, act, backend, wgrad):
    dt, lead = x.dtype, x.shape[:-1]
    (xq, xs), x_t = _operands(x.reshape(-1, x.shape[-1]), wgrad, backend)
    w1 = quantize_blocks(jnp.concatenate([gate, up], axis=1), backend=backend)
    gu = fp8_gemm(xq, xs, *w1, out_dtype=dt, backend=backend)
    h, (hq, hs) = act_quantize(gu, act, dt, keep=not wgrad, backend=backend)
    h_t = _act_operand(h, (hq, hs), wgrad, backend)  # down's weight-gradient operand
    w2 = quantize_blocks(down, backend=backend)
    y = fp8_gemm(hq, hs, *w2, out_dtype=dt, backend=backend)
    like = tuple(_dtype_of(w) for w in (gate, up, down))
    return y.reshape(*lead, -1), (x_t, w1, gu, h_t, w2, like)


def _mlp_bwd(act, backend, wgrad, res, g):
    x_t, w1, gu, h_t, w2, (like_gate, like_up, like_down) = res
    lead = g.shape[:-1]
    (gq, gs), g_t = _operands(g.reshape(-1, g.shape[-1]), wgrad, backend)
    dh = fp8_gemm(gq, gs, *transposed_blocks(*w2), out_dtype=g.dtype, backend=backend)
    ddown = _weight_grad(h_t, g_t, wgrad, backend)
    dgu, (dq, ds) = act_bwd_quantize(gu, dh, act, keep=not wgrad, backend=backend)
    dx = fp8_gemm(dq, ds, *transposed_blocks(*w1), out_dtype=g.dtype, backend=backend)
    dgate, dup = jnp.split(_weight_grad(x_t, _act_operand(dgu, (dq, ds), wgrad, backend), wgrad, backend), 2, axis=1)
    dw = (dgate.astype(like_gate.dtype), dup.astype(like_up.dtype), ddown.astype(like_down.dtype))
    return (dx.reshape(*lead, -1), *dw)


fp8_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def fp8_dots(x: jax.Array, kernels, backend: str = "auto", wgrad: bool = True) -> list[jax.Array]:
    """x @ w for each w [K, N_i] of `kernels` with one quantization of x (and one of the joined output gradient):
    the kernels joined along N into one FP8 GEMM, its output split. Where each N_i but the last is a multiple of
    128 every weight block and every output-gradient tile stays within one kernel, so this is exactly fp8_dot of
    each; otherwise a block or tile spanning two kernels shares its scale."""
    y = fp8_dot(x, jnp.concatenate(kernels, axis=1), backend, wgrad)
    return jnp.split(y, list(itertools.accumulate(w.shape[1] for w in kernels[:-1])), axis=-1)
