"""Rotary position embedding with YaRN, for DeepSeek's interleaved rope pairs.

DeepSeek rotates (x[2i], x[2i+1]) together at frequency i. `apply_rope` returns the rotated pairs in
half-split order ([all first members | all second members]); because q and k get the same permutation, q.k is
unchanged and we skip an interleaving copy. Everything downstream (attention, the latent cache) only ever
dots roped q against roped k, so the layout never leaks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, YarnScaling, yarn_mscale


def _yarn_correction_range(sc: YarnScaling, dim: int, base: float) -> tuple[float, float]:
    def corr_dim(rotations: float) -> float:
        return dim * math.log(sc.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(sc.beta_fast), corr_dim(sc.beta_slow)
    if sc.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(dim: int, base: float, scaling: YarnScaling | None) -> np.ndarray:
    """Inverse frequencies [dim // 2], float32, computed in float32 like transformers so parity is tight."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    extrap = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if scaling is None:
        return extrap
    interp = (np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)).astype(np.float32)
    low, high = _yarn_correction_range(scaling, dim, base)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrap_weight = np.float32(1.0) - ramp
    return (interp * (1 - extrap_weight) + extrap * extrap_weight).astype(np.float32)


def rope_attention_factor(scaling: YarnScaling | None) -> float:
    """The factor YaRN multiplies cos and sin by (1.0 for DeepSeek, whose mscale equals mscale_all_dim)."""
    if scaling is None:
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [qk_rope_head_dim // 2], float32, attention factor folded in."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    factor = rope_attention_factor(cfg.rope_scaling)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, (heads,) dim] with interleaved pairs; cos/sin [..., T, dim // 2]. Output in half-split order."""
    if x.ndim == cos.ndim + 1:  # a heads axis between T and dim
        cos, sin = cos[..., None, :], sin[..., None, :]
    x1 = x[..., 0::2].astype(jnp.float32)
    x2 = x[..., 1::2].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
