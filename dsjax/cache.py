"""The latent KV cache: per layer and token, normalised c_kv (kv_lora_rank) then roped k_pe (qk_rope_head_dim).

Two layouts, one interface (the model, MLA and the engine call the methods, never branch on the type: a segment's
layers come out as `ContiguousLayers` or `PagedLayers`, which `write` new rows and `attend` over them):
- `KVCache` (contiguous): slot s of a sequence's row holds the token at absolute position s, [L, B, S, W].
- `PagedKVCache` (serving): a pool of pages [L, num_pages, page_size, W] per segment, and a block table
  [B, max_pages] saying which page holds positions [i * page_size, (i + 1) * page_size) of sequence b. The
  absorbed decode path reads it through the MLA decode kernel (pallas_kernels/mla_decode).
Either way, masking is by position: a query at position p sees positions <= p. Layers are stacked the way the
model scans them (dense segment, MoE segment), plus the MTP modules; the model carries a whole segment's stack
through its nn.scan, so a decode loop updates the cache in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.layers.attention import absorbed_attention, cache_mask, paged_absorbed_attention
from sharding.rules import logical_spec

PAGE_SIZE = 64  # tokens per page; the engine's choice (a multiple of the kernel's key tile)


class ContiguousLayers(NamedTuple):
    """One segment's contiguous cache as the scan carries it and MLA receives it: stack [L, B, S, W] (a scanned
    segment; MLA gets its layer index) or [B, S, W] (one MTP depth). Same methods as PagedLayers."""

    stack: jax.Array

    @property
    def capacity(self) -> int:
        return self.stack.shape[-2]

    def write(self, new: jax.Array, positions: jax.Array, layer=None) -> ContiguousLayers:
        """Scatter new latent rows [B, T, W] at their absolute positions [B, T] (slot s = position s), into the
        stack directly so a decode loop stays in place. Positions outside [0, S) are dropped (parked padding)."""
        b = jnp.arange(new.shape[0])[:, None]
        pos = jnp.where(positions < 0, self.capacity, positions)
        idx = (b, pos) if layer is None else (layer, b, pos)
        return ContiguousLayers(self.stack.at[idx].set(new.astype(self.stack.dtype), mode="drop"))

    def attend(self, q_lat, q_pe, positions, layer, cfg: ModelConfig) -> jax.Array:
        """Absorbed attention of q_lat [B, T, H, C] / q_pe [B, T, H, R] over this layer's rows (einsums; a query
        at position p sees slots <= p) -> [B, T, H, C] in the latent space."""
        kv = self.stack if layer is None else self.stack[layer]
        mask = cache_mask(positions, kv.shape[1])
        return absorbed_attention(q_lat, q_pe, kv, mask, cfg.softmax_scale, cfg.kv_lora_rank, cfg.platform)


class KVCache(NamedTuple):
    dense: jax.Array | None  # [num_dense_layers, B, S, kv_lora_rank + qk_rope_head_dim]
    moe: jax.Array | None  # [num_moe_layers, B, S, W]
    mtp: jax.Array | None  # [mtp layers, B, S, W]

    @property
    def max_len(self) -> int:
        return next(a for a in self if a is not None).shape[2]

    @property
    def capacity(self) -> int:
        """Positions per sequence; writes at positions outside [0, capacity) are dropped."""
        return self.max_len

    @property
    def batch(self) -> int:
        return next(a for a in self if a is not None).shape[1]

    # The layout-independent interface used by model.py and generate.py (PagedKVCache has the same methods).
    def layers(self, segment: str) -> ContiguousLayers | None:
        """What one segment's nn.scan carries (and MLA receives)."""
        stack = getattr(self, segment)
        return None if stack is None else ContiguousLayers(stack)

    def with_layers(self, segment: str, carried) -> KVCache:
        return self._replace(**{segment: None if carried is None else carried.stack})

    def mtp_layer(self, depth: int) -> ContiguousLayers:
        return ContiguousLayers(self.mtp[depth])

    def with_mtp_layers(self, carried: Sequence[ContiguousLayers]) -> KVCache:
        return self._replace(mtp=jnp.stack([c.stack for c in carried]))

    def record(self, positions: jax.Array) -> KVCache:
        return self  # no per-sequence lengths: the contiguous layout masks by position alone

    def truncate(self, lengths: jax.Array) -> KVCache:
        return self


class PagedLayers(NamedTuple):
    """One segment's pages and the block table: what the scan carries and MLA receives for a paged cache.

    pages is [L, num_pages, P, W] (a scanned segment; MLA gets its layer index) or [num_pages, P, W] (one MTP
    depth). The table rides in the carry, unchanged, so Block and nn.scan need no paged-specific argument.
    """

    pages: jax.Array
    block_table: jax.Array  # [B, max_pages] int32

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.pages.shape[-2]

    def pool(self, layer=None):
        """(pages [n, P, W], block table into them) for one layer.

        A stacked segment is viewed as one pool of L * num_pages pages (a free reshape) and the table is offset
        to the layer's pages: the kernel then reads only the pages it needs, where slicing the layer out
        (pages[layer]) would copy that layer's whole pool on every step.
        """
        if layer is None:
            return self.pages, self.block_table
        n = self.pages.shape[1]
        return self.pages.reshape((-1,) + self.pages.shape[2:]), self.block_table + layer * n

    def write(self, new: jax.Array, positions: jax.Array, layer=None) -> PagedLayers:
        """Scatter new latent rows [B, T, W] at absolute positions [B, T] through the block table, in place.

        Positions outside [0, capacity) are dropped (the engine parks padding and finished rows there).
        """
        p, n = self.pages.shape[-2], self.pages.shape[-3]
        valid = (positions >= 0) & (positions < self.capacity)
        pos = jnp.where(valid, positions, 0)
        page = jnp.where(valid, jnp.take_along_axis(self.block_table, pos // p, axis=1), n)  # n: out of range
        idx = (page, pos % p) if layer is None else (layer, page, pos % p)
        return self._replace(pages=self.pages.at[idx].set(new.astype(self.pages.dtype), mode="drop"))

    def attend(self, q_lat, q_pe, positions, layer, cfg: ModelConfig) -> jax.Array:
        """Absorbed attention over this layer's pages through the MLA decode kernel (backend
        cfg.decode_attention_impl, built for cfg.platform) -> [B, T, H, C] in the latent space.

        Under a bound mesh the kernel (which has no partitioning rule) runs per device on its share of the batch:
        rows and pages split alike over the batch axes, which holds for the engine's allocator (row b owns pages
        b*n .. b*n+n-1, `contiguous_block_table`), and each device's table is shifted to its own pages."""
        capacity = self.capacity

        def attend_local(q_lat, q_pe, positions, pages, table, layer):
            pool, table = PagedLayers(pages, table).pool(layer)
            return paged_absorbed_attention(
                q_lat, q_pe, pool, table, capacity, positions, cfg.softmax_scale, cfg.decode_attention_impl,
                cfg.platform,
            )  # fmt: skip

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return attend_local(q_lat, q_pe, positions, self.pages, self.block_table, layer)
        batch = logical_spec(("batch",), mesh, q_lat.shape[:1], nn.get_logical_axis_rules())[0]
        axes = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
        stacked = layer is not None

        def local(q_lat, q_pe, positions, pages, table, layer):
            if axes:  # this device's rows own pages [shard * n, (shard + 1) * n) of the global pool
                table = table - jax.lax.axis_index(axes) * pages.shape[-3]
            return attend_local(q_lat, q_pe, positions, pages, table, layer if stacked else None)

        rows, pages = P(batch), (P(None, batch) if stacked else P(batch))
        return jax.shard_map(local, in_specs=(rows, rows, rows, pages, rows, P()), out_specs=rows, check_vma=False)(
            q_lat, q_pe, positions, self.pages, self.block_table, jnp.int32(0) if layer is None else layer
        )


class PagedKVCache(NamedTuple):
    dense: jax.Array | None  # [num_dense_layers, num_pages, page_size, W]
    moe: jax.Array | None  # [num_moe_layers, num_pages, page_size, W]
    mtp: jax.Array | None  # [mtp layers, num_pages, page_size, W]; MTP row t at position t, same table
    block_table: jax.Array  # [B, max_pages] int32: page ids, shared by every layer
    lengths: jax.Array  # [B] int32: tokens in the main model's cache (1 + last position written)

    @property
    def page_size(self) -> int:
        return next(a for a in self[:3] if a is not None).shape[2]

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.page_size

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    def layers(self, segment: str):
        pages = getattr(self, segment)
        return None if pages is None else PagedLayers(pages, self.block_table)

    def with_layers(self, segment: str, carried) -> PagedKVCache:
        return self._replace(**{segment: None if carried is None else carried.pages})

    def mtp_layer(self, depth: int) -> PagedLayers:
        return PagedLayers(self.mtp[depth], self.block_table)

    def with_mtp_layers(self, carried: Sequence[PagedLayers]) -> PagedKVCache:
        return self._replace(mtp=jnp.stack([c.pages for c in carried]))

    def record(self, positions: jax.Array) -> PagedKVCache:
        """Lengths after the main model writes at `positions` [B, T]: 1 + the last valid position of each row
        (writing at p ends the sequence there: re-decoding an earlier position truncates it); rows with no valid
        position keep their length."""
        valid = (positions >= 0) & (positions < self.capacity)
        last = jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32)
        return self._replace(lengths=jnp.where(valid.any(1), last, self.lengths))

    def truncate(self, lengths: jax.Array) -> PagedKVCache:
        """Drop the rows at positions >= lengths (rejected speculative drafts); they are overwritten later."""
        return self._replace(lengths=jnp.minimum(self.lengths, lengths).astype(jnp.int32))


def _rows_sharded(stack: jax.Array) -> jax.Array:
    """A new cache stack [L, rows or pages, ..., W] laid out like the batch under a bound mesh (no-op otherwise):
    MLA's latent has no head axis to split, so each device keeps its own rows' cache. Pages follow rows because
    every table the engine builds gives each row its own run of pages (contiguous_block_table)."""
    return nn.with_logical_constraint(stack, ("layers", "batch", None, None))


def init_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype=jnp.bfloat16,
    with_mtp: bool = False,
    mtp_layers: int | None = None,
) -> KVCache:
    """Contiguous cache; mtp_layers (default: all of cfg's when with_mtp, else none) sets the MTP depth kept."""

    def zeros(layers):
        return _rows_sharded(jnp.zeros((layers, batch, max_len, cfg.cache_width), dtype)) if layers else None

    n_mtp = (cfg.num_nextn_predict_layers if with_mtp else 0) if mtp_layers is None else mtp_layers
    return KVCache(zeros(cfg.num_dense_layers), zeros(cfg.num_moe_layers), zeros(n_mtp))


def pages_per_sequence(max_len: int, page_size: int = PAGE_SIZE) -> int:
    return -(-max_len // page_size)


def contiguous_block_table(batch: int, max_len: int, page_size: int = PAGE_SIZE) -> np.ndarray:
    """The engine's allocator for a fixed batch: sequence b owns pages b * n ... b * n + n - 1."""
    n = pages_per_sequence(max_len, page_size)
    return np.arange(batch * n, dtype=np.int32).reshape(batch, n)


def init_paged_cache(
    cfg: ModelConfig,
    batch: int,
    max_len: int,
    dtype=jnp.bfloat16,
    mtp_layers: int = 0,
    *,
    page_size: int = PAGE_SIZE,
    block_table=None,
    num_pages: int | None = None,
) -> PagedKVCache:
    """An empty paged cache for `batch` sequences of up to `max_len` tokens.

    block_table [batch, ceil(max_len / page_size)] int32 page ids (default `contiguous_block_table`); any table
    works as long as no two sequences share a page. num_pages defaults to batch x pages per sequence.
    """
    n = pages_per_sequence(max_len, page_size)
    table = contiguous_block_table(batch, max_len, page_size) if block_table is None else block_table
    if tuple(table.shape) != (batch, n):
        raise ValueError(f"block_table shape {tuple(table.shape)} != (batch, pages per sequence) = {(batch, n)}")
    num_pages = batch * n if num_pages is None else num_pages

    def zeros(layers):
        return _rows_sharded(jnp.zeros((layers, num_pages, page_size, cfg.cache_width), dtype)) if layers else None

    return PagedKVCache(
        zeros(cfg.num_dense_layers),
        zeros(cfg.num_moe_layers),
        zeros(mtp_layers),
        jnp.asarray(table, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
    )


def bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16) -> int:
    """(kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes: 70,272 B for DeepSeek-V3 in bf16."""
    return cfg.cache_bytes_per_token(jnp.dtype(dtype).itemsize)
