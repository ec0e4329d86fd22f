"""Generation: batched prefill, a compiled decode loop over the latent KV cache, MTP self-speculative decoding.

    result = generate(cfg_or_model, params, [[1, 2, 3], [4, 5]], SamplingConfig(temperature=0.7), key)
    result.tokens [B, N] int32 (pad after each end), result.logprobs [B, N] float32, result.mask [B, N] bool

Flow. Prompts are right-padded to a length bucket (`bucket_length`) so only a few prompt shapes ever compile.
Prefill runs the full MLA path over the padded chunk and writes the latent cache; padding tokens are parked at
position `capacity` (the cache's positions per row), where cache writes are dropped, and causal masking keeps
real tokens from seeing them. Each row's first token comes from its own last prompt position. Decoding then
runs in one jitted `lax.while_loop` (the cache is donated): every step feeds each row's newest token at that
row's own position through the absorbed MLA path, samples inside the loop with `jax.random`, and writes into a
[B, max_new_tokens] buffer. The loop body is a fixed-count inner loop of `sync_every` steps, so the all-finished
early exit (the only device-to-host sync) happens once per `sync_every` tokens rather than per token.

Cache layout (`cfg.decode_attention_impl`): by default a `PagedKVCache` of 64-token pages, sequence b owning
pages b*n .. b*n+n-1 (n = ceil(max_len / 64); `block_table=` takes any other assignment), read by the MLA decode
kernel; "contiguous" keeps the [L, B, max_len, W] cache and the einsum path (the benchmark's "before").

A sequence ends after emitting a stop token (kept in its completion: GRPO must learn the stop token's
probability), after max_new_tokens, or when the cache is full (prompt + completion = max_len + 1; the last
token is never fed back). Rows end independently; ended rows emit `pad_token` with logprob 0 and are parked.

Speculative decoding (`speculative=True`, MTP depth 1). Per step and row, with x_p the newest token (not yet
in the main cache):
  draft   MTP(h_{p-1}, x_p) proposes d for position p+1 (q = the draft's processed distribution);
  verify  the main model runs [x_p, d] at positions [p, p+1] in one absorbed 2-token step;
  accept  greedy: d == argmax; sampling: min(1, p(d)/q(d)), else a token from the residual max(p - q, 0)
          (see sampling.speculative_accept); an accepted draft also yields a bonus token from position p+1.
The output distribution is the target model's exactly (greedy: the same tokens as plain greedy). A rejected
draft's latent row at p+1 leaves the sequence (a paged cache's length drops back to p+1) and is overwritten by
the next step before anything attends to it.
MTP cache: row t pairs the main hidden state at t with token t+1 and lives in MTP cache slot t (rope is
relative, so using t rather than t+1 as its position changes no score, and no empty slot is ever visible).
Each step writes two MTP rows: slot p-2 (only after a step that committed two tokens, whose middle row was
never written) and slot p-1, which makes the draft.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.cache import (
    PAGE_SIZE,
    KVCache,
    PagedKVCache,
    bytes_per_token,
    contiguous_block_table,
    init_cache,
    init_paged_cache,
    pages_per_sequence,
)
from dsjax.config import ModelConfig
from dsjax.errors import ConfigError
from dsjax.layers.mtp import shift_tokens
from dsjax.model import DeepSeekV3
from dsjax.sampling import SamplerProgram, SamplingConfig, pick, sample, sampling_logprobs, speculative_accept

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


class _State(NamedTuple):
    cache: KVCache | PagedKVCache
    out: jax.Array  # [B, N] int32
    out_lp: jax.Array  # [B, N] float32
    count: jax.Array  # [B] tokens emitted so far
    n_max: jax.Array  # [B] tokens this row may emit (max_new_tokens, or fewer when the cache is short)
    lens: jax.Array  # [B] prompt lengths
    stopped: jax.Array  # [B] emitted a stop token
    done: jax.Array  # [B] stopped or out of room
    last: jax.Array  # [B] newest token; it sits at position lens + count - 1 and is not in the cache yet
    step: jax.Array  # scalar: loop steps run
    key: jax.Array
    spec_h: Any = None  # [B, 2, D] main hidden states for the two pending MTP rows (speculative only)
    spec_tok: Any = None  # [B, 2] the tokens that follow them (spec_tok[:, 1] == last)
    spec_both: Any = None  # [B] bool: MTP row 0 is pending too (the previous step committed two tokens)
    drafted: Any = None  # [B] int32 drafts verified
    accepted: Any = None  # [B] int32 drafts accepted


def _stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 4, so stop sets of similar size share a compiled program."""
    n = max(4, -(-len(stop_tokens) // 4) * 4)
    return np.asarray(list(stop_tokens) + [-1] * (n - len(stop_tokens)), np.int32)


def _emit(buf, values, index, mask):
    """buf[b, index[b]] = values[b] where mask[b]; other rows untouched (their writes go out of range)."""
    rows = jnp.arange(buf.shape[0])
    return buf.at[rows, jnp.where(mask, index, buf.shape[1])].set(values.astype(buf.dtype), mode="drop")


def _is_stop(tok, dyn):
    """[B] bool: tok[b] is one of the stop ids (dyn["stop"], padded with -1, which no token equals)."""
    return (tok[:, None] == dyn["stop"][None]).any(-1)


class Engine:
    """Jitted prefill and decode for one generation configuration; build it through `engine` (cached).

    prefill(params, tokens [B, T], lens [B], n_max [B], key, dyn, block_table) -> decode state: a fresh cache
        filled with the right-padded prompts, and each row's first token.
    decode(params, state, dyn) -> final state: the decode loop up to max_new tokens per row. `state` is donated
        (the cache above all is updated in place), so the caller must not use it afterwards.
    `dyn` holds the traced sampling values (temperature, top_p, stop ids, pad id): changing them does not
    recompile. jax.jit caches each function per (batch, prompt bucket) shape.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        prog: SamplerProgram,
        max_new: int,
        max_len: int,
        cache_dtype: str,
        speculative: bool,
        sync_every: int,
    ):
        self.cfg, self.prog, self.max_new, self.max_len = cfg, prog, max_new, max_len
        self.cache_dtype, self.speculative, self.sync_every = jnp.dtype(cache_dtype), speculative, sync_every
        self.model = DeepSeekV3(cfg)
        self.paged = cfg.decode_attention_impl != "contiguous"
        # = cache capacity: writes there are dropped, so padding and ended rows are parked there
        self.park = pages_per_sequence(max_len) * PAGE_SIZE if self.paged else max_len
        self.prefill = jax.jit(self._prefill)
        # The whole state (cache included) goes in and comes out, so each donated buffer is updated in place.
        self.decode = jax.jit(self._decode, donate_argnums=1)

    def _new_cache(self, b, block_table):
        n_mtp = 1 if self.speculative else 0  # one MTP depth drafts; deeper modules are unused
        if self.paged:
            return init_paged_cache(self.cfg, b, self.max_len, self.cache_dtype, n_mtp, block_table=block_table)
        return init_cache(self.cfg, b, self.max_len, self.cache_dtype, mtp_layers=n_mtp)

    def _run(self, params, *args, **kw):
        return self.model.apply({"params": params}, *args, **kw)

    def _head(self, params, h):
        return self._run(params, h, method=DeepSeekV3.head)

    def _mtp(self, params, h, toks, pos, kv, absorbed):
        return self._run(params, h, toks, pos, 0, kv, absorbed, method=DeepSeekV3.mtp_step)

    def _logprobs(self, logits, dyn):
        return sampling_logprobs(logits, self.prog, dyn["temperature"], dyn["top_p"])

    def _prefill(self, params, tokens, lens, n_max, key, dyn, block_table) -> _State:
        b, t = tokens.shape
        idx = jnp.arange(t)[None]
        pos = jnp.where(idx < lens[:, None], idx, self.park)
        cache = self._new_cache(b, block_table)
        # The logits output is discarded (and so never computed): only each row's last position needs the head.
        _, cache, aux = self._run(params, tokens, pos, cache=cache, absorbed=False)
        hidden = aux["hidden"]
        h_last = jnp.take_along_axis(hidden, (lens - 1)[:, None, None], axis=1)[:, 0]
        key, k_first = jax.random.split(key)
        tok, lp = sample(k_first, self._head(params, h_last), self.prog, dyn["temperature"], dyn["top_p"])
        stopped = _is_stop(tok, dyn)
        n = self.max_new
        state = _State(
            cache=cache,
            out=jnp.full((b, n), dyn["pad"], jnp.int32).at[:, 0].set(tok),
            out_lp=jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp),
            count=jnp.ones((b,), jnp.int32),
            n_max=n_max,
            lens=lens,
            stopped=stopped,
            done=stopped | (n_max <= 1),
            last=tok,
            step=jnp.zeros((), jnp.int32),
            key=key,
        )
        if self.speculative:
            state = self._prefill_mtp(params, state, tokens, idx, hidden, h_last)
        return state

    def _prefill_mtp(self, params, state: _State, tokens, idx, hidden, h_last) -> _State:
        """Writes the prompt's MTP rows and sets up the speculative fields of the decode state."""
        b = tokens.shape[0]
        # MTP rows t = 0 .. len-2 (prompt token t+1 known); row len-1 needs the sampled token: first step.
        mpos = jnp.where(idx + 1 < state.lens[:, None], idx, self.park)
        _, _, kv, _ = self._mtp(params, hidden, shift_tokens(tokens, 1), mpos, state.cache.mtp_layer(0), False)
        tok = state.last
        return state._replace(
            cache=state.cache.with_mtp_layers([kv]),
            spec_h=jnp.stack([h_last, h_last], 1),
            spec_tok=jnp.stack([tok, tok], 1),
            spec_both=jnp.zeros((b,), bool),
            drafted=jnp.zeros((b,), jnp.int32),
            accepted=jnp.zeros((b,), jnp.int32),
        )

    def _plain_step(self, params, s: _State, dyn) -> _State:
        """One token per active row: feed s.last at its position, sample the next."""
        act = ~s.done
        pos = jnp.where(act, s.lens + s.count - 1, self.park)
        logits, cache, _ = self._run(params, s.last[:, None], pos[:, None], cache=s.cache)
        tok, lp = pick(jax.random.fold_in(s.key, s.step), self._logprobs(logits[:, 0], dyn), self.prog.greedy)
        count = s.count + act
        stopped = s.stopped | (act & _is_stop(tok, dyn))
        return s._replace(
            cache=cache,
            out=_emit(s.out, tok, s.count, act),
            out_lp=_emit(s.out_lp, lp, s.count, act),
            count=count,
            stopped=stopped,
            done=stopped | (count >= s.n_max),
            last=jnp.where(act, tok, s.last),
            step=s.step + 1,
        )

    def _spec_step(self, params, s: _State, dyn) -> _State:
        """One or two tokens per active row: MTP draft, 2-token verify, accept (see the module docstring)."""
        act = ~s.done
        p = s.lens + s.count - 1  # position of s.last
        park, greedy = self.park, self.prog.greedy
        k_draft, k_accept, k_bonus = jax.random.split(jax.random.fold_in(s.key, s.step), 3)
        mpos = jnp.stack([jnp.where(act & s.spec_both, p - 2, park), jnp.where(act, p - 1, park)], 1)
        _, h_mtp, kv, _ = self._mtp(params, s.spec_h, s.spec_tok, mpos, s.cache.mtp_layer(0), True)
        q_logp = self._logprobs(self._head(params, h_mtp[:, 1]), dyn)
        draft, _ = pick(k_draft, q_logp, greedy)

        vpos = jnp.where(act[:, None], p[:, None] + jnp.arange(2), park)
        logits, cache, aux = self._run(params, jnp.stack([s.last, draft], 1), vpos, cache=s.cache.with_mtp_layers([kv]))
        target = self._logprobs(logits, dyn)  # [B, 2, V]
        if greedy:
            t1 = jnp.argmax(target[:, 0], -1).astype(jnp.int32)
            ok = t1 == draft
        else:
            t1, ok = speculative_accept(k_accept, target[:, 0], q_logp, draft)
        lp1 = jnp.take_along_axis(target[:, 0], t1[:, None], -1)[:, 0]
        t2, lp2 = pick(k_bonus, target[:, 1], greedy)
        stop1 = _is_stop(t1, dyn)
        cache = cache.truncate(jnp.where(act, p + 1 + ok, park))  # a rejected draft's row leaves the sequence
        two = act & ok & ~stop1 & (s.count + 1 < s.n_max)
        out = _emit(_emit(s.out, t1, s.count, act), t2, s.count + 1, two)
        out_lp = _emit(_emit(s.out_lp, lp1, s.count, act), lp2, s.count + 1, two)
        count = s.count + act + two
        stopped = s.stopped | (act & stop1) | (two & _is_stop(t2, dyn))
        h = aux["hidden"]
        # pending MTP rows for the next step: (h_p, t1) and (h_{p+1}, t2) after two tokens, else (h_p, t1) only
        spec_h = jnp.where(two[:, None, None], h, jnp.stack([h[:, 0], h[:, 0]], 1)).astype(s.spec_h.dtype)
        spec_tok = jnp.where(two[:, None], jnp.stack([t1, t2], 1), jnp.stack([t1, t1], 1))
        return s._replace(
            cache=cache,
            out=out,
            out_lp=out_lp,
            count=count,
            stopped=stopped,
            done=stopped | (count >= s.n_max),
            last=jnp.where(two, t2, t1),
            step=s.step + 1,
            spec_h=spec_h,
            spec_tok=spec_tok,
            spec_both=two,
            drafted=s.drafted + act,
            accepted=s.accepted + (act & ok),
        )

    def _decode(self, params, state: _State, dyn) -> _State:
        step_fn = self._spec_step if self.speculative else self._plain_step

        def body(s):
            # sync_every steps between all-finished checks: the check is the loop's only device-to-host sync
            return jax.lax.fori_loop(0, self.sync_every, lambda _, x: step_fn(params, x, dyn), s)

        return jax.lax.while_loop(lambda s: (s.step < self.max_new) & ~jnp.all(s.done), body, state)


@functools.lru_cache(maxsize=32)
def engine(
    cfg: ModelConfig,
    prog: SamplerProgram,
    max_new: int,
    max_len: int,
    cache_dtype: str,
    speculative: bool,
    sync_every: int,
) -> Engine:
    """The `Engine` for one configuration, built once: every later call with equal arguments returns the same
    object, so its jitted prefill/decode (and their compiled programs per shape) are reused across `generate`
    calls. `engine.cache_clear()` drops them (with jax.clear_caches(), to free a model's programs).

    max_new tokens per row at most, max_len cache positions per row, cache_dtype a dtype name ("bfloat16"),
    speculative MTP self-speculative decoding, sync_every decode steps per all-finished check.
    """
    return Engine(cfg, prog, max_new, max_len, cache_dtype, speculative, sync_every)


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


def _run_stats(cfg, out: _State, bucket, b, max_len, table, cache_dtype, speculative, t0, t1, t2) -> dict[str, Any]:
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
