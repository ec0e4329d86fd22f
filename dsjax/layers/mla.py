"""Multi-head Latent Attention (MLA).

Per token, keys and values come from one compressed latent: c_kv = RMSNorm(x W_dkv) (kv_lora_rank wide) and a
single shared rope key k_pe (qk_rope_head_dim wide). kv_b expands c_kv into per-head [k_nope | v].

Two ways to compute the same attention:
- full (training, prefill): expand c_kv into per-head K and V and attend as usual.
- absorbed (decode): fold kv_b's key half into the query (q_nope W_uk -> a kv_lora-wide query) and its value half
  into the output, so attention runs directly over the cached latents [c_kv | k_pe] (576 values per token for V3)
  and never materialises per-head K/V. This is what makes MLA decode cheap. Over a paged cache it is the MLA
  decode kernel (pallas_kernels/mla_decode, backend `cfg.decode_attention_impl`); over a contiguous cache, einsums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from dsjax.cache import PagedLayers
from dsjax.config import ModelConfig
from dsjax.layers.attention import NEG_INF, attention
from dsjax.layers.norms import RMSNorm
from dsjax.runtime import resolved
from dsjax.layers.rope import apply_rope

KERNEL_LATENT_DIM = 512  # mla_decode's value width (DeepSeek-V2/V3 kv_lora_rank)
HEADS = ("batch", "seq", "heads", None)  # logical axes of per-head activations (sharding/rules.py)


class Linear(nn.Module):
    """y = x @ kernel, kernel [in, out] (the transpose of a torch Linear weight); computes in cfg.dtype."""
    in_features: int
    out_features: int
    cfg: ModelConfig

    def setup(self):
        self.kernel = self.param("kernel", nn.initializers.normal(self.cfg.initializer_range),
                                 (self.in_features, self.out_features), jnp.dtype(self.cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        return jnp.dot(x.astype(dt), self.kernel.astype(dt))


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, T, S] bool: cache slot s (= absolute position s) visible to a query at position p iff s <= p."""
    return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


def _f32_einsum(eq, a, b):
    # XLA:CPU has no bf16 x bf16 -> f32 dot for these dimension layouts; elsewhere keep bf16 operands.
    if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def absorbed_attention(q_lat, q_pe, kv_cache, mask, scale, kv_lora_rank):
    """Attention over latent cache rows [c_kv | k_pe]. q_lat [B,T,H,C]; kv_cache [B,S,C+R]. Returns [B,T,H,C]."""
    c_kv, k_pe = kv_cache[..., :kv_lora_rank], kv_cache[..., kv_lora_rank:]
    s = _f32_einsum("bthc,bsc->bhts", q_lat, c_kv.astype(q_lat.dtype))
    s = s + _f32_einsum("bthr,bsr->bhts", q_pe, k_pe.astype(q_pe.dtype))
    s = jnp.where(mask[:, None], s * scale, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(q_lat.dtype)
    return _f32_einsum("bhts,bsc->bthc", p, c_kv.astype(q_lat.dtype))


def paged_absorbed_attention(q_lat, q_pe, kv: PagedLayers, positions, layer, scale, backend, platform):
    """Absorbed attention over a paged cache through the MLA decode kernel. Returns [B,T,H,C] (latent space).

    The kernel's causal rule is by query index: with `lengths` tokens cached, query i of T sees positions
    < lengths - T + i + 1. Taking lengths = 1 + the row's last valid position makes that "position <= p" for a
    chunk of consecutive positions (every caller: decode, 2-token verification, chunks) whose invalid (parked)
    queries, if any, come first (the MTP step's pending row). Callers discard parked queries' outputs; zeroing
    them keeps whatever a backend computes there (their key range can be empty) out of later layers' activations.
    The softmax scale is cfg.softmax_scale, YaRN mscale included, exactly as on the contiguous path.
    """
    # lazy: the model imports (and trains) without the kernel package
    from pallas_kernels.mla_decode import mla_decode, mla_decode_reference

    t = q_lat.shape[1]
    valid = (positions >= 0) & (positions < kv.capacity)
    lengths = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
    lengths = jnp.where(valid.any(1), lengths, t).astype(jnp.int32)  # all parked: any in-range length will do
    pool, table = kv.pool(layer)
    q = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)
    c = q_lat.shape[-1]
    if c == KERNEL_LATENT_DIM:
        out, _ = mla_decode(q, pool, table, lengths, softmax_scale=scale, backend=backend, platform=platform)
    elif backend in ("auto", "xla"):  # small test models: the reference with their latent width as values
        out, _ = mla_decode_reference(q, pool, table, lengths, softmax_scale=scale, v_dim=c)
    else:
        raise ValueError(f"decode_attention_impl={backend!r}: the kernels need kv_lora_rank "
                         f"{KERNEL_LATENT_DIM}, got {c}; use 'auto', 'xla' or 'contiguous'")
    return jnp.where(valid[:, :, None, None], out, 0)


def write_cache(kv_cache: jax.Array, new: jax.Array, positions: jax.Array, layer=None) -> jax.Array:
    """Scatter new latent rows [B,T,W] at their absolute positions [B,T] into kv_cache [B,S,W], or into layer
    `layer` of a stacked [L,B,S,W] cache (scattering into the stack directly keeps a decode loop in place).

    Positions outside [0, S) are dropped, so callers can park padding tokens at position >= S.
    """
    seq = kv_cache.shape[-2]
    b = jnp.arange(new.shape[0])[:, None]
    pos = jnp.where(positions < 0, seq, positions)
    idx = (b, pos) if layer is None else (layer, b, pos)
    return kv_cache.at[idx].set(new.astype(kv_cache.dtype), mode="drop")


class MLA(nn.Module):
    cfg: ModelConfig
    absorb: bool = False  # with a cache: attend through the absorbed path over the cache (decode)

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids=None, positions=None, kv_cache=None, layer=None):
        """x [B,T,D]; cos/sin [B,T,R/2]; kv_cache [B,S,C+R], or [L,B,S,C+R] with `layer` its index, or a
        `PagedLayers` (pages [num_pages,P,C+R] or [L,num_pages,P,C+R] with `layer`), or None.
        Returns (out [B,T,D], new kv_cache)."""
        cfg = resolved(self.cfg)
        h, nope, rdim, vdim, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                  cfg.v_head_dim, cfg.kv_lora_rank)
        b, t, d = x.shape
        pdt = jnp.dtype(cfg.param_dtype)
        if cfg.q_lora_rank:
            q = Linear(d, cfg.q_lora_rank, cfg, name="q_a_proj")(x)
            q = RMSNorm(cfg.rms_norm_eps, pdt, name="q_a_layernorm")(q)
            q = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, cfg, name="q_b_proj")(q)
        else:
            q = Linear(d, h * cfg.qk_head_dim, cfg, name="q_proj")(x)
        q = nn.with_logical_constraint(q.reshape(b, t, h, cfg.qk_head_dim), HEADS)
        q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos, sin)

        kv = Linear(d, c + rdim, cfg, name="kv_a_proj_with_mqa")(x)
        c_kv = RMSNorm(cfg.rms_norm_eps, pdt, name="kv_a_layernorm")(kv[..., :c])
        k_pe = apply_rope(kv[..., c:], cos, sin)

        kv_b = Linear(c, h * (nope + vdim), cfg, name="kv_b_proj")
        paged = isinstance(kv_cache, PagedLayers)
        if kv_cache is not None:
            new = jnp.concatenate([c_kv, k_pe], axis=-1)
            kv_cache = kv_cache.write(new, positions, layer) if paged else write_cache(kv_cache, new, positions, layer)

        if kv_cache is not None and self.absorb:
            # kv_b's kernel [C, H*(nope+v)] viewed per head: the first `nope` columns map c_kv to keys (absorbed
            # into the query), the rest map it to values (absorbed into the output).
            w = kv_b.kernel.astype(jnp.dtype(cfg.dtype)).reshape(c, h, nope + vdim)
            q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w[..., :nope])
            if paged:
                o_lat = paged_absorbed_attention(q_lat, q_pe, kv_cache, positions, layer, cfg.softmax_scale,
                                                 cfg.decode_attention_impl, cfg.platform)
            else:
                layer_kv = kv_cache if layer is None else kv_cache[layer]
                mask = cache_mask(positions, layer_kv.shape[1])
                o_lat = absorbed_attention(q_lat, q_pe, layer_kv, mask, cfg.softmax_scale, c)
            o = jnp.einsum("bthc,chv->bthv", o_lat.astype(w.dtype), w[..., nope:])
        else:
            kvh = nn.with_logical_constraint(kv_b(c_kv).reshape(b, t, h, nope + vdim), HEADS)
            o = self._full(q_nope, q_pe, kvh[..., :nope], k_pe, kvh[..., nope:], segment_ids)
        out = Linear(h * vdim, d, cfg, name="o_proj")(o.reshape(b, t, h * vdim))
        return out, kv_cache

    def _full(self, q_nope, q_pe, k_nope, k_pe, v, segment_ids):
        # The shared rope key is broadcast to every head and joined to the per-head keys: one [192]-wide head
        # for every implementation (the layout fused kernels want; 3x faster on CPU than two einsums).
        q = jnp.concatenate([q_nope, q_pe], -1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], -1)
        return attention(q, k, v, segment_ids, self.cfg.softmax_scale, resolved(self.cfg).attention_impl)
