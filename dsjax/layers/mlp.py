"""SwiGLU MLP: the dense FFN of the first layers and the shared experts of MoE layers."""
import jax
import flax.linen as nn

from dsjax.config import ModelConfig
from dsjax.layers.mla import Linear


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, i = x.shape[-1], self.intermediate_size
        gate = Linear(d, i, self.cfg, name="gate_proj")(x)
        up = Linear(d, i, self.cfg, name="up_proj")(x)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "mlp")[-x.ndim:])
        return Linear(i, d, self.cfg, name="down_proj")(hidden)
