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

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.layers.attention import attention
from dsjax.layers.fp8 import fp8_dot, fp8_dots, on_local_tokens
from dsjax.layers.norms import RMSNorm
from dsjax.layers.rope import apply_rope
from dsjax.runtime import resolved

HEADS = ("batch", "seq", "heads", None)  # logical axes of per-head activations (sharding/rules.py)


class Linear(nn.Module):
    """y = x @ kernel, kernel [in, out] (the transpose of a torch Linear weight); computes in cfg.dtype, or in
    FP8 when cfg.fp8_linear says so and the layer is one DeepSeek-V3 trains in FP8 (`fp8`)."""

    in_features: int
    out_features: int
    cfg: ModelConfig
    fp8: bool = True

    def setup(self):
        self.kernel = self.param(
            "kernel",
            nn.initializers.normal(self.cfg.initializer_range),
            (self.in_features, self.out_features),
            jnp.dtype(self.cfg.param_dtype),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        if self.fp8 and self.cfg.fp8_linear:
            # quantized from the master weight; its gradient comes back float32
            backend, wgrad = self.cfg.fp8_backend, self.cfg.fp8_wgrad_linear
            return on_local_tokens(lambda x, w: fp8_dot(x, w, backend, wgrad), x.astype(dt), self.kernel)
        return jnp.dot(x.astype(dt), self.kernel.astype(dt))


def linears(x: jax.Array, layers) -> list[jax.Array]:
    """Each Linear of `layers` applied to the same x. In FP8 one quantization of x (and of the joined output
    gradient) serves them all: their kernels run as one GEMM (dsjax.layers.fp8.fp8_dots)."""
    cfg = layers[0].cfg
    if cfg.fp8_linear and all(layer.fp8 for layer in layers):
        kernels = [layer.kernel for layer in layers]
        dots = lambda x, *ws: fp8_dots(x, list(ws), cfg.fp8_backend, cfg.fp8_wgrad_linear)  # noqa: E731
        return on_local_tokens(dots, x.astype(jnp.dtype(cfg.dtype)), *kernels)
    return [layer(x) for layer in layers]


class MLA(nn.Module):
    cfg: ModelConfig
    absorb: bool = False  # with a cache: attend through the absorbed path over the cache (decode)

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids=None, positions=None, kv_cache=None, layer=None):
        """x [B,T,D]; cos/sin [B,T,R/2]; kv_cache: one layer's (or, with `layer` its index, a stacked segment's)
        latent cache as the cache hands it out (dsjax/cache.py: `write` and `attend`, whatever the layout), or
        None. Returns (out [B,T,D], new kv_cache)."""
        cfg = resolved(self.cfg)
        h, nope, rdim, vdim, c = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        b, t, d = x.shape
        pdt = jnp.dtype(cfg.param_dtype)
        kv_a = Linear(d, c + rdim, cfg, name="kv_a_proj_with_mqa")
        if cfg.q_lora_rank:  # the query's and the latent's down-projections read the same x
            q, kv = linears(x, [Linear(d, cfg.q_lora_rank, cfg, name="q_a_proj"), kv_a])
            q = RMSNorm(cfg.rms_norm_eps, pdt, name="q_a_layernorm")(q)
            q = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, cfg, name="q_b_proj")(q)
        else:
            q, kv = linears(x, [Linear(d, h * cfg.qk_head_dim, cfg, name="q_proj"), kv_a])
        q = nn.with_logical_constraint(q.reshape(b, t, h, cfg.qk_head_dim), HEADS)
        q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos, sin)

        c_kv = RMSNorm(cfg.rms_norm_eps, pdt, name="kv_a_layernorm")(kv[..., :c])
        k_pe = apply_rope(kv[..., c:], cos, sin)

        kv_b = Linear(c, h * (nope + vdim), cfg, name="kv_b_proj")
        if kv_cache is not None:
            kv_cache = kv_cache.write(jnp.concatenate([c_kv, k_pe], axis=-1), positions, layer)

        if kv_cache is not None and self.absorb:
            # kv_b's kernel [C, H*(nope+v)] viewed per head: the first `nope` columns map c_kv to keys (absorbed
            # into the query), the rest map it to values (absorbed into the output).
            w = kv_b.kernel.astype(jnp.dtype(cfg.dtype)).reshape(c, h, nope + vdim)
            q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w[..., :nope])
            o_lat = kv_cache.attend(q_lat, q_pe, positions, layer, cfg)
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
