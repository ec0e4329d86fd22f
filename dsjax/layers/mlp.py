"""SwiGLU MLP: the dense FFN of the first layers and the shared experts of MoE layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.mla import Linear, linears


@functools.partial(jax.checkpoint, static_argnums=(2,))
def swiglu(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up in float32, returned in `dtype`. Rematerialised: the backward recomputes it from gate and up
    rather than keeping its float32 intermediates (for the routed experts, 5 arrays of [tokens x k, I] per layer:
    the largest residuals of an MoE layer)."""
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, i = x.shape[-1], self.intermediate_size
        gate, up = linears(x, [Linear(d, i, self.cfg, name="gate_proj"), Linear(d, i, self.cfg, name="up_proj")])
        hidden = nn.with_logical_constraint(swiglu(gate, up, gate.dtype), ("batch", "seq", "mlp")[-x.ndim :])
        return Linear(i, d, self.cfg, name="down_proj")(hidden)
