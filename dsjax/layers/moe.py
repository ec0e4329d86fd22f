"""DeepSeekMoE: router (V3 sigmoid + group-limited + correction bias, or V2 softmax), routed + shared experts.

Router (float32): scores = sigmoid or softmax of x . W_gate. The correction bias (aux-loss-free balancing) is
added for *selection only*; with group limiting each group is scored (V3: sum of its top-2 biased scores; V2:
its max score), the best `topk_group` groups stay, then the top-k experts among them. Combine weights are the
unbiased scores of the chosen experts, normalised when `norm_topk_prob`, times `routed_scaling_factor`.

Routed experts run on expert-sorted tokens: each (token, choice) pair is sorted by expert, one grouped matmul
per projection (`jax.lax.ragged_dot`), then un-sorted and combined. `moe_backend="dense"` evaluates every expert
on every token with a one-hot weight matrix: slow, obviously right, used to test the sorted path.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from dsjax.config import ModelConfig
from dsjax.layers.mlp import MLP

ROUTER_BIAS = "e_score_correction_bias"  # the name the optimizer masks out and the balancing update edits


class Routing(NamedTuple):
    weights: jax.Array   # [N, k] float32 combine weights
    indices: jax.Array   # [N, k] int32 expert ids
    scores: jax.Array    # [N, E] float32 unbiased scores


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Pure router math on float32 logits [N, E]."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    choice = jax.lax.stop_gradient(choice)  # selection is discrete; gradients flow through the weights only
    n, e = scores.shape
    if cfg.uses_group_limit:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:  # group_limited_greedy (V2)
            group_score = grouped.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=-1), choice, -jnp.inf)
    _, indices = jax.lax.top_k(choice, cfg.num_experts_per_tok)
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
    chosen = jnp.zeros(scores.shape, jnp.float32).at[
        jnp.arange(batch)[:, None, None], jnp.arange(t)[None, :, None], indices.reshape(batch, t, k)].set(1.0)
    f = chosen.sum(1) * (e / (k * t))
    p = (scores / scores.sum(-1, keepdims=True)).mean(1)
    return (f * p).sum(-1).mean()


def _ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)


def _pallas_gmm(lhs, rhs, sizes):
    from pallas_kernels.grouped_matmul import gmm  # Mosaic GPU / TPU kernel; XLA elsewhere
    return gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32)


def sorted_experts(x, routing: Routing, gate_up, down, dtype, matmul=_ragged_dot):
    """Routed experts on expert-sorted rows with grouped matmuls. x [N, D]; gate_up [E, D, 2I]; down [E, I, D]."""
    n, k = routing.indices.shape
    e = gate_up.shape[0]
    flat = routing.indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k].astype(dtype)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    h = matmul(rows, gate_up.astype(dtype), sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    a = (jax.nn.silu(gate) * up).astype(dtype)
    y = matmul(a, down.astype(dtype), sizes)
    y = y[jnp.argsort(order)].reshape(n, k, -1)  # back to (token, choice) order
    return jnp.einsum("nkd,nk->nd", y, routing.weights).astype(dtype)


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


EXPERT_BACKENDS = {"ragged_dot": sorted_experts, "dense": dense_experts,
                   "gmm": lambda *a: sorted_experts(*a, matmul=_pallas_gmm)}


def expert_backend(name: str) -> str:
    """"auto": the Pallas grouped matmul on GPU/TPU (XLA's ragged_dot there is a masked dense product),
    lax.ragged_dot on CPU."""
    if name != "auto":
        return name
    return "gmm" if jax.default_backend() in ("gpu", "tpu") else "ragged_dot"


class Router(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> Routing:
        cfg = self.cfg
        kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                            (x.shape[-1], cfg.n_routed_experts), jnp.float32)
        bias = None
        if cfg.topk_method == "noaux_tc":
            bias = self.param(ROUTER_BIAS, nn.initializers.zeros, (cfg.n_routed_experts,), jnp.float32)
        logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32))
        return route(logits, bias, cfg)


class MoE(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array):
        """x [B, T, D] -> (y [B, T, D], {"expert_counts": [E] int32, "balance_loss": scalar})."""
        cfg = self.cfg
        b, t, d = x.shape
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        flat = x.reshape(b * t, d)
        routing = Router(cfg, name="gate")(flat)
        init = nn.initializers.normal(cfg.initializer_range)
        gate_up = self.param("experts_gate_up_proj", init, (e, d, 2 * i), pdt)
        down = self.param("experts_down_proj", init, (e, i, d), pdt)
        y = EXPERT_BACKENDS[expert_backend(cfg.moe_backend)](flat, routing, gate_up, down, dt).reshape(b, t, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.n_shared_experts * i, name="shared_experts")(x)
        stats = {"expert_counts": expert_counts(routing.indices, e),
                 "balance_loss": sequence_balance_loss(routing.scores, routing.indices, b, cfg)}
        return y, stats
