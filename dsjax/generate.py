"""Generation: batched prefill, a compiled decode loop over the latent KV cache, MTP self-speculative decoding.

    result = generate(cfg_or_model, params, [[1, 2, 3], [4, 5]], SamplingConfig(temperature=0.7), key)
    result.tokens [B, N] int32 (pad after each end), result.logprobs [B, N] float32, result.mask [B, N] bool

This module is the caller's side: prompts are checked and right-padded to a length bucket (`bucket_length`) so
only a few prompt shapes ever compile, the cache's page assignment is chosen, and the run's results and stats
are gathered. The jitted prefill and decode loop (plain and speculative steps) are the `Engine` of
dsjax/engine.py, whose docstring describes them; `Engine` and `engine` are re-exported here.

Cache layout (`cfg.decode_attention_impl`): by default a `PagedKVCache` of 64-token pages, sequence b owning
pages b*n .. b*n+n-1 (n = ceil(max_len / 64); `block_table=` takes any other assignment), read by the MLA decode
kernel; "contiguous" keeps the [L, B, max_len, W] cache and the einsum path (the benchmark's "before").

A sequence ends after emitting a stop token (kept in its completion: GRPO must learn the stop token's
probability), after max_new_tokens, or when the cache is full (prompt + completion = max_len + 1; the last
token is never fed back). Rows end independently; ended rows emit `pad_token` with logprob 0.

Speculative decoding (`speculative=True`) drafts with the MTP module (depth 1) and verifies with the main model;
the output distribution is the target model's exactly (greedy: the same tokens as plain greedy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.cache import PAGE_SIZE, bytes_per_token, contiguous_block_table, pages_per_sequence
from dsjax.config import ModelConfig
from dsjax.engine import DecodeState, Engine, engine
from dsjax.errors import ConfigError
from dsjax.model import DeepSeekV3
from dsjax.sampling import SamplingConfig

__all__ = ["SamplingConfig", "GenerationResult", "generate", "bucket_length", "Engine", "engine"]


def bucket_length(n: int, minimum: int = 16) -> int:
    """Padded prompt length: the next power of two (at least `minimum`), then multiples of 1024 past 1024."""
    if n > 1024:
        return -(-n // 1024) * 1024
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens: jax.Array  # [B, N] int32 completions; pad_token after each row's end
    logprobs: jax.Array  # [B, N] float32 log-prob of each token under the distribution it was drawn from
    lengths: jax.Array  # [B] int32 completion lengths (stop token included)
    finished: jax.Array  # [B] bool: ended by a stop token (else by max_new_tokens or the cache size)
    prompt_lengths: np.ndarray  # [B] int32
    stats: dict[str, Any]  # timings, tokens/s, cache bytes, speculative acceptance

    @property
    def mask(self) -> jax.Array:
        """[B, N] bool completion mask: True for emitted tokens."""
        return jnp.arange(self.tokens.shape[1])[None] < self.lengths[:, None]

    def completions(self) -> list[list[int]]:
        toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
        return [toks[i, :n].tolist() for i, n in enumerate(lens)]


def _stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 4, so stop sets of similar size share a compiled program."""
    n = max(4, -(-len(stop_tokens) // 4) * 4)
    return np.asarray(list(stop_tokens) + [-1] * (n - len(stop_tokens)), np.int32)


def _pack_prompts(prompts, prompt_lengths, num_samples: int, vocab: int):
    """-> (tokens [B, T] right-padded numpy int32, lengths [B]); each prompt repeated num_samples times.

    Padding is token 0, not pad_token: the padding's embeddings enter masked attention sums as 0 * value, so
    they must be finite, and an out-of-vocabulary pad id would embed as NaN.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts, np.int32)
        if arr.ndim != 2:
            raise ValueError(f"prompt array must be [batch, length], got shape {arr.shape}")
        lens = (
            np.full(arr.shape[0], arr.shape[1], np.int32)
            if prompt_lengths is None
            else np.asarray(prompt_lengths, np.int32)
        )
        rows = [arr[i, :n] for i, n in enumerate(lens)]
    else:
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths is for a right-padded prompt array; lists carry their own lengths")
        rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    rows = [r for r in rows for _ in range(num_samples)]
    lens = np.asarray([len(r) for r in rows], np.int32)
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"prompt {i // num_samples} is empty; generation needs at least one prompt token")
        if r.min() < 0 or r.max() >= vocab:
            raise ValueError(f"prompt {i // num_samples} has token ids outside [0, vocab_size={vocab})")
    out = np.zeros((len(rows), bucket_length(int(lens.max()))), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lens


def _block_table(cfg: ModelConfig, block_table, batch: int, max_len: int):
    """The page assignment for a paged engine (validated: every page used once), None for a contiguous one."""
    if cfg.decode_attention_impl == "contiguous":
        if block_table is not None:
            raise ValueError("block_table is for a paged cache; decode_attention_impl='contiguous' has none")
        return None
    if block_table is None:
        return contiguous_block_table(batch, max_len)
    table = np.asarray(block_table, np.int32)
    n = pages_per_sequence(max_len)
    if table.shape != (batch, n) or not np.array_equal(np.sort(table.ravel()), np.arange(batch * n)):
        raise ValueError(
            f"block_table must be a [{batch}, {n}] permutation of page ids 0..{batch * n - 1} "
            f"({n} pages of {PAGE_SIZE} per row for max_len={max_len}); got shape {table.shape}"
        )
    return table


def _run_stats(
    cfg, out: DecodeState, bucket, b, max_len, table, cache_dtype, speculative, t0, t1, t2
) -> dict[str, Any]:
    """The `stats` of a generate() call: timings, tokens/s, cache bytes, speculative acceptance."""
    count = out.count
    new_tokens = int(np.asarray(count).sum())
    per_tok = bytes_per_token(cfg, cache_dtype)
    slots = max_len if table is None else table.shape[1] * PAGE_SIZE  # allocated positions per row
    stats: dict[str, Any] = {
        "batch": b,
        "prompt_bucket": bucket,
        "max_len": max_len,
        "new_tokens": new_tokens,
        "decode_steps": int(out.step),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "tokens_per_s": new_tokens / (t2 - t0),
        # the first token of each row comes from the prefill
        "decode_tokens_per_s": (new_tokens - b) / max(t2 - t1, 1e-9),
        "cache_bytes_per_token": per_tok,
        "decode_attention": cfg.decode_attention_impl,
        "cache_bytes": b
        * slots
        * (per_tok + (jnp.dtype(cache_dtype).itemsize * cfg.cache_width if speculative else 0)),
    }
    if speculative:
        drafted, accepted = int(np.asarray(out.drafted).sum()), int(np.asarray(out.accepted).sum())
        stats.update(
            drafts=drafted,
            accepted_drafts=accepted,
            acceptance_rate=accepted / max(drafted, 1),
            tokens_per_step=(drafted + accepted) / max(drafted, 1),
        )
    return stats


def generate(
    model_or_cfg: DeepSeekV3 | ModelConfig,
    params,
    prompts,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    *,
    prompt_lengths=None,
    num_samples: int = 1,
    max_len: int | None = None,
    speculative: bool = False,
    cache_dtype=jnp.bfloat16,
    sync_every: int = 8,
    block_table=None,
) -> GenerationResult:
    """Sample completions for a batch of prompts.

    prompts         list of token-id lists (ragged), or an int array [B, T] (right-padded when `prompt_lengths`
                    [B] is given, else every row is T tokens).
    sampling        `SamplingConfig`; temperature and top_p are traced (changing them does not recompile).
    key             PRNG key (default key(0)); the same key reproduces the same samples.
    num_samples     completions per prompt (GRPO's group size G); rows come out prompt-major, G per prompt.
    max_len         cache slots per row (default: prompt bucket + max_new_tokens); a prompt longer than it is an
                    error, a completion that reaches it ends early (finished=False).
    speculative     MTP self-speculative decoding (needs num_nextn_predict_layers >= 1); same distribution.
    cache_dtype     latent cache dtype (bf16 default; float32 for exact comparisons).
    sync_every      decode steps per all-finished check (the loop's only device-to-host sync).
    block_table     paged cache only: [B, ceil(max_len / 64)] page ids, a permutation of 0 .. B*n-1 (row b's
                    positions [64i, 64i + 64) live in page block_table[b, i]); default: row b owns b*n .. b*n+n-1.
    The decode attention and cache layout come from `cfg.decode_attention_impl` (see the module docstring).
    Pass params already in the compute dtype (cfg.dtype) for speed: they are cast inside every step otherwise.
    Timings in `stats` include compilation on the first call for a shape.
    """
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, DeepSeekV3) else model_or_cfg
    if speculative and cfg.num_nextn_predict_layers < 1:
        raise ValueError("speculative=True drafts with the MTP module, but num_nextn_predict_layers is 0")
    key = jax.random.key(0) if key is None else key
    tokens, lens = _pack_prompts(prompts, prompt_lengths, num_samples, cfg.vocab_size)
    n = sampling.max_new_tokens
    max_len = tokens.shape[1] + n if max_len is None else int(max_len)
    if lens.max() > max_len:
        i = int(lens.argmax())
        raise ValueError(
            f"prompt {i // num_samples} has {int(lens[i])} tokens, longer than the cache "
            f"(max_len={max_len} slots per sequence)"
        )
    if int(lens.max()) + n > cfg.max_position_embeddings:
        raise ConfigError(
            f"a prompt of {int(lens.max())} tokens + max_new_tokens={n} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}; ask for fewer new tokens or shorten the prompt"
        )
    eng = engine(cfg, sampling.program, n, max_len, jnp.dtype(cache_dtype).name, bool(speculative), int(sync_every))
    table = _block_table(cfg, block_table, len(lens), max_len)
    n_max = np.minimum(n, max_len - lens + 1).astype(np.int32)
    dyn = {
        **sampling.traced(),
        "stop": jnp.asarray(_stop_array(sampling.stop_tokens)),
        "pad": jnp.int32(sampling.pad_token),
    }

    t0 = time.perf_counter()
    state = jax.block_until_ready(
        eng.prefill(params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(n_max), key, dyn, table)
    )
    t1 = time.perf_counter()
    out = jax.block_until_ready(eng.decode(params, state, dyn))
    t2 = time.perf_counter()
    del state
    count = out.count

    stats = _run_stats(cfg, out, tokens.shape[1], len(lens), max_len, table, cache_dtype, speculative, t0, t1, t2)
    return GenerationResult(out.out, out.out_lp, count, out.stopped, lens, stats)
