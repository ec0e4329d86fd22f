"""MLA's full attention (training, prompt prefill): causal, within packed documents, softmax in float32.

    out = attention(q, k, v, segment_ids, scale, impl)   # q, k [B, T, H, Dqk]; v [B, T, H, Dv] -> [B, T, H, Dv]

Query i sees key j iff j <= i and, with `segment_ids` [B, T], both lie in the same document. MLA's value head
(128) is narrower than its query/key head (192 = 128 nope + 64 rope). `impl` (ModelConfig.attention_impl, made
concrete by dsjax/runtime.py):
  "xla"     einsums; materialises [B, H, T, T] float32 scores (the reference; any platform)
  "cudnn"   cuDNN flash attention (NVIDIA GPU, bf16/f16): MLA head dims as they are, documents as a packed
            (ragged-offset) layout, so neither a [B, T, T] mask nor a padded value head reaches the kernel
  "splash"  Pallas splash attention (TPU)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_spec

NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN
# Documents per row the cuDNN packed layout describes; a row holding more attends across the boundaries of its
# last ones (still causally). Packed rows of 2,048 stdlib tokens hold at most 4.
CUDNN_MAX_SEGMENTS = 16


def causal_mask(segment_ids: jax.Array | None, t: int) -> jax.Array:
    """[B or 1, T, T] bool: key j visible to query i iff j <= i and both are in the same packed document."""
    idx = jnp.arange(t)
    mask = (idx[None, :] <= idx[:, None])[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def xla_attention(q, k, v, mask, scale):
    """Reference: q [B,T,H,D], k [B,S,H,D], v [B,S,H,Dv], mask [B or 1, T, S] bool. Heads-major matmuls (the
    layout XLA:CPU runs fastest), float32 softmax."""
    s = jnp.einsum(
        "bhtd,bhsd->bhts", q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32
    )
    s = jnp.where(mask[:, None], s * scale, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhts,bhsd->bhtd", p, v.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
    return o.transpose(0, 2, 1, 3).astype(v.dtype)


def segment_layout(segment_ids: jax.Array, max_segments: int):
    """cuDNN's packed layout of each row: (seqlens [B, M], offsets [B, M + 1]), -1 past the row's documents.

    A document is a maximal run of equal segment ids (padding, id 0, is a run of its own). The M-th entry spans
    everything from its start to the row's end, so rows with more than M documents stay covered."""
    b, t = segment_ids.shape
    change = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    starts = jax.vmap(lambda c: jnp.nonzero(c, size=max_segments, fill_value=t)[0])(change).astype(jnp.int32)
    ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), t, jnp.int32)], axis=1)
    real = starts < t
    seqlens = jnp.where(real, ends - starts, -1)
    offsets = jnp.concatenate([jnp.where(real, starts, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return seqlens.astype(jnp.int32), offsets


def cudnn_attention(q, k, v, segment_ids, scale, max_segments: int = CUDNN_MAX_SEGMENTS):
    """cuDNN flash attention; documents as cuDNN's packed (ragged-offset) layout instead of a [B, 1, T, T] mask.

    jax.nn.dot_product_attention takes neither a value head narrower than the query's nor document offsets, so
    this calls the cuDNN primitive it wraps (jax._src.cudnn, cuDNN >= 9.10 on Hopper for MLA's head dims). Without
    documents the value head stays 128 wide. With them it is zero-padded to the query's width: JAX derives the
    value tensor's ragged offsets from the query's head dim (a narrower value head reads out of bounds). Where the
    private module is missing: the public API, value head padded, documents as a dense mask (slow)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:  # pragma: no cover - a jax without the module
        fa = None
    if fa is not None and segment_ids is None:
        return fa.dot_product_attention(q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL)
    dv = v.shape[-1]
    vp = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - dv)])
    if fa is not None:
        seqlens, offsets = segment_layout(segment_ids, max_segments)
        o = fa.dot_product_attention(
            q,
            k,
            vp,
            q_seqlen=seqlens,
            kv_seqlen=seqlens,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=scale,
            mask_type=fa.MaskType.PADDING_CAUSAL,
        )
        return o[..., :dv]
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    o = jax.nn.dot_product_attention(q, k, vp, mask=mask, scale=scale, is_causal=True, implementation="cudnn")
    return o[..., :dv]


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, T, S] bool: cache slot s (= absolute position s) visible to a query at position p iff s <= p."""
    return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


def _f32_einsum(eq, a, b, platform):
    # XLA:CPU has no bf16 x bf16 -> f32 dot for these dimension layouts; elsewhere keep bf16 operands.
    if platform == "cpu" and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def absorbed_attention(q_lat, q_pe, kv_cache, mask, scale, kv_lora_rank, platform="gpu"):
    """Attention over latent cache rows [c_kv | k_pe]. q_lat [B,T,H,C]; kv_cache [B,S,C+R]. Returns [B,T,H,C]."""
    c_kv, k_pe = kv_cache[..., :kv_lora_rank], kv_cache[..., kv_lora_rank:]
    s = _f32_einsum("bthc,bsc->bhts", q_lat, c_kv.astype(q_lat.dtype), platform)
    s = s + _f32_einsum("bthr,bsr->bhts", q_pe, k_pe.astype(q_pe.dtype), platform)
    s = jnp.where(mask[:, None], s * scale, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(q_lat.dtype)
    return _f32_einsum("bhts,bsc->bthc", p, c_kv.astype(q_lat.dtype), platform)


def paged_absorbed_attention(q_lat, q_pe, pool, table, capacity, positions, scale, backend, platform):
    """Absorbed attention over a paged cache (pool [n, P, C+R] and block table, `capacity` positions per row)
    through the MLA decode kernel. Returns [B,T,H,C] (latent space).

    The kernel's causal rule is by query index: with `lengths` tokens cached, query i of T sees positions
    < lengths - T + i + 1. Taking lengths = 1 + the row's last valid position makes that "position <= p" for a
    chunk of consecutive positions (every caller: decode, 2-token verification, chunks) whose invalid (parked)
    queries, if any, come first (the MTP step's pending row). Callers discard parked queries' outputs; zeroing
    them keeps whatever a backend computes there (their key range can be empty) out of later layers' activations.
    The softmax scale is cfg.softmax_scale, YaRN mscale included, exactly as on the contiguous path.
    """
    # lazy: the model imports (and trains) without the kernel package
    from pallas_kernels.mla_decode import V_DIM, mla_decode, mla_decode_reference

    t = q_lat.shape[1]
    valid = (positions >= 0) & (positions < capacity)
    lengths = jnp.max(jnp.where(valid, positions + 1, 0), axis=1)
    lengths = jnp.where(valid.any(1), lengths, t).astype(jnp.int32)  # all parked: any in-range length will do
    q = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1)
    c = q_lat.shape[-1]
    if c == V_DIM:  # the kernels' value width (DeepSeek-V2/V3 kv_lora_rank)
        out, _ = mla_decode(q, pool, table, lengths, softmax_scale=scale, backend=backend, platform=platform)
    elif backend in ("auto", "xla"):  # small test models: the reference with their latent width as values
        out, _ = mla_decode_reference(q, pool, table, lengths, softmax_scale=scale, v_dim=c)
    else:
        raise ValueError(
            f"decode_attention_impl={backend!r}: the kernels need kv_lora_rank "
            f"{V_DIM}, got {c}; use 'auto', 'xla' or 'contiguous'"
        )
    return jnp.where(valid[:, :, None, None], out, 0)


def per_device(fn, q, k, v, segment_ids):
    """fn(q, k, v, segment_ids) on each device's share of the batch and heads when a mesh is bound (a Pallas kernel
    has no partitioning rule of its own); as is otherwise. The sequence must not be split: the kernel sees whole
    sequences."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    rules = nn.get_logical_axis_rules()
    qs, ks = (logical_spec(("batch", "seq", "heads", None), mesh, x.shape, rules) for x in (q, k))
    vs = logical_spec(("batch", "seq", "heads", None), mesh, v.shape, rules)
    if qs[1] is not None or qs != ks or qs[:3] != vs[:3]:
        raise NotImplementedError(f"attention per device needs whole sequences and one layout for q, k, v: {qs}")
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), in_specs=(qs, qs, vs), out_specs=vs, check_vma=False)(
            q, k, v
        )
    return jax.shard_map(fn, in_specs=(qs, qs, vs, P(qs[0], None)), out_specs=vs, check_vma=False)(q, k, v, segment_ids)


@jax.named_scope("attention_core")
def attention(q, k, v, segment_ids, scale: float, impl: str):
    """Dispatch on the resolved ModelConfig.attention_impl (see the module docstring)."""
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, scale)
    if impl == "splash":
        from dsjax.layers.splash import splash_attention  # TPU only; imports Pallas TPU

        fn = functools.partial(splash_attention, scale=scale, pad_seq=True)  # prefill buckets: any T
        return per_device(fn, q, k, v, segment_ids)
    if impl == "xla":
        return xla_attention(q, k, v, causal_mask(segment_ids, q.shape[1]), scale)
    raise ValueError(f"attention_impl {impl!r} is not resolved to xla, cudnn or splash (dsjax.runtime.resolve)")
