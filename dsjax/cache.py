"""The latent KV cache: per layer and token, normalised c_kv (kv_lora_rank) then roped k_pe (qk_rope_head_dim).

Slot s of a sequence's cache holds the token at absolute position s, so masking is just `s <= query position`.
Layers are stacked the way the model scans them: dense segment, MoE segment, then the MTP modules.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig


class KVCache(NamedTuple):
    dense: jax.Array | None   # [num_dense_layers, B, S, kv_lora_rank + qk_rope_head_dim]
    moe: jax.Array | None     # [num_moe_layers, B, S, W]
    mtp: jax.Array | None     # [num_nextn_predict_layers, B, S, W]

    @property
    def max_len(self) -> int:
        return next(a for a in self if a is not None).shape[2]

    @property
    def batch(self) -> int:
        return next(a for a in self if a is not None).shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, with_mtp: bool = False) -> KVCache:
    def zeros(layers):
        return jnp.zeros((layers, batch, max_len, cfg.cache_width), dtype) if layers else None
    return KVCache(zeros(cfg.num_dense_layers), zeros(cfg.num_moe_layers),
                   zeros(cfg.num_nextn_predict_layers) if with_mtp else None)


def bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """(kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes: 70,272 B for DeepSeek-V3 in bf16."""
    return cfg.cache_bytes_per_token(jnp.dtype(dtype).itemsize)
