"""DeepSeekMoE layer: the router module and the MoE module (routed + shared experts).

The math lives in dsjax/layers/moe_ops.py (routing, expert sort, grouped SwiGLU, combine). Under a bound mesh
(`sharding.rules.activate`) the routed experts run per device inside shard_map (dsjax/layers/moe_parallel.py):
tokens never leave their device unless the mesh's expert axis is > 1, which sends them to the experts' owners by
all-to-all. Without one, on the whole batch with `cfg.moe_backend`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.fp8 import ExpertBlocks, expert_stacks
from dsjax.layers.mlp import MLP, experts_view
from dsjax.layers.moe_ops import (
    Routing,
    expert_counts,
    route,
    routed_experts_local,
    router_logits,
    sequence_balance_loss,
    shared_in_routed,
)
from dsjax.layers.moe_parallel import routed_experts
from dsjax.runtime import resolved

ROUTER_BIAS = "e_score_correction_bias"  # the name the optimizer masks out and the balancing update edits


class Router(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.kernel = self.param(
            "kernel",
            nn.initializers.normal(cfg.initializer_range),
            (cfg.hidden_size, cfg.n_routed_experts),
            jnp.float32,
        )
        self.bias = None
        if cfg.topk_method == "noaux_tc":
            self.bias = self.param(ROUTER_BIAS, nn.initializers.zeros, (cfg.n_routed_experts,), jnp.float32)

    def __call__(self, x: jax.Array) -> Routing:
        return route(router_logits(x, self.kernel), self.bias, self.cfg)


def mesh_bound() -> bool:
    """True while a mesh is bound for tracing (`sharding.rules.activate`, i.e. jax.set_mesh)."""
    return not jax.sharding.get_abstract_mesh().empty


def stacked_expert_blocks(mlp_params, cfg: ModelConfig) -> ExpertBlocks | None:
    """The FP8 experts' weights of a scanned segment (mlp_params: its MoE modules' stacked parameters, [L, ...]
    each) quantized for every layer at once (fp8.ExpertBlocks), where the experts run on the local tokens in FP8;
    else None (each layer quantizes its own). The model passes them to its scan, each MoE layer picks its own."""
    cfg = resolved(cfg)
    if not cfg.fp8_experts or cfg.moe_backend == "dense" or mesh_bound():
        return None
    gate_up, down = mlp_params["experts_gate_up_proj"], mlp_params["experts_down_proj"]
    if shared_in_routed(cfg):
        kernels = (mlp_params["shared_experts"][name]["kernel"] for name in ("gate_proj", "up_proj", "down_proj"))
        shared = experts_view(*kernels, cfg.moe_intermediate_size)
        gate_up, down = (gate_up, shared[0]), (down, shared[1])
    return expert_stacks(gate_up, down, cfg.fp8_backend)


class MoE(nn.Module):
    """Routed + shared experts (see the module docstring for when the routed experts go through shard_map)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, blocks: ExpertBlocks | None = None):
        """x [B, T, D] -> (y [B, T, D], {"expert_counts": [E] int32, "balance_loss": scalar}). blocks: this layer's
        FP8 expert weights from stacked_expert_blocks (layer set), or None."""
        cfg = resolved(self.cfg)
        b, t, d = x.shape
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        pdt = jnp.dtype(cfg.param_dtype)
        gate = Router(cfg, name="gate")
        init = nn.initializers.normal(cfg.initializer_range)
        gate_up = self.param("experts_gate_up_proj", init, (e, d, 2 * i), pdt)
        down = self.param("experts_down_proj", init, (e, i, d), pdt)
        shared = (
            MLP(cfg, cfg.n_shared_experts * i, expert=True, name="shared_experts") if cfg.n_shared_experts else None
        )
        # in FP8 the shared experts join the routed experts' grouped GEMMs (one quantization of the tokens and of
        # their gradient for both) where the routed experts run whole on each device's tokens
        stacked = shared.as_experts(i) if shared is not None and shared_in_routed(cfg) else None
        if mesh_bound():
            y, counts, balance, folded = routed_experts(x, gate.kernel, gate.bias, gate_up, down, cfg, stacked)
        else:
            flat = x.reshape(b * t, d)
            routing = gate(flat)
            y = routed_experts_local(flat, routing, gate_up, down, cfg, stacked, blocks).reshape(b, t, d)
            counts = expert_counts(routing.indices, e)
            balance = sequence_balance_loss(routing.scores, routing.indices, b, cfg)
            folded = stacked is not None
        if shared is not None and not folded:
            y = y + shared(x)
        return y, {"expert_counts": counts, "balance_loss": balance}
