"""The compiled side of generation: one jitted prefill and one jitted decode loop per configuration.

`generate()` (dsjax/generate.py) packs the prompts, picks the page assignment and reads the results; the `Engine`
built here by `engine()` runs the model over them: prefill returns a `DecodeState`, which decode takes and returns.

Prefill runs the full MLA path over the right-padded prompt chunk and writes the latent cache; padding tokens
are parked at position `capacity` (the cache's positions per row), where cache writes are dropped, and causal
masking keeps real tokens from seeing them. Each row's first token comes from its own last prompt position.
Decoding then runs in one jitted `lax.while_loop` (the cache is donated): every step feeds each row's newest
token at that row's own position through the absorbed MLA path, samples inside the loop with `jax.random`, and
writes into a [B, max_new_tokens] buffer. The loop body is a fixed-count inner loop of `sync_every` steps, so
the all-finished early exit (the only device-to-host sync) happens once per `sync_every` tokens rather than
per token. Ended rows emit `pad_token` with logprob 0 and are parked.

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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dsjax.cache import PAGE_SIZE, KVCache, PagedKVCache, init_cache, init_paged_cache, pages_per_sequence
from dsjax.config import ModelConfig
from dsjax.layers.mtp import shift_tokens
from dsjax.model import DeepSeekV3
from dsjax.sampling import SamplerProgram, pick, sample, sampling_logprobs, speculative_accept

__all__ = ["DecodeState", "Engine", "engine"]


class DecodeState(NamedTuple):
    """What prefill hands to decode and decode returns: the cache, the output buffers and per-row progress."""

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

    def _prefill(self, params, tokens, lens, n_max, key, dyn, block_table) -> DecodeState:
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
        state = DecodeState(
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

    def _prefill_mtp(self, params, state: DecodeState, tokens, idx, hidden, h_last) -> DecodeState:
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

    def _plain_step(self, params, s: DecodeState, dyn) -> DecodeState:
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

    def _spec_step(self, params, s: DecodeState, dyn) -> DecodeState:
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

    def _decode(self, params, state: DecodeState, dyn) -> DecodeState:
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
