"""SwiGLU MLP: the dense FFN of the first layers and the shared experts of MoE layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.fp8 import fp8_mlp, on_local_tokens
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
        d, i, cfg = x.shape[-1], self.intermediate_size, self.cfg
        gate_proj, up_proj = Linear(d, i, cfg, name="gate_proj"), Linear(d, i, cfg, name="up_proj")
        down_proj = Linear(i, d, cfg, name="down_proj")
        if cfg.fp8 == "e4m3":  # the whole MLP in one FP8 function: its SwiGLU quantizes h in the same pass
            kernels = (gate_proj.kernel, up_proj.kernel, down_proj.kernel)
            mlp = lambda x, *ws: fp8_mlp(x, *ws, swiglu, cfg.fp8_backend, cfg.fp8_wgrad)  # noqa: E731
            return on_local_tokens(mlp, x.astype(jnp.dtype(cfg.dtype)), *kernels)
        gate, up = linears(x, [gate_proj, up_proj])
        hidden = nn.with_logical_constraint(swiglu(gate, up, gate.dtype), ("batch", "seq", "mlp")[-x.ndim :])
        return down_proj(hidden)
