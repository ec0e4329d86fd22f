"""DeepSeekV3: embed -> dense blocks -> MoE blocks (one nn.scan per segment) -> norm -> head (+ MTP modules)."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.cache import KVCache, PagedKVCache
from dsjax.config import ModelConfig
from dsjax.layers.block import scanned_blocks
from dsjax.layers.moe import stacked_expert_blocks
from dsjax.layers.mtp import MTPModule, shift_tokens
from dsjax.layers.norms import RMSNorm
from dsjax.layers.rope import rope_cos_sin
from dsjax.runtime import resolved


def head_weight(params, cfg: ModelConfig) -> jax.Array:
    """The output head [D, V] from a params tree (the transposed embedding when the embeddings are tied)."""
    return params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


class ModelOutput(NamedTuple):
    """What `DeepSeekV3.apply` returns, whatever the options. Unused fields cost nothing under jit (XLA drops
    them): training reads `aux["hidden"]` and never the logits."""

    logits: jax.Array  # [B, T, vocab] float32
    cache: Any  # the updated KVCache / PagedKVCache, or None without one
    aux: dict[str, Any]  # hidden [B,T,D] (final normed), expert_counts [L_moe, E] int32, balance_loss [L_moe];
    #                        with mtp=True also mtp_logits [D,B,T,V], mtp_hidden [D,B,T,D], mtp_expert_counts


class DeepSeekV3(nn.Module):
    """The model. `apply(v, tokens)` -> ModelOutput(logits [B, T, vocab] float32, cache, aux).

    Keyword options:
      positions [B, T]   absolute positions (default 0..T-1); with packing, restart at each document.
      segment_ids [B, T] packed-document ids; attention never crosses documents. With cfg.document_mask False a
                         packed row is one causal sequence instead (positions 0..T-1; DeepSeek-V3's pretraining).
      cache              a `KVCache` or `PagedKVCache`: the new tokens' latents are written at `positions` and the
                         updated cache comes back in `.cache`. `absorbed` (default True with a cache) attends
                         through the absorbed path over the whole cache (decode, chunked prefill; over a paged cache
                         each row's positions must be consecutive); False attends within the chunk only (a prompt
                         prefill starting at position 0).
      mtp=True           also run the MTP modules (training-style, every position); needs depth > 0.
    `mtp_step` runs one MTP depth on given hidden states and next tokens (speculative drafting).

    A config whose runtime knobs still say "auto" is resolved against this process's devices on construction
    (dsjax/runtime.py); trainers and engines pass one resolved for the devices they target.
    """

    cfg: ModelConfig

    def __post_init__(self):
        object.__setattr__(self, "cfg", resolved(self.cfg))  # before Flax freezes the fields
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            param_dtype=jnp.dtype(cfg.param_dtype),
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.initializers.normal(cfg.initializer_range),
                (cfg.hidden_size, cfg.vocab_size),
                jnp.dtype(cfg.param_dtype),
            )
        self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

    def embed(self, tokens):
        x = self.embed_tokens(tokens).astype(jnp.dtype(self.cfg.dtype))
        return nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))  # no-op unless rules are bound

    def head(self, h):
        """Final-hidden -> float32 logits (shared by the main model and every MTP depth)."""
        dt = jnp.dtype(self.cfg.dtype)
        w = self.embed_tokens.embedding.T if self.cfg.tie_word_embeddings else self.lm_head
        logits = jnp.dot(h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "seq", "vocab")[-logits.ndim :])

    @nn.compact
    def __call__(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        *,
        cache: KVCache | PagedKVCache | None = None,
        absorbed: bool | None = None,
        mtp: bool = False,
    ) -> ModelOutput:
        cfg = self.cfg
        b, t = tokens.shape
        attn_segments = segment_ids if cfg.document_mask else None
        if positions is None or (segment_ids is not None and attn_segments is None):
            # without document masks a packed row is one sequence to attention, so rope positions run across it
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mtp and cfg.num_nextn_predict_layers == 0:
            raise ValueError("mtp=True but ModelConfig.num_nextn_predict_layers is 0")
        absorb = cache is not None if absorbed is None else absorbed
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packing) is a training feature; it cannot be combined with a cache")
        x = self.embed(tokens)
        cos, sin = rope_cos_sin(positions, cfg)
        aux: dict[str, Any] = {}
        if cache is not None:
            cache = cache.record(positions)  # paged: per-sequence lengths now end at the last token written
        for seg, n, moe in (("dense", cfg.num_dense_layers, False), ("moe", cfg.num_moe_layers, True)):
            if n == 0:
                continue
            # The segment's whole stacked cache rides in the scan carry, so a decode loop updates it in place.
            layer_cache = None if cache is None else cache.layers(seg)
            experts = None
            if moe and not self.is_initializing():  # FP8: every layer's experts quantized in one pass
                experts = stacked_expert_blocks(self.variables["params"][f"{seg}_layers"]["mlp"], cfg)
            (x, layer_cache), stats = scanned_blocks(cfg, moe, n, absorb, f"{seg}_layers")(
                (x, layer_cache), cos, sin, attn_segments, positions, jnp.arange(n), experts
            )
            if cache is not None:
                cache = cache.with_layers(seg, layer_cache)
            if moe:
                aux.update(stats)
        h = self.norm(x)
        logits = self.head(h)
        aux["hidden"] = h

        if mtp or (self.is_initializing() and cfg.num_nextn_predict_layers):  # init always builds MTP params
            outs = {"mtp_logits": [], "mtp_hidden": [], "mtp_expert_counts": []}
            mtp_caches = []
            for k in range(1, cfg.num_nextn_predict_layers + 1):
                kv = None if cache is None or cache.mtp is None else cache.mtp_layer(k - 1)
                # positions of the embedded tokens t + k (rope is relative, so the offset does not change scores)
                mtp_logits, h, kv, stats = self.mtp_step(
                    h, shift_tokens(tokens, k), positions + k, k - 1, kv, absorb, attn_segments
                )
                outs["mtp_logits"].append(mtp_logits)
                outs["mtp_hidden"].append(h)
                mtp_caches.append(kv)
                if stats:
                    outs["mtp_expert_counts"].append(stats["expert_counts"])
            aux.update({k: jnp.stack(v) for k, v in outs.items() if v})
            if cache is not None and cache.mtp is not None:
                cache = cache.with_mtp_layers(mtp_caches)

        return ModelOutput(logits, cache, aux)

    def mtp_step(
        self, h_prev, next_tokens, positions, depth: int, kv_cache=None, absorbed: bool = True, segment_ids=None
    ):
        """MTP depth `depth` (0-based): hidden of the previous depth at t + embedding of token t+depth+1.

        positions are those of `next_tokens`. Returns (logits, hidden, kv_cache, router stats).
        """
        cos, sin = rope_cos_sin(positions, self.cfg)
        h, kv_cache, stats = self.mtp[depth](
            h_prev,
            self.embed(next_tokens),
            cos,
            sin,
            segment_ids,
            positions,
            kv_cache,
            absorb=absorbed and kv_cache is not None,
        )
        return self.head(h), h, kv_cache, stats
