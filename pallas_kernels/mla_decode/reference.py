"""XLA reference for MLA decode over a paged latent cache: the "xla" backend and the kernels' oracle.

Each cache row is [c_kv (512) | k_pe (64)]; keys are whole rows, values the first `v_dim` columns of
the same rows (the absorbed MLA form, so q already has W_uk folded in). Pages are gathered through the
block table into a contiguous [B, max_pages * page_size, 576] view, then two einsums with a float32
softmax. Query i of s_q sees positions < lengths - s_q + i + 1.

A query that sees no position (lengths < s_q - i, e.g. an idle batch row with length 0) gets out = 0
and lse = -inf. Rows past a sequence's length are masked out of both products, so stale or NaN rows in
partially filled pages never reach the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mla_decode.common import V_DIM


def visible_mask(lengths, s_q, seq):
    """[B, s_q, seq] bool: query i of sequence b sees positions < lengths[b] - s_q + i + 1."""
    limit = lengths.astype(jnp.int32)[:, None] - s_q + 1 + jnp.arange(s_q, dtype=jnp.int32)[None]
    return jnp.arange(seq, dtype=jnp.int32)[None, None, :] < limit[:, :, None]


def gather_pages(kv_pages, block_table):
    """[num_pages, P, D] pages, [B, max_pages] table -> contiguous [B, max_pages * P, D]."""
    b, max_pages = block_table.shape
    _, p, d = kv_pages.shape
    table = jnp.clip(block_table, 0, kv_pages.shape[0] - 1)  # unused entries may hold anything
    return kv_pages[table].reshape(b, max_pages * p, d)


def _dot(eq, a, b):
    # XLA:CPU lacks bf16 x bf16 -> f32 dots for these layouts; elsewhere keep 16-bit operands.
    if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32, precision=prec)


def attend_contiguous(q, kv, lengths, *, softmax_scale, v_dim=V_DIM):
    """q [B, s_q, H, D], kv [B, S, D] -> (out [B, s_q, H, v_dim] in q.dtype, lse [B, s_q, H] f32).

    This is also the "XLA einsum path over a contiguous cache" the benchmark compares against.
    """
    s_q = q.shape[1]
    mask = visible_mask(lengths, s_q, kv.shape[1])  # [B, s_q, S]
    kv = jnp.where(jnp.any(mask, axis=1)[..., None], kv, jnp.zeros_like(kv))  # drop stale rows
    s = _dot("bqhd,bsd->bqhs", q, kv.astype(q.dtype)) * softmax_scale
    s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)  # fully masked rows: exp(-inf - 0) = 0, no NaN
    e = jnp.exp(s - m_safe)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(denom > 0, denom, 1.0)
    out = _dot("bqhs,bsc->bqhc", p.astype(q.dtype), kv[..., :v_dim].astype(q.dtype))
    lse = jnp.where(denom[..., 0] > 0, jnp.log(denom[..., 0]) + m_safe[..., 0], -jnp.inf)
    return out.astype(q.dtype), lse.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "v_dim"))
def mla_decode_reference(q, kv_pages, block_table, lengths, *, softmax_scale, v_dim=V_DIM):
    """Paged MLA decode: q [B, s_q, H, D], kv_pages [N, P, D], block_table [B, max_pages] int32,
    lengths [B] int32 -> (out [B, s_q, H, v_dim], lse [B, s_q, H] float32)."""
    kv = gather_pages(kv_pages, block_table)
    return attend_contiguous(q, kv, lengths, softmax_scale=softmax_scale, v_dim=v_dim)
