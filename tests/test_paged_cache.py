"""Paged latent cache: writes go through the block table, decode over it = forward, any page assignment gives
the same results, 2-token steps and rollback, the engine's paged decode = a full forward, MTP speculation still
equals greedy. Engine prompts are 1, 60 and 70 tokens: page boundaries (64) fall inside a prompt and during
decoding. (tests/test_generate.py runs the engine's paged default throughout and checks the contiguous path
against it.) Compiles dominate the run time, so model-level tests share one geometry and jitted functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.cache import PagedKVCache, contiguous_block_table, init_paged_cache
from dsjax.generate import SamplingConfig, generate
from tests.conftest import tokens
from tests.test_generate import predictable

PROMPTS = [[7], list(range(3, 63)), [(5 * i) % 120 + 1 for i in range(70)]]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=8)
MAX_LEN = 128 + 8  # prompt bucket + new tokens: 3 pages per row
B, T, PROMPT, CAP, PAGE = 3, 20, 7, 32, 8  # model-level tests: 8-token pages, 4 per row
REF_LEN = 80  # every full forward is [3, 80] (one compile); causal, so its first T positions serve T-token checks


@functools.cache
def jitted(cfg):
    model = dsjax.DeepSeekV3(cfg)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    prefill = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, absorbed=False))
    step = jax.jit(lambda p, x, pos, c: model.apply({"params": p}, x, pos, cache=c))
    return forward, prefill, step


def shuffled_table(batch, max_len, seed=0, page_size=64):
    n = -(-max_len // page_size)
    return np.random.RandomState(seed).permutation(batch * n).reshape(batch, n).astype(np.int32)


def gathered(cache: PagedKVCache, segment: str) -> np.ndarray:
    """[L, B, capacity, W]: each sequence's rows in position order, read back through the block table."""
    pages = np.asarray(getattr(cache, segment))
    table = np.asarray(cache.block_table)
    return pages[:, table].reshape(pages.shape[0], table.shape[0], -1, pages.shape[-1])


def test_paged_decode_equals_forward_any_block_table(tiny_cfg, tiny_params):
    """Prefill 7 tokens, then decode 1 token at a time to 20 over 8-token pages; a shuffled page assignment
    gives bit-identical logits and, read back through its table, bit-identical cache rows."""
    cfg, (b, t, prompt, max_len, page) = tiny_cfg, (B, T, PROMPT, CAP, PAGE)
    forward, prefill, step = jitted(cfg)
    tok = tokens(b, REF_LEN, cfg.vocab_size, seed=5)
    full = np.asarray(forward(tiny_params, tok))[:, :t]

    def run(cache):
        logits, cache, _ = prefill(tiny_params, tok[:, :prompt], cache)
        out = [np.asarray(logits)]
        for i in range(prompt, t):
            logits, cache, _ = step(tiny_params, tok[:, i : i + 1], jnp.full((b, 1), i, jnp.int32), cache)
            out.append(np.asarray(logits))
        return np.concatenate(out, 1), cache

    ordered, c1 = run(init_paged_cache(cfg, b, max_len, jnp.float32, page_size=page))
    shuffled, c2 = run(
        init_paged_cache(
            cfg, b, max_len, jnp.float32, page_size=page, block_table=shuffled_table(b, max_len, page_size=page)
        )
    )
    print("paged decode vs forward max |dlogit|:", np.abs(ordered - full).max())
    np.testing.assert_allclose(ordered, full, atol=1e-4)
    np.testing.assert_array_equal(shuffled, ordered)
    assert np.asarray(c2.lengths).tolist() == [t] * b
    for seg in ("dense", "moe"):  # both tables put the same rows at the same positions, nothing past the last
        np.testing.assert_array_equal(gathered(c2, seg), gathered(c1, seg))
        assert float(np.abs(gathered(c2, seg)[:, :, t:]).max()) == 0.0


def test_paged_two_token_steps_and_truncate(tiny_cfg, tiny_params):
    """Two-token absorbed steps (speculative verification) at ragged positions; parked rows write nothing; a
    rejected row is dropped from the length, then overwritten before anything attends to it."""
    cfg, p = tiny_cfg, PROMPT
    forward, prefill, run = jitted(cfg)
    tok = tokens(B, REF_LEN, cfg.vocab_size, seed=6)
    full = np.asarray(forward(tiny_params, tok))
    cache = init_paged_cache(cfg, B, CAP, jnp.float32, page_size=PAGE, block_table=shuffled_table(B, CAP, 1, PAGE))
    cache = prefill(tiny_params, tok[:, :p], cache)[1]
    # row 0 verifies [p, p+1] with a wrong token at p+1 (crossing into its second page); row 1 is parked at the
    # capacity: no write, length kept
    wrong = (tok[0, p + 1] + 1) % cfg.vocab_size
    logits, cache, _ = run(
        tiny_params,
        jnp.stack([jnp.stack([tok[0, p], wrong]), tok[1, p : p + 2], tok[2, p : p + 2]]),
        jnp.array([[p, p + 1], [CAP, CAP], [p, p + 1]], jnp.int32),
        cache,
    )
    np.testing.assert_allclose(np.asarray(logits[0, 0]), full[0, p], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[2]), full[2, p : p + 2], atol=1e-4)
    assert np.asarray(cache.lengths).tolist() == [p + 2, p, p + 2]
    assert float(np.abs(gathered(cache, "moe")[:, 1, p:]).max()) == 0.0
    cache = cache.truncate(jnp.array([p + 1, CAP, CAP], jnp.int32))  # row 0's draft at p+1 was rejected
    assert np.asarray(cache.lengths).tolist() == [p + 1, p, p + 2]
    logits, cache, _ = run(
        tiny_params,
        jnp.stack([tok[0, p + 1 : p + 3], tok[1, p : p + 2], tok[2, p + 2 : p + 4]]),
        jnp.array([[p + 1, p + 2], [p, p + 1], [p + 2, p + 3]], jnp.int32),
        cache,
    )
    np.testing.assert_allclose(np.asarray(logits[0]), full[0, p + 1 : p + 3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[1]), full[1, p : p + 2], atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits[2]), full[2, p + 2 : p + 4], atol=1e-4)
    assert np.asarray(cache.lengths).tolist() == [p + 3, p + 2, p + 4]


def full_logits(cfg, params, result):
    seqs = np.zeros((len(PROMPTS), REF_LEN), np.int32)
    for i, (p, c) in enumerate(zip(PROMPTS, result.completions())):
        seqs[i, : len(p) + len(c)] = p + c
    return np.asarray(jitted(cfg)[0](params, jnp.asarray(seqs)))


@pytest.fixture(scope="module")
def paged_run(tiny_cfg, tiny_params):
    return generate(tiny_cfg, tiny_params, PROMPTS, GREEDY, cache_dtype=jnp.float32)


def test_engine_paged_greedy_equals_forward(tiny_cfg, tiny_params, paged_run):
    r = paged_run
    assert tiny_cfg.decode_attention_impl == "auto"  # the paged cache is the engine's default
    assert r.stats["max_len"] == MAX_LEN and r.stats["cache_bytes"] == 3 * 3 * 64 * r.stats["cache_bytes_per_token"]
    logits = full_logits(tiny_cfg, tiny_params, r)
    toks = np.asarray(r.tokens)
    for i, p in enumerate(PROMPTS):
        step_logits = logits[i, len(p) - 1 : len(p) + 7]
        np.testing.assert_array_equal(step_logits.argmax(-1), toks[i])
        lp = jax.nn.log_softmax(jnp.asarray(step_logits), -1)
        np.testing.assert_allclose(
            np.asarray(r.logprobs)[i], np.take_along_axis(np.asarray(lp), toks[i][:, None], -1)[:, 0], atol=1e-4
        )


def test_engine_shuffled_block_table(tiny_cfg, tiny_params, paged_run):
    table = shuffled_table(3, MAX_LEN, seed=2)
    assert not np.array_equal(table, contiguous_block_table(3, MAX_LEN))
    r = generate(tiny_cfg, tiny_params, PROMPTS, GREEDY, cache_dtype=jnp.float32, block_table=table)
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(paged_run.tokens))
    np.testing.assert_array_equal(np.asarray(r.logprobs), np.asarray(paged_run.logprobs))
    with pytest.raises(ValueError, match="permutation"):
        generate(tiny_cfg, tiny_params, PROMPTS, GREEDY, block_table=np.zeros_like(table))


def test_engine_paged_speculative_equals_greedy(tiny_cfg, tiny_params):
    """MTP drafts verified 2 tokens per step over a shuffled paged cache (both accept and reject paths)."""
    params = predictable(tiny_params)
    plain = generate(tiny_cfg, params, PROMPTS, GREEDY, cache_dtype=jnp.float32)  # paged_run's program
    spec = generate(
        tiny_cfg,
        params,
        PROMPTS,
        GREEDY,
        cache_dtype=jnp.float32,
        speculative=True,
        block_table=shuffled_table(3, MAX_LEN, seed=3),
    )
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(np.asarray(spec.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    print(f"paged speculative acceptance {spec.stats['acceptance_rate']:.3f}")
    assert 0.1 < spec.stats["acceptance_rate"] < 0.95
