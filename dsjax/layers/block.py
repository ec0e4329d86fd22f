"""One pre-norm transformer block: x + MLA(norm(x)), then + FFN(norm(.)), FFN = dense SwiGLU or DeepSeekMoE."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.mla import MLA
from dsjax.layers.mlp import MLP
from dsjax.layers.moe import MoE
from dsjax.layers.norms import RMSNorm

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool
    absorb: bool = False

    @nn.compact
    def __call__(self, carry, cos, sin, segment_ids, positions, layer=None, experts=None):
        """Scan-shaped: carry (x, kv_cache) -> ((x, kv_cache), stats); stats is {} for dense blocks.

        Under nn.scan the kv_cache is the whole segment's stacked cache [L,B,S,W] and `layer` this block's
        index: carrying the stack (rather than scanning over it) lets XLA update it in place in a decode loop.
        experts: the segment's FP8 expert weights quantized for every layer (moe.stacked_expert_blocks), or None;
        this block's MoE reads layer `layer`'s.
        """
        x, kv_cache = carry
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        h, kv_cache = MLA(cfg, self.absorb, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(x), cos, sin, segment_ids, positions, kv_cache, layer
        )
        x = x + h
        y = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(x)
        if self.moe:
            y, stats = MoE(cfg, name="mlp")(y, None if experts is None else experts._replace(layer=layer))
        else:
            y, stats = MLP(cfg, cfg.intermediate_size, name="mlp")(y), {}
        x = nn.with_logical_constraint((x + y).astype(x.dtype), ("batch", "seq", "act_embed"))
        return (x, kv_cache), stats


def block_class(cfg: ModelConfig):
    """Block, wrapped in nn.remat when cfg.remat asks for rematerialisation."""
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)


def scanned_blocks(cfg: ModelConfig, moe: bool, length: int, absorb: bool, name: str):
    """`length` blocks with stacked parameters (leading axis = layer), applied with nn.scan.

    Compile time stays flat in depth: XLA sees one block body (cfg.unroll_layers: `length` copies of it, so the
    backward pass reads each layer's residuals where the forward left them, not from zero-filled stacks). Call it
    with ((x, cache), cos, sin, segment_ids, positions, jnp.arange(length), experts); the layer index is the scanned
    input that picks each block's cache slice (and its experts' blocks from `experts`, every layer's stacks, which
    enter whole: a scanned slice of them would be copied out per layer).
    """
    scan = nn.scan(
        block_class(cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=length,
        unroll=length if cfg.unroll_layers else 1,
    )
    return scan(cfg, moe, absorb, name=name)
