"""Generation engine: decode = full-forward argmax, speculative = plain, sampling, stop tokens, logprobs, ragged.

Compiles are the cost here, so runs share shapes: every tiny-model run uses batch 3 (or 1), prompt bucket 16
and max_new_tokens 8 or 12, and full-forward references use one [3, 32] shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.generate import SamplingConfig, bucket_length, generate
from dsjax.sampling import SamplerProgram, processed_logits, sample, speculative_accept
from tests.conftest import param_shapes, randomize_params

PROMPTS = [[5, 17, 42, 7, 99], list(range(100, 111)), [300, 2, 64]]
REF_LEN = 32
GREEDY = SamplingConfig(temperature=0, max_new_tokens=8)


def gen(cfg, params, prompts=PROMPTS, sampling=GREEDY, key=None, **kw):
    return generate(cfg, params, prompts, sampling, key, cache_dtype=jnp.float32, **kw)


_forward_cache: dict = {}


def full_forward(cfg, params, prompts, result, length=REF_LEN):
    """One full forward over prompt + completion per row (right-padded): logits and MTP logits, numpy."""
    if cfg not in _forward_cache:
        model = dsjax.DeepSeekV3(cfg)
        _forward_cache[cfg] = jax.jit(lambda p, t: model.apply({"params": p}, t, mtp=True)[::2])  # (logits, aux)
    seqs = np.zeros((len(prompts), length), np.int32)
    for i, (p, c) in enumerate(zip(prompts, result.completions())):
        seqs[i, : len(p) + len(c)] = p + c
    logits, aux = _forward_cache[cfg](params, jnp.asarray(seqs))
    return np.asarray(logits), np.asarray(aux["mtp_logits"][0])


def log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x), axis=-1))


def predictable(params, alpha=0.01):
    """Params whose MTP module nearly agrees with the main model, so greedy drafts are accepted about half the time.

    Residual writes (o_proj, down projections) shrink to alpha, so each next token depends mostly on the
    current token, and eh_proj passes the normalised embedding straight through.
    """

    def f(path, x):
        name = jax.tree_util.keystr(path)
        if "o_proj" in name or "down_proj" in name:
            return x * alpha
        if "eh_proj" in name:
            d = x.shape[1]
            return jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.fixture(scope="module")
def greedy_run(tiny_cfg, tiny_params):
    return gen(tiny_cfg, tiny_params)


def test_greedy_equals_full_forward_argmax(tiny_cfg, tiny_params, greedy_run):
    """Each greedy token is the argmax of a full forward at its step (by causality, one forward of the final
    sequence gives every step's logits); logprobs are the untempered log_softmax there."""
    r = greedy_run
    logits, _ = full_forward(tiny_cfg, tiny_params, PROMPTS, r)
    toks, lps = np.asarray(r.tokens), np.asarray(r.logprobs)
    assert np.asarray(r.lengths).tolist() == [8, 8, 8] and np.asarray(r.mask).all()
    assert not np.asarray(r.finished).any()
    for i, p in enumerate(PROMPTS):
        step_logits = logits[i, len(p) - 1 : len(p) + 7]
        chosen = np.take_along_axis(step_logits, toks[i][:, None], -1)[:, 0]
        np.testing.assert_array_less(step_logits.max(-1) - chosen, 1e-4)  # argmax up to float ties
        assert (step_logits.argmax(-1) == toks[i]).mean() == 1.0
        np.testing.assert_allclose(
            lps[i], np.take_along_axis(log_softmax(step_logits), toks[i][:, None], -1)[:, 0], atol=1e-4
        )
    # cache accounting: (kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes
    assert r.stats["cache_bytes_per_token"] == (32 + 8) * 3 * 4
    assert dsjax.cache.bytes_per_token(dsjax.ModelConfig.preset("deepseek-v3-671b")) == 70272


def test_ragged_prompts_match_running_alone(tiny_cfg, tiny_params, greedy_run):
    # Alone, each prompt runs the old contiguous-cache decode path: it must agree with the paged default too.
    contiguous = tiny_cfg.replace(decode_attention_impl="contiguous")
    for i, p in enumerate(PROMPTS):
        alone = gen(contiguous, tiny_params, [p])
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(greedy_run.tokens)[i])
        np.testing.assert_allclose(np.asarray(alone.logprobs)[0], np.asarray(greedy_run.logprobs)[i], atol=1e-5)
    # a right-padded array with prompt_lengths is the same batch as the ragged list
    arr = np.full((3, 11), 9, np.int32)
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)] = p
    padded = gen(tiny_cfg, tiny_params, arr, prompt_lengths=[len(p) for p in PROMPTS])
    np.testing.assert_array_equal(np.asarray(padded.tokens), np.asarray(greedy_run.tokens))


def _stops_for(tokens):
    """Two stop ids taken from different rows and steps, and the lengths they should cut each row to."""
    stops = (int(tokens[0, 2]), int(tokens[1, 5]))
    hit = np.isin(tokens, stops)
    expected = np.where(hit.any(1), hit.argmax(1) + 1, tokens.shape[1])
    return stops, expected, hit.any(1)


def test_stop_tokens_end_rows_independently(tiny_cfg, tiny_params, greedy_run):
    full = np.asarray(greedy_run.tokens)
    stops, expected, stopped = _stops_for(full)
    assert len(set(expected.tolist())) >= 2, expected  # rows end at different steps
    r = gen(
        tiny_cfg, tiny_params, sampling=SamplingConfig(temperature=0, max_new_tokens=8, stop_tokens=stops, pad_token=-1)
    )
    toks, lps, mask = np.asarray(r.tokens), np.asarray(r.logprobs), np.asarray(r.mask)
    np.testing.assert_array_equal(np.asarray(r.lengths), expected)
    np.testing.assert_array_equal(np.asarray(r.finished), stopped)
    for i, n in enumerate(expected):
        np.testing.assert_array_equal(toks[i, :n], full[i, :n])  # the stop token itself is emitted
        assert (toks[i, n:] == -1).all() and (lps[i, n:] == 0).all()  # then pad, logprob 0
        assert mask[i, :n].all() and not mask[i, n:].any()
    assert r.completions()[0] == full[0, : expected[0]].tolist()


def _simulate_greedy_drafts(prompts, completions, logits_mtp, stops, n_max):
    """(drafts, accepted) that greedy MTP speculation must report, from the training-style MTP forward.

    MTP logits at position t (main hidden at t, token t+1) draft token t+2, so with newest token at p the draft
    comes from position p-1; a consistent MTP cache gives exactly these drafts.
    """
    drafts = accepted = 0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        j = 0  # index in c of the newest token
        while j + 1 < len(c):
            pos = len(p) + j
            ok = int(logits_mtp[i, pos - 1].argmax()) == c[j + 1]
            drafts, accepted = drafts + 1, accepted + ok
            j += 2 if ok and c[j + 1] not in stops and j + 2 < n_max else 1
    return drafts, accepted


@pytest.mark.parametrize("weights", ["random", "predictable"])
def test_speculative_greedy_equals_plain(tiny_cfg, tiny_params, weights):
    params = tiny_params if weights == "random" else predictable(tiny_params)
    plain = gen(tiny_cfg, params, sampling=SamplingConfig(temperature=0, max_new_tokens=12))
    stops, _, _ = _stops_for(np.asarray(plain.tokens))
    for sampling in (
        SamplingConfig(temperature=0, max_new_tokens=12),
        SamplingConfig(temperature=0, max_new_tokens=12, stop_tokens=stops),
    ):
        ref = gen(tiny_cfg, params, sampling=sampling)
        # rows' pages permuted (one page of 64 each here; tests/test_paged_cache.py crosses pages)
        spec = gen(tiny_cfg, params, sampling=sampling, speculative=True, block_table=[[2], [0], [1]])
        np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(ref.lengths))
        np.testing.assert_array_equal(np.asarray(spec.finished), np.asarray(ref.finished))
        np.testing.assert_allclose(np.asarray(spec.logprobs), np.asarray(ref.logprobs), atol=1e-5)
        rate = spec.stats["acceptance_rate"]
        print(
            f"{weights} weights, stops {sampling.stop_tokens}: acceptance {rate:.3f}, "
            f"{spec.stats['tokens_per_step']:.2f} tokens/step"
        )
        assert 0.0 <= rate <= 1.0
        # the MTP cache is consistent: drafts match the training-style MTP forward over the final sequences
        _, mtp_logits = full_forward(tiny_cfg, params, PROMPTS, ref)
        want = _simulate_greedy_drafts(
            PROMPTS, ref.completions(), mtp_logits, stops if sampling.stop_tokens else (), 12
        )
        assert (spec.stats["drafts"], spec.stats["accepted_drafts"]) == want
    if weights == "predictable":
        assert 0.2 < rate < 0.9  # both the accept and the reject paths ran


def test_sampling_reproducible_and_logprobs_tempered(tiny_cfg, tiny_params):
    """Same key -> same samples, other key -> different; logprobs = log_softmax(logits / T) at the samples."""
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=8)
    a = gen(tiny_cfg, tiny_params, sampling=sampling, key=jax.random.key(1))
    b = gen(tiny_cfg, tiny_params, sampling=sampling, key=jax.random.key(1))
    c = gen(tiny_cfg, tiny_params, sampling=sampling, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    logits, _ = full_forward(tiny_cfg, tiny_params, PROMPTS, a)
    for i, p in enumerate(PROMPTS):
        want = np.take_along_axis(
            log_softmax(logits[i, len(p) - 1 : len(p) + 7] / 0.7), np.asarray(a.tokens)[i][:, None], -1
        )[:, 0]
        np.testing.assert_allclose(np.asarray(a.logprobs)[i], want, atol=1e-4)
    # temperature is traced: a different temperature reuses the compiled program and samples differently
    d = gen(tiny_cfg, tiny_params, sampling=SamplingConfig(temperature=1.5, max_new_tokens=8), key=jax.random.key(1))
    assert (np.asarray(a.tokens) != np.asarray(d.tokens)).any()
    # num_samples: G completions per prompt, prompt-major rows
    g = gen(tiny_cfg, tiny_params, [PROMPTS[0]], sampling, key=jax.random.key(3), num_samples=3)
    assert g.tokens.shape == (3, 8) and len({tuple(x) for x in g.completions()}) > 1


def test_top_k_top_p_kept_sets():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])  # ranks: 1, 3, 4, 2, 0
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]

    def kept(**kw):
        return set(np.flatnonzero(np.isfinite(np.asarray(processed_logits(logits, **kw))[0])).tolist())

    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=5) == kept() == {0, 1, 2, 3, 4}
    assert kept(top_p=0.75) == {1, 3, 4}  # 0.4 + 0.3 < 0.75, so 0.15 is needed to reach it
    assert kept(top_p=0.5) == {1, 3}
    assert kept(top_p=0.01) == {1}  # the most likely token always survives
    # top-k renormalises before top-p: top-3 probs are 0.47 / 0.35 / 0.18, so top_p=0.8 keeps two, not three
    assert kept(top_p=0.8) == {1, 3, 4}
    assert kept(top_k=3, top_p=0.8) == {1, 3}
    # temperature before top-p: sharpening (T=0.5) gives 0.4 / 0.3 0.56 / 0.32 of the mass
    assert kept(temperature=0.5, top_p=0.75) == {1, 3}
    # the sampler draws only from the kept set, in proportion to the renormalised probabilities
    prog = SamplerProgram(greedy=False, top_k=3, use_top_p=False)
    keys = jax.random.split(jax.random.key(0), 4000)
    toks, lps = jax.vmap(lambda k: sample(k, logits, prog))(keys)
    toks = np.asarray(toks)[:, 0]
    freq = np.bincount(toks, minlength=5) / len(toks)
    assert set(np.flatnonzero(freq).tolist()) == {1, 3, 4}
    np.testing.assert_allclose(freq[[1, 3, 4]], probs[[1, 3, 4]] / 0.85, atol=0.03)
    np.testing.assert_allclose(np.asarray(lps)[:, 0], np.log(probs[toks] / 0.85), atol=1e-5)


def test_cache_limits(tiny_cfg, tiny_params, greedy_run):
    """A prompt longer than the cache is an error; a completion that fills the cache ends there, unfinished."""
    with pytest.raises(ValueError, match=r"prompt 1 has 11 tokens, longer than the cache \(max_len=10"):
        gen(tiny_cfg, tiny_params, max_len=10)
    # 13 slots: the 11-token prompt has room for 2 more fed tokens, so 3 new ones (the last is never fed back)
    r = gen(tiny_cfg, tiny_params, max_len=13)
    np.testing.assert_array_equal(np.asarray(r.lengths), [8, 3, 8])
    assert not np.asarray(r.finished).any()
    np.testing.assert_array_equal(np.asarray(r.tokens)[1, :3], np.asarray(greedy_run.tokens)[1, :3])
    np.testing.assert_array_equal(np.asarray(r.tokens)[[0, 2]], np.asarray(greedy_run.tokens)[[0, 2]])
    with pytest.raises(ValueError, match="outside"):
        gen(tiny_cfg, tiny_params, [[1, tiny_cfg.vocab_size]])
    assert [bucket_length(n) for n in (1, 16, 17, 600, 1025)] == [16, 16, 32, 1024, 2048]


def expected_tv(p, n):
    """E[TV(empirical of n draws, p)] under the normal approximation: 0.5 sum_i sqrt(2 p_i (1 - p_i) / (pi n))."""
    p = np.asarray(p, np.float64).reshape(-1)
    return 0.5 * np.sqrt(2 * p * (1 - p) / (math.pi * n)).sum()


def tv(a, b):
    return 0.5 * np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum()


def test_speculative_accept_rule_gives_target_distribution():
    """The accept/reject rule on its own: drafts from q, output ~ p, acceptance = sum min(p, q)."""
    rng = np.random.RandomState(0)
    p, q = rng.dirichlet(np.ones(8)), rng.dirichlet(np.ones(8))
    n = 200_000
    k_draft, k_acc = jax.random.split(jax.random.key(0))
    lp = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 8))
    lq = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (n, 8))
    draft = jax.random.categorical(k_draft, lq, axis=-1).astype(jnp.int32)
    tok, ok = jax.jit(speculative_accept)(k_acc, lp, lq, draft)
    freq = np.bincount(np.asarray(tok), minlength=8) / n
    assert tv(freq, p) < 4 * expected_tv(p, n), (tv(freq, p), expected_tv(p, n))
    assert tv(q, p) > 0.1  # the draft alone would fail
    assert abs(float(np.asarray(ok).mean()) - np.minimum(p, q).sum()) < 0.01


@pytest.mark.slow
def test_speculative_sampling_matches_target_distribution():
    """End to end on a 16-token vocabulary: 4096 speculative samples of 3 tokens from one prompt.

    The exact target is computed from full forwards over all 256 (x1, x2) continuations (temperature 0.9 and
    top_p 0.95 applied). Bound: the empirical TV of n draws concentrates near E[TV] (`expected_tv`, the normal
    approximation): it is a sum over K cells of |p_hat - p| terms whose relative spread is about 0.75, so its
    own relative spread is about 0.75 / sqrt(K_effective), 0.1-0.25 here; 2 E[TV] is 4+ standard deviations
    out. The naive "always accept the draft" distribution is checked to sit far outside the bound (power).
    """
    cfg = dsjax.ModelConfig.preset("tiny", vocab_size=16)
    params = randomize_params(param_shapes(cfg), seed=4, std=0.15)
    prompt, n, temp, top_p = [3, 1, 4, 1], 4096, 0.9, 0.95
    sampling = SamplingConfig(temperature=temp, top_p=top_p, max_new_tokens=3)
    r = gen(cfg, params, [prompt], sampling, key=jax.random.key(7), num_samples=n, speculative=True)
    toks = np.asarray(r.tokens)
    assert (np.asarray(r.lengths) == 3).all()

    pairs = np.stack(np.meshgrid(np.arange(16), np.arange(16), indexing="ij"), -1).reshape(256, 2)
    seqs = jnp.asarray(np.concatenate([np.tile(prompt, (256, 1)), pairs], 1), jnp.int32)
    logits, _, aux = jax.jit(lambda p, t: dsjax.DeepSeekV3(cfg).apply({"params": p}, t, mtp=True))(params, seqs)

    def dist(x):
        return np.asarray(jax.nn.softmax(processed_logits(x, temp, 0, top_p), axis=-1), np.float64)

    p1 = dist(logits[0, 3])  # x1 | prompt
    p2 = dist(logits[::16, 4])  # x2 | x1   [16 (x1), 16]
    p3 = dist(logits[:, 5])  # x3 | x1, x2   [256, 16]
    joint12 = p1[:, None] * p2
    marg3 = (joint12.reshape(256, 1) * p3).sum(0)
    emp12 = np.bincount(toks[:, 0] * 16 + toks[:, 1], minlength=256).reshape(16, 16) / n
    emp3 = np.bincount(toks[:, 2], minlength=16) / n
    naive12 = p1[:, None] * dist(aux["mtp_logits"][0, ::16, 3])  # drafts for x2 emitted without correction

    b12, b3 = 2 * expected_tv(joint12, n), 2 * expected_tv(marg3, n)
    print(
        f"acceptance {r.stats['acceptance_rate']:.3f}; TV(x1,x2) {tv(emp12, joint12):.4f} (bound {b12:.4f}, "
        f"naive {tv(naive12, joint12):.4f}); TV(x3) {tv(emp3, marg3):.4f} (bound {b3:.4f})"
    )
    assert 0.05 < r.stats["acceptance_rate"] < 0.95
    assert tv(emp12, joint12) < b12 and tv(emp3, marg3) < b3
    assert tv(naive12, joint12) > 2 * b12
