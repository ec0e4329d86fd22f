"""Multi-Token Prediction (DeepSeek-V3, section 2.2).

Depth-k module at position t combines the representation of depth k-1 at t with the embedding of token t+k and
predicts token t+k+1:  h_k = norm_k(Block_k(eh_proj([enorm(emb(tok[t+k])); hnorm(h_{k-1})]))).
Depth 0's representation is the main model's final (normed) hidden state, the one its head reads. The
[embedding; hidden] order is the one the released eh_proj weights use (REFERENCE.md). Each h_k feeds the shared
output head and the next depth, as transformers' MtpLayer and the inference engines do. Embedding and head are
the main model's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.block import block_class
from dsjax.layers.mla import Linear
from dsjax.layers.norms import RMSNorm


class MTPModule(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_prev, emb, cos, sin, segment_ids, positions, kv_cache=None, absorb=False):
        """h_prev, emb [B, T, D] -> (h [B, T, D] normed, kv_cache, router stats)."""
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.hidden_size
        e = RMSNorm(cfg.rms_norm_eps, pdt, name="enorm")(emb)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="hnorm")(h_prev)
        x = Linear(2 * d, d, cfg, fp8=False, name="eh_proj")(jnp.concatenate([e, h], axis=-1))
        (x, kv_cache), stats = block_class(cfg)(cfg, cfg.num_moe_layers > 0, absorb, name="block")(
            (x, kv_cache), cos, sin, segment_ids, positions
        )
        return RMSNorm(cfg.rms_norm_eps, pdt, name="norm")(x), kv_cache, stats


def shift_tokens(tokens: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """tokens[:, t + k] at position t; the last k positions get `fill` (their MTP targets are masked)."""
    if k == 0:
        return tokens
    pad = jnp.full(tokens.shape[:-1] + (k,), fill, tokens.dtype)
    return jnp.concatenate([tokens[..., k:], pad], axis=-1)
