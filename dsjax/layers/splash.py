"""MLA's full attention on TPU through JAX's Pallas splash attention (`attention_impl="splash"`).

    out = splash_attention(q, k, v, segment_ids, scale)   # q, k [B, T, H, Dqk]; v [B, T, H, Dv] -> [B, T, H, Dv]

The semantics of dsjax.layers.attention.xla_attention with causal_mask(segment_ids): query i sees key j iff
j <= i and both lie in one document. What the installed splash kernel needs (read from its source):
- Head dims: any q/k head dim, and a value head dim of its own (DeepSeek's 192 / 128 run as they are; Mosaic pads
  to the 128-lane tile itself). `head_dim_multiple=128` zero-pads both (exact) for an older jax or tiny dims.
- Sequence: every block size is a multiple of 128 dividing T (the largest of 512 / 256 / 128 by default). Other T
  raise, unless `pad_seq=True` pads T at the end, which is exact for causal attention (no real query sees a padded
  key; each padded query sees itself; padded rows are sliced off).
- Scale: splash applies none, so q is pre-scaled (one extra rounding of q in bf16, as MaxText does).
- Batch: the kernel takes one sequence's [H, T, D] and SegmentIds; batches go through jax.vmap.
- Gradients: splash's custom VJP (its dq and dkv kernels); no second-order derivatives.
- Sharding: pallas_call has no partitioning rule, so a sharded jit must call it inside shard_map over batch/heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128  # splash's NUM_LANES: every block size must be a multiple of this
MAX_BLOCK = 512  # largest block size picked automatically
_AUTO_BLOCKS = (512, 256, 128)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pick_block(t: int, block, shape_desc: str) -> int:
    """A block size (multiple of 128, <= 512 when automatic) dividing t, or ValueError naming the shape."""
    if block is None:
        for b in _AUTO_BLOCKS:
            if b <= MAX_BLOCK and t % b == 0:
                return b
        raise ValueError(
            f"splash_attention: sequence length T={t} (q {shape_desc}) is not a multiple of {LANES}; splash needs "
            f"block sizes that are multiples of {LANES} dividing T. Pad T to a multiple of {LANES} "
            f"(or pass pad_seq=True)."
        )
    block = int(block)
    if block % LANES or t % block:
        raise ValueError(
            f"splash_attention: block={block} must be a multiple of {LANES} dividing T={t} (q {shape_desc})."
        )
    return block


def _kernel(t: int, heads: int, block_sizes: splash.BlockSizes, interpret: bool):
    """The per-sequence splash MHA kernel, the causal mask on every head (splash deduplicates identical head masks
    and lru-caches its numpy mask processing). Built inside the caller's trace and not cached: its mask-info arrays
    are then that trace's constants, which no other trace (jit, remat, grad) can see, and nothing is evaluated
    eagerly (compile_time_eval would run on the mesh's devices, which an AOT compile for a TPU slice does not have)."""
    causal = splash.CausalMask(shape=(t, t))
    mask = splash.MultiHeadMask(masks=(causal,) * heads)
    return splash.make_splash_mha_single_device(mask=mask, block_sizes=block_sizes, interpret=interpret)


def _block_sizes(t: int, block, shape_desc: str) -> splash.BlockSizes:
    if isinstance(block, splash.BlockSizes):
        if not block.has_backward_blocks:
            raise ValueError("splash_attention: BlockSizes needs the backward (dq / dkv) block sizes too.")
        return block
    b = _pick_block(t, block, shape_desc)
    return splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
        use_fused_bwd_kernel=False,
    )


def _pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def splash_attention(
    q, k, v, segment_ids, scale, *, interpret=False, block=None, head_dim_multiple=None, pad_seq=False
):
    """Causal (and per-document) attention through splash attention; see the module docstring.

    q, k [B, T, H, Dqk]; v [B, T, H, Dv]; segment_ids [B, T] int or None; scale: softmax scale (applied to q).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    block: None (largest of 512/256/128 dividing T), an int used for every block size (a multiple of 128
      dividing T), or a full splash BlockSizes (forward and backward blocks), used as is.
    head_dim_multiple: None (no padding; the kernel takes any head dims), or e.g. 128: zero-pad the q/k and v head
      dims up to a multiple of it.
    pad_seq: pad T up to a multiple of 128 instead of raising for such T (exact, see the module docstring).
    Returns [B, T, H, Dv] in v's dtype.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"splash_attention: expected q, k [B, T, H, Dqk] and v [B, T, H, Dv]; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    b, t, h, dqk = q.shape
    dv = v.shape[-1]
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"splash_attention: segment_ids {segment_ids.shape} should be [B, T] = {(b, t)}")
    out_dtype = v.dtype
    dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), v.dtype)
    q = (q.astype(jnp.float32) * scale).astype(dtype)  # splash applies no softmax scale of its own
    k, v = k.astype(dtype), v.astype(dtype)

    tp = t
    if t % LANES and pad_seq:
        tp = _round_up(t, LANES)
        q, k, v = (_pad_axis(x, 1, tp) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = _pad_axis(segment_ids, 1, tp)  # any id: padded keys lie after every real query
    block_sizes = _block_sizes(tp, block, f"[B, T, H, Dqk] = {(b, t, h, dqk)}")

    if head_dim_multiple:
        q, k = (_pad_axis(x, 3, _round_up(dqk, head_dim_multiple)) for x in (q, k))  # zero q.k terms
        v = _pad_axis(v, 3, _round_up(dv, head_dim_multiple))  # zero output columns

    kernel = _kernel(tp, h, block_sizes, bool(interpret))
    # [B, T, H, D] -> [B, H, T, D]; the kernel works on one sequence's [H, T, D], vmapped over B.
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        ids = segment_ids.astype(jnp.int32)
        out = jax.vmap(kernel)(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
    out = out.transpose(0, 2, 1, 3)[:, :t, :, :dv]
    return out.astype(out_dtype)
