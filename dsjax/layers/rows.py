"""Row gathers that move 32-bit words on GPUs: XLA's GPU gather writes one element per thread, so rows of 1- or
2-byte elements (the experts' e4m3 and bf16 rows) gather at a fraction of the memory bandwidth. Used where a
gather's result is written whole (an operand of a Pallas GEMM); where XLA fuses the gather into arithmetic (a
scaled or summed gather) the plain gather is faster (experiments/bench_row_gather.py, BENCHMARKS.md 2026-12-06
sixteenth session). Not on TPUs: there the bitcast to words is a relayout (TPU arrays tile their two minor
dimensions), and XLA's TPU compile of the word gather of small's rows moves 2.5x the bytes of the plain one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def gather_rows(q: jax.Array, index: jax.Array, words: bool = True) -> jax.Array:
    """Rows q[index] of a matrix of 1- or 2-byte elements (e4m3, bf16), zero rows where index is out of range,
    moved as 32-bit words. On the H100, 229,376 rows of 1024 (a `small` MoE layer's): e4m3 0.307 ms as bytes
    (~1.5 TB/s), 0.152 as words; bf16 0.381 as elements, 0.310 as words. Other dtypes, or rows that are not a whole
    number of words, take the plain gather, as does words=False (for TPUs: the module's docstring)."""
    n, k = q.shape
    per_word = 4 // q.dtype.itemsize if q.dtype.itemsize in (1, 2) else 0
    if not words or not per_word or k % per_word:
        return q.at[index].get(mode="fill", fill_value=0)
    packed = lax.bitcast_convert_type(q.reshape(n, k // per_word, per_word), jnp.uint32)
    rows = packed.at[index].get(mode="fill", fill_value=0)
    return lax.bitcast_convert_type(rows, q.dtype).reshape(index.shape[0], k)
