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


def _keep_best_groups(choice: jax.Array, groups: int, keep: int, per_group: int) -> jax.Array:
    """Mask (-inf) all but the `keep` groups of consecutive experts whose `per_group` best choice scores sum
    highest. Already-masked entries count as a large negative score, so a group short of `per_group` candidates
    ranks below every group that has them (device limiting after group limiting never picks an empty device)."""
    n, e = choice.shape
    grouped = jnp.where(jnp.isneginf(choice), -1e9, choice).reshape(n, groups, e // groups)
    score = jax.lax.top_k(grouped, per_group)[0].sum(-1)
    _, best = jax.lax.top_k(score, keep)
    mask = jnp.zeros((n, groups), bool).at[jnp.arange(n)[:, None], best].set(True)
    return jnp.where(jnp.repeat(mask, e // groups, axis=-1), choice, -jnp.inf)


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
            raise ValueError(f"moe_device_limit={limit} devices x {per_device} experts each cannot hold the "
                             f"num_experts_per_tok={k} experts of a token")
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
    chosen = jnp.zeros(scores.shape, jnp.float32).at[
        jnp.arange(batch)[:, None, None], jnp.arange(t)[None, :, None], indices.reshape(batch, t, k)].set(1.0)
    f = chosen.sum(1) * (e / (k * t))
    p = (scores / scores.sum(-1, keepdims=True)).mean(1)
    return (f * p).sum(-1).mean()


def _ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)


def _pallas_gmm(lhs, rhs, sizes):
    # Mosaic GPU / TPU kernel (XLA elsewhere). Accumulates in float32 and writes the compute dtype, halving
    # the traffic of the [tokens x k, 2I] intermediate against a float32 output.
    from pallas_kernels.grouped_matmul import gmm
    return gmm(lhs, rhs, sizes)


def grouped_ffn(rows, sizes, gate_up, down, dtype, matmul=_ragged_dot):
    """Each expert's SwiGLU on its contiguous group of rows: rows [M, D] sorted by expert, sizes [E] (rows past
    their sum are padding), gate_up [E, D, 2I] (gate | up), down [E, I, D]. Returns [M, D] float32."""
    h = matmul(rows.astype(dtype), gate_up.astype(dtype), sizes)
    gate, up = jnp.split(h.astype(jnp.float32), 2, axis=-1)  # the SwiGLU in float32 whatever matmul wrote
    a = (jax.nn.silu(gate) * up).astype(dtype)
    return matmul(a, down.astype(dtype), sizes)


def sorted_experts(x, routing: Routing, gate_up, down, dtype, matmul=_ragged_dot):
    """Routed experts on expert-sorted rows with grouped matmuls. x [N, D]; gate_up [E, D, 2I]; down [E, I, D]."""
    n, k = routing.indices.shape
    e = gate_up.shape[0]
    flat = routing.indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    y = grouped_ffn(x[order // k], sizes, gate_up, down, dtype, matmul)
    y = y[jnp.argsort(order)].reshape(n, k, -1)  # back to (token, choice) order
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), routing.weights).astype(dtype)


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

    def setup(self):
        cfg = self.cfg
        self.kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                                 (cfg.hidden_size, cfg.n_routed_experts), jnp.float32)
        self.bias = None
        if cfg.topk_method == "noaux_tc":
            self.bias = self.param(ROUTER_BIAS, nn.initializers.zeros, (cfg.n_routed_experts,), jnp.float32)

    def __call__(self, x: jax.Array) -> Routing:
        return route(jnp.dot(x.astype(jnp.float32), self.kernel.astype(jnp.float32)), self.bias, self.cfg)


def mesh_bound() -> bool:
    """True while a mesh is bound for tracing (`sharding.rules.activate`, i.e. jax.set_mesh)."""
    return not jax.sharding.get_abstract_mesh().empty


class MoE(nn.Module):
    """Routed + shared experts. Under a bound mesh the routed experts run per device inside shard_map (tokens
    never leave their device unless the mesh's expert axis is > 1, which sends them to the experts' owners by
    all-to-all: sharding/expert_parallel.py); without one, on the whole batch with `cfg.moe_backend`."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array):
        """x [B, T, D] -> (y [B, T, D], {"expert_counts": [E] int32, "balance_loss": scalar})."""
        cfg = self.cfg
        b, t, d = x.shape
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        gate = Router(cfg, name="gate")
        init = nn.initializers.normal(cfg.initializer_range)
        gate_up = self.param("experts_gate_up_proj", init, (e, d, 2 * i), pdt)
        down = self.param("experts_down_proj", init, (e, i, d), pdt)
        if mesh_bound():
            from sharding.expert_parallel import routed_experts  # imported here: sharding imports this module
            y, counts, balance = routed_experts(x, gate.kernel, gate.bias, gate_up, down, cfg)
        else:
            flat = x.reshape(b * t, d)
            routing = gate(flat)
            y = EXPERT_BACKENDS[expert_backend(cfg.moe_backend)](flat, routing, gate_up, down, dt).reshape(b, t, d)
            counts = expert_counts(routing.indices, e)
            balance = sequence_balance_loss(routing.scores, routing.indices, b, cfg)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.n_shared_experts * i, name="shared_experts")(x)
        return y, {"expert_counts": counts, "balance_loss": balance}
