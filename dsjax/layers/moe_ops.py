"""DeepSeekMoE's pure functions: routing, the expert sort and its inverse, the grouped SwiGLU, the combine.

Used by the MoE layer (dsjax/layers/moe.py) on one device's tokens and by expert parallelism
(dsjax/layers/moe_parallel.py) on each device's share.

Router (float32): scores = sigmoid or softmax of x . W_gate. The correction bias (aux-loss-free balancing) is
added for *selection only*; with group limiting each group is scored (V3: sum of its top-2 biased scores; V2:
its max score), the best `topk_group` groups stay, then the top-k experts among them. Combine weights are the
unbiased scores of the chosen experts, normalised when `norm_topk_prob`, times `routed_scaling_factor`.

Routed experts run on expert-sorted tokens: each (token, choice) pair is sorted by expert, one grouped matmul
per projection (`jax.lax.ragged_dot`), then un-sorted and combined. `moe_backend="dense"` evaluates every expert
on every token with a one-hot weight matrix: slow, obviously right, used to test the sorted path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.fp8 import fp8_expert_ffn, fp8_grouped_matmul
from dsjax.layers.mlp import swiglu, swiglu_joined
from dsjax.layers.rows import gather_rows
from pallas_kernels.fp8_gemm import align_groups, aligned_positions


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] float32 combine weights
    indices: jax.Array  # [N, k] int32 expert ids
    scores: jax.Array  # [N, E] float32 unbiased scores


# Score of an expert already masked out when groups are ranked: finite, so a group's top-k sum stays ordered (a group
# missing candidates ranks below every full one) where -inf sums would all tie.
MASKED_EXPERT_SCORE = -1e9


def _keep_best_groups(choice: jax.Array, groups: int, keep: int, per_group: int) -> jax.Array:
    """Mask (-inf) all but the `keep` groups of consecutive experts whose `per_group` best choice scores sum
    highest. Already-masked entries count as a large negative score, so a group short of `per_group` candidates
    ranks below every group that has them (device limiting after group limiting never picks an empty device)."""
    n, e = choice.shape
    grouped = jnp.where(jnp.isneginf(choice), MASKED_EXPERT_SCORE, choice).reshape(n, groups, e // groups)
    score = jax.lax.top_k(grouped, per_group)[0].sum(-1)
    _, best = jax.lax.top_k(score, keep)
    mask = jnp.zeros((n, groups), bool).at[jnp.arange(n)[:, None], best].set(True)
    return jnp.where(jnp.repeat(mask, e // groups, axis=-1), choice, -jnp.inf)


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, D] . W_gate [D, E] in float32 (the router runs in float32 whatever the compute dtype)."""
    return jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32))


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig, device_groups: int = 1) -> Routing:
    """Pure router math on float32 logits [N, E].

    `device_groups` > 1 (expert parallelism: the experts split evenly over that many devices) applies
    `cfg.moe_device_limit` = M: each token keeps the M devices whose top ceil(k/M) biased scores sum highest
    (DeepSeek-V3's node-limited routing) and picks its k experts there.
    """
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    choice = jax.lax.stop_gradient(choice)  # selection is discrete; gradients flow through the weights only
    e, k = scores.shape[-1], cfg.num_experts_per_tok
    if cfg.uses_group_limit:  # V3 scores a group by its top-2 biased scores, V2 by its best one
        choice = _keep_best_groups(choice, cfg.n_group, cfg.topk_group, 2 if cfg.topk_method == "noaux_tc" else 1)
    limit = cfg.moe_device_limit
    if device_groups > 1 and 0 < limit < device_groups:
        per_device = e // device_groups
        if limit * per_device < k:
            raise ValueError(
                f"moe_device_limit={limit} devices x {per_device} experts each cannot hold the "
                f"num_experts_per_tok={k} experts of a token"
            )
        choice = _keep_best_groups(choice, device_groups, limit, min(-(-k // limit), per_device))
    _, indices = jax.lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(weights * cfg.routed_scaling_factor, indices.astype(jnp.int32), scores)


def expert_counts(indices: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert, int32 [E] (the load the aux-loss-free bias update balances)."""
    return jnp.zeros((num_experts,), jnp.int32).at[indices.reshape(-1)].add(1)


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, batch: int, cfg: ModelConfig) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences (multiply by alpha)."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = scores.reshape(batch, -1, e)
    t = scores.shape[1]
    chosen = (
        jnp.zeros(scores.shape, jnp.float32)
        .at[jnp.arange(batch)[:, None, None], jnp.arange(t)[None, :, None], indices.reshape(batch, t, k)]
        .set(1.0)
    )
    f = chosen.sum(1) * (e / (k * t))
    p = (scores / scores.sum(-1, keepdims=True)).mean(1)
    return (f * p).sum(-1).mean()


def ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)


def pallas_gmm(lhs, rhs, sizes, platform=None):
    # Mosaic GPU / TPU kernel for `platform` (XLA elsewhere). Accumulates in float32 and writes the compute
    # dtype, halving the traffic of the [tokens x k, 2I] intermediate against a float32 output.
    from pallas_kernels.grouped_matmul import gmm

    return gmm(lhs, rhs, sizes, platform=platform)


def grouped_ffn(rows, sizes, gate_up, down, dtype, matmul=ragged_dot, fp8=False):
    """Each expert's SwiGLU on its contiguous group of rows: rows [M, D] sorted by expert, sizes [E] (rows past
    their sum are padding), gate_up [E, D, 2I] (gate | up), down [E, I, D]. Returns [M, D] (float32 or dtype).
    fp8: `matmul` quantizes the weights itself, from the master weights as they come (not cast first)."""
    weights = (lambda w: w) if fp8 else (lambda w: w.astype(dtype))  # noqa: E731
    h = swiglu_joined(matmul(rows.astype(dtype), weights(gate_up), sizes), jnp.dtype(dtype))
    return matmul(h, weights(down), sizes)


class PairOrder(NamedTuple):
    """Where each (token, choice) pair goes when rows are sorted by expert. A pair's index is token * k + choice."""

    order: jax.Array  # [P] int32: sorted slot -> pair
    inverse: jax.Array  # [P] int32: pair -> sorted slot
    sizes: jax.Array  # [E] int32: pairs per expert (the group sizes of the grouped matmuls)


def pair_order(indices: jax.Array, num_experts: int) -> PairOrder:
    """Sort the (token, choice) pairs of `indices` [N, k] by expert, stably; computed once per layer, its inverse
    reused by the un-sort and by both backward passes (which are gathers, not scatter-adds)."""
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32), unique_indices=True)
    return PairOrder(order, inverse, jnp.bincount(flat, length=num_experts).astype(jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gather_pairs(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int, words: bool = False) -> jax.Array:
    """Expert-sorted rows: x [N, D] -> [N * k, D], row s = x[order[s] // k] (words, for GPUs: moved as 32-bit
    words, rows.gather_rows)."""
    return gather_rows(x, order // k, words)


def _gather_pairs_fwd(x, order, inverse, k, words):
    return gather_rows(x, order // k, words), inverse


def _gather_pairs_bwd(k, words, inverse, g):
    # each token's k rows sit at inverse[token * k + j]: gather them back and sum (no scatter-add)
    return g[inverse].reshape(-1, k, g.shape[-1]).sum(1, dtype=jnp.float32).astype(g.dtype), None, None


gather_pairs.defvjp(_gather_pairs_fwd, _gather_pairs_bwd)


@jax.custom_vjp
def combine_pairs(y: jax.Array, order: jax.Array, inverse: jax.Array, weights: jax.Array) -> jax.Array:
    """Un-sort and combine: y [N * k, D] expert-sorted rows -> out [N, D] = combine(y, inverse, weights), its
    backward gathers (no scatter-add)."""
    return combine(y, inverse, weights)


def combine(y, inverse, weights):
    """out [N, D] = sum_j weights[n, j] * y[inverse[n * k + j]], accumulated in float32, returned in y's dtype."""
    n, k = weights.shape
    picked = y[inverse].reshape(n, k, y.shape[-1]).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", picked, weights.astype(jnp.float32)).astype(y.dtype)


def _combine_pairs_fwd(y, order, inverse, weights):
    return combine(y, inverse, weights), (y, order, inverse, weights)


def _combine_pairs_bwd(res, g):
    y, order, inverse, weights = res
    n, k = weights.shape
    g32 = g.astype(jnp.float32)
    # d y[s] = weight of pair order[s] * g[token of that pair]; d weights[n, j] = <g[n], y[inverse[n * k + j]]>
    dy = (weights.reshape(-1)[order][:, None].astype(jnp.float32) * g32[order // k]).astype(y.dtype)
    dw = jnp.einsum("nkd,nd->nk", y[inverse].reshape(n, k, -1).astype(jnp.float32), g32)
    return dy, None, None, dw.astype(weights.dtype)


combine_pairs.defvjp(_combine_pairs_fwd, _combine_pairs_bwd)


def sorted_experts(
    x,
    routing: Routing,
    gate_up,
    down,
    dtype,
    matmul=ragged_dot,
    fp8_backend=None,
    fp8_wgrad=True,
    shared=None,
    words=False,
    blocks=None,
):
    """Routed experts on expert-sorted rows with grouped matmuls. x [N, D]; gate_up [E, D, 2I]; down [E, I, D].
    fp8_backend set: the FP8 expert FFN (dsjax.layers.fp8.fp8_expert_ffn) on aligned_pair_order's rows (each
    expert on 128-row steps) and their combine, the tokens and their gradient quantized in token space; `matmul`
    unused; fp8_wgrad False: its weight gradients in `dtype` (ModelConfig.fp8_wgrad_experts). shared (FP8 only): the
    shared experts (gate_up [S, D, 2I], down [S, I, D], every token's, weight 1) run as groups of the same grouped
    GEMMs and are included in the result. words (GPUs): the bf16 rows gathered as 32-bit words (gather_pairs).
    blocks (FP8 only): every layer's expert weights quantized at once (fp8.ExpertBlocks), or None."""
    k = routing.indices.shape[1]
    with jax.named_scope("dispatch"):
        po = pair_order(routing.indices, gate_up.shape[0])
    if fp8_backend is not None:
        weights = routing.weights
        if shared is not None:
            po = with_shared_experts(po, k, shared[0].shape[0])
            weights = jnp.concatenate([weights, jnp.ones((weights.shape[0], shared[0].shape[0]), weights.dtype)], 1)
            gate_up, down = (gate_up, shared[0]), (down, shared[1])
        with jax.named_scope("dispatch"):
            order, inverse, sizes = aligned_pair_order(po)
        with jax.named_scope("experts"):  # the combine included: its backward quantizes the gradient per token
            args = (x.astype(dtype), order, inverse, sizes, weights, gate_up, down)
            return fp8_expert_ffn(*args, blocks, combine, swiglu, fp8_backend, fp8_wgrad)
    if shared is not None:
        raise ValueError("shared experts run inside the routed experts' grouped GEMMs only in FP8 (fp8_backend)")
    with jax.named_scope("dispatch"):
        rows = gather_pairs(x.astype(dtype), po.order, po.inverse, k, words)
    with jax.named_scope("experts"):
        y = grouped_ffn(rows, po.sizes, gate_up, down, dtype, matmul).astype(dtype)
    with jax.named_scope("combine"):
        return combine_pairs(y, po.order, po.inverse, routing.weights)


def with_shared_experts(po: PairOrder, k: int, shared: int) -> PairOrder:
    """pair_order's sort of N tokens' k routed choices extended with `shared` experts every token goes to (expert
    ids E..E+S-1, after the routed ones, each holding all N tokens in token order): pairs become token * (k + S) +
    choice, the shared choices k..k+S-1. No second sort: the routed rows keep their places, the shared rows follow."""
    n = po.order.shape[0] // k
    kk, token, extra = k + shared, jnp.arange(n, dtype=jnp.int32), jnp.arange(shared, dtype=jnp.int32)
    order = jnp.concatenate([po.order // k * kk + po.order % k, (token[None, :] * kk + k + extra[:, None]).ravel()])
    inverse = jnp.concatenate([po.inverse.reshape(n, k), n * k + extra[None, :] * n + token[:, None]], axis=1)
    sizes = jnp.concatenate([po.sizes, jnp.full((shared,), n, jnp.int32)])
    return PairOrder(order.astype(jnp.int32), inverse.reshape(-1).astype(jnp.int32), sizes)


def shared_in_routed(cfg: ModelConfig) -> bool:
    """Whether a resolved config runs its shared experts as groups of the routed experts' grouped GEMMs (routed
    experts on this device's tokens): in FP8 that shares the tokens' quantization, their gradient's and the
    SwiGLU pass with the routed experts instead of repeating them for a separate MLP."""
    return cfg.fp8_experts and cfg.moe_backend != "dense" and cfg.n_shared_experts > 0


def aligned_pair_order(po: PairOrder) -> PairOrder:
    """The pair sort laid out with every expert's rows starting on a 128-row step (align_groups' layout, the FP8
    experts' rows): order [R] (the pair on each row; P = N * k, out of range, on the zero rows between experts),
    inverse [P] (each pair's row), sizes [E] rounded up to 128 (each expert's zero rows included)."""
    p = po.order.shape[0]
    index, sizes = align_groups(po.sizes, p)
    order = jnp.where(index < p, po.order[jnp.minimum(index, p - 1)], p)
    return PairOrder(order.astype(jnp.int32), aligned_positions(po.sizes, p)[po.inverse], sizes)


def dense_experts(x, routing: Routing, gate_up, down, dtype):
    """Reference: every expert on every token, combined with a one-hot [N, E] weight matrix."""
    n = x.shape[0]
    e = gate_up.shape[0]
    comb = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], routing.indices].add(routing.weights)
    h = jnp.einsum("nd,edf->enf", x.astype(dtype), gate_up.astype(dtype), preferred_element_type=jnp.float32)
    gate, up = jnp.split(h, 2, axis=-1)
    a = (jax.nn.silu(gate) * up).astype(dtype)
    y = jnp.einsum("enf,efd->end", a, down.astype(dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("end,ne->nd", y, comb).astype(dtype)


def expert_matmul(cfg: ModelConfig):
    """The grouped matmul of a resolved config's sorted-row expert backend (FP8 when cfg.fp8 asks)."""
    if cfg.fp8_experts:
        return lambda rows, w, sizes: fp8_grouped_matmul(rows, w, sizes, cfg.fp8_backend, cfg.fp8_wgrad_experts)
    if cfg.moe_backend == "gmm":
        return functools.partial(pallas_gmm, platform=cfg.platform)
    return ragged_dot


def routed_experts_local(x, routing: Routing, gate_up, down, cfg: ModelConfig, shared=None, blocks=None):
    """Routed experts of a resolved config on this device's tokens: sorted rows, or the dense reference. shared
    (where shared_in_routed(cfg)): the shared experts as extra groups (sorted_experts), included in the result.
    blocks: the FP8 experts' weights quantized for every layer at once (fp8.ExpertBlocks), or None."""
    if cfg.moe_backend == "dense":
        return dense_experts(x, routing, gate_up, down, jnp.dtype(cfg.dtype))
    fp8_backend = cfg.fp8_backend if cfg.fp8_experts else None
    dt = jnp.dtype(cfg.dtype)
    return sorted_experts(
        x,
        routing,
        gate_up,
        down,
        dt,
        expert_matmul(cfg),
        fp8_backend,
        cfg.fp8_wgrad_experts,
        shared,
        word_gathers(cfg),
        blocks,
    )


def word_gathers(cfg: ModelConfig) -> bool:
    """Whether a resolved config's expert rows are gathered as 32-bit words (rows.gather_rows): on GPUs only."""
    return cfg.platform == "gpu"
