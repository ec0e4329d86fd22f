"""DeepSeekV3: embed -> dense blocks -> MoE blocks (one nn.scan per segment) -> norm -> head (+ MTP modules)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from dsjax.cache import KVCache
from dsjax.config import ModelConfig
from dsjax.layers.block import scanned_blocks
from dsjax.layers.mtp import MTPModule, shift_tokens
from dsjax.layers.norms import RMSNorm
from dsjax.layers.rope import rope_cos_sin


class DeepSeekV3(nn.Module):
    """The model. `apply(v, tokens)` -> logits [B, T, vocab] float32.

    Keyword options:
      positions [B, T]   absolute positions (default 0..T-1); with packing, restart at each document.
      segment_ids [B, T] packed-document ids; attention never crosses documents.
      cache              a `KVCache`: the new tokens' latents are written at `positions`, and the call returns
                         (logits, cache). `absorbed` (default True with a cache) attends through the absorbed
                         path over the whole cache (decode, chunked prefill); False attends within the chunk
                         only (a prompt prefill starting at position 0).
      mtp=True           also run the MTP modules (training-style, every position); needs depth > 0.
      return_aux=True    append a dict: hidden [B,T,D] (final normed), expert_counts [L_moe, E] int32,
                         balance_loss [L_moe], and with mtp: mtp_logits [D,B,T,V], mtp_hidden, mtp_expert_counts.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, cache: KVCache | None = None,
                 absorbed: bool | None = None, mtp: bool = False, return_aux: bool = False):
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mtp and cfg.num_nextn_predict_layers == 0:
            raise ValueError("mtp=True but ModelConfig.num_nextn_predict_layers is 0")
        absorb = cache is not None if absorbed is None else absorbed
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packing) is a training feature; it cannot be combined with a cache")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(
            cfg.initializer_range), param_dtype=jnp.dtype(cfg.param_dtype), name="embed_tokens")
        dt = jnp.dtype(cfg.dtype)
        x = embed(tokens).astype(dt)
        cos, sin = rope_cos_sin(positions, cfg)
        aux: dict[str, Any] = {}
        new_cache = {}
        for seg, n, moe in (("dense", cfg.num_dense_layers, False), ("moe", cfg.num_moe_layers, True)):
            if n == 0:
                new_cache[seg] = None
                continue
            layer_cache = None if cache is None else getattr(cache, seg)
            x, (layer_cache, stats) = scanned_blocks(cfg, moe, n, absorb, f"{seg}_layers")(
                x, cos, sin, segment_ids, positions, layer_cache)
            new_cache[seg] = layer_cache
            if moe:
                aux.update(stats)
        h = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype), name="norm")(x)
        head = self._head(embed)
        logits = head(h)
        aux["hidden"] = h

        new_cache["mtp"] = None if cache is None else cache.mtp
        if mtp or (self.is_initializing() and cfg.num_nextn_predict_layers):  # init always builds MTP params
            mtp_logits, mtp_hidden, mtp_counts, mtp_caches = [], [], [], []
            h_prev = h
            for k in range(1, cfg.num_nextn_predict_layers + 1):
                pos_k = positions + k  # the position of the embedded token t+k; rope is relative, so any offset works
                cos_k, sin_k = rope_cos_sin(pos_k, cfg)
                kv = None if cache is None or cache.mtp is None else cache.mtp[k - 1]
                h_prev, kv, stats = MTPModule(cfg, absorb, name=f"mtp_{k - 1}")(
                    h_prev, embed(shift_tokens(tokens, k)).astype(dt), cos_k, sin_k, segment_ids, pos_k, kv)
                mtp_logits.append(head(h_prev))
                mtp_hidden.append(h_prev)
                mtp_caches.append(kv)
                if stats:
                    mtp_counts.append(stats["expert_counts"])
            aux["mtp_logits"] = jnp.stack(mtp_logits)
            aux["mtp_hidden"] = jnp.stack(mtp_hidden)
            if mtp_counts:
                aux["mtp_expert_counts"] = jnp.stack(mtp_counts)
            if cache is not None and cache.mtp is not None:
                new_cache["mtp"] = jnp.stack(mtp_caches)

        out = (logits,)
        if cache is not None:
            out += (KVCache(**new_cache),)
        if return_aux:
            out += (aux,)
        return out[0] if len(out) == 1 else out

    def _head(self, embed: nn.Embed):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if cfg.tie_word_embeddings:
            return lambda h: jnp.dot(h.astype(dt), embed.embedding.T.astype(dt), preferred_element_type=jnp.float32)
        w = self.param("lm_head", nn.initializers.normal(cfg.initializer_range), (cfg.hidden_size, cfg.vocab_size),
                       jnp.dtype(cfg.param_dtype))
        return lambda h: jnp.dot(h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
