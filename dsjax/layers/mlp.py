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
    return _silu_times(gate, up, dtype)


@functools.partial(jax.checkpoint, static_argnums=(1,))
def swiglu_joined(gate_up: jax.Array, dtype) -> jax.Array:
    """swiglu of gate_up [..., 2I] = (gate | up), split inside the rematerialised function: its residual is gate_up
    itself, which the fused SwiGLU kernels slice as they read it. Split outside, the two halves are the residuals and
    XLA copies each out (the routed experts of `small`: 24 copies of [196608, 512] a step, 9.6 GB)."""
    return _silu_times(*jnp.split(gate_up, 2, axis=-1), dtype)


def _silu_times(gate, up, dtype):
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int
    expert: bool = False  # the shared experts: FP8 and its weight gradients as the routed experts' (fp8_experts)

    def setup(self):
        d, i, cfg = self.cfg.hidden_size, self.intermediate_size, self.cfg
        self.gate_proj, self.up_proj = Linear(d, i, cfg, name="gate_proj"), Linear(d, i, cfg, name="up_proj")
        self.down_proj = Linear(i, d, cfg, name="down_proj")

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        fp8 = cfg.fp8_experts if self.expert else cfg.fp8_linear
        if fp8:  # the whole MLP in one FP8 function: its SwiGLU quantizes h in the same pass
            kernels = (self.gate_proj.kernel, self.up_proj.kernel, self.down_proj.kernel)
            wgrad = cfg.fp8_wgrad_experts if self.expert else cfg.fp8_wgrad_linear
            mlp = lambda x, *ws: fp8_mlp(x, *ws, swiglu, cfg.fp8_backend, wgrad)  # noqa: E731
            return on_local_tokens(mlp, x.astype(jnp.dtype(cfg.dtype)), *kernels)
        gate, up = linears(x, [self.gate_proj, self.up_proj])
        hidden = nn.with_logical_constraint(swiglu(gate, up, gate.dtype), ("batch", "seq", "mlp")[-x.ndim :])
        return self.down_proj(hidden)

    def as_experts(self, width: int) -> tuple[jax.Array, jax.Array]:
        """This MLP as intermediate_size / width experts of `width` channels that every token goes to, in the routed
        experts' layout (experts_view)."""
        return experts_view(self.gate_proj.kernel, self.up_proj.kernel, self.down_proj.kernel, width)


def experts_view(gate, up, down, width: int) -> tuple[jax.Array, jax.Array]:
    """A SwiGLU MLP's kernels (gate, up [..., D, I], down [..., I, D]; `...`: e.g. a scanned segment's layers) as
    I / width experts of `width` channels in the routed experts' layout: (gate_up [..., S, D, 2 width] (gate | up),
    down [..., S, width, D]). SwiGLU acts per channel and down_proj sums over them, so the sum of the S experts'
    outputs is the MLP's output."""
    *lead, d, i = gate.shape
    s = i // width
    gate, up = (jnp.swapaxes(k.reshape(*lead, d, s, width), -3, -2) for k in (gate, up))
    return jnp.concatenate([gate, up], axis=-1), down.reshape(*lead, s, width, d)
