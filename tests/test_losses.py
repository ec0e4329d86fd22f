"""The fused output head + cross-entropy and the MoE pair permutations: values and gradients against the plain
formulas, and what the fused head allocates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.layers.moe_ops import combine_pairs, gather_pairs, pair_order
from dsjax.train.losses import cross_entropy, fused_cross_entropy, row_logsumexp


def ce_inputs(shape, d, vocab, seed=0, masked=True):
    rng = np.random.RandomState(seed)
    h = jnp.asarray(rng.randn(*shape, d), jnp.float32)
    w = jnp.asarray(0.5 * rng.randn(d, vocab), jnp.float32)
    t = jnp.asarray(rng.randint(0, vocab, shape), jnp.int32)
    m = jnp.asarray(rng.rand(*shape) > 0.3, jnp.float32) if masked else None
    return h, w, t, m


@pytest.mark.parametrize(
    "shape, d, vocab, chunk, masked",
    [
        ((3, 37), 16, 101, 16, True),  # 111 tokens: 7 chunks of 16, the last one padded; vocab prime
        ((50,), 8, 13, 7, True),
        ((2, 5), 4, 9, 100, False),  # one chunk larger than the tokens, no mask
    ],
)
def test_fused_cross_entropy_matches_plain(shape, d, vocab, chunk, masked):
    h, w, t, m = ce_inputs(shape, d, vocab, masked=masked)

    def total(ce, h, w):  # both outputs that carry gradients, weighted differently
        mean, nats, count = ce(h, w)
        return mean + 0.1 * nats, count

    plain = lambda h, w: cross_entropy(jnp.dot(h, w, precision="highest"), t, m)  # noqa: E731
    fused = lambda h, w: fused_cross_entropy(h, w, t, m, chunk_size=chunk)  # noqa: E731
    (want, want_count), want_g = jax.value_and_grad(lambda h, w: total(plain, h, w), (0, 1), has_aux=True)(h, w)
    (got, got_count), got_g = jax.jit(jax.value_and_grad(lambda h, w: total(fused, h, w), (0, 1), has_aux=True))(h, w)
    assert float(got_count) == float(want_count) == (float(m.sum()) if masked else float(np.prod(shape)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_g, want_g):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))
    # without differentiation the forward is the same number
    np.testing.assert_allclose(fused(h, w)[1], plain(h, w)[1], rtol=1e-5)


def test_row_logsumexp_is_logsumexp_in_one_pass():
    """The one-pass (online max + rescaled sum) reduction equals jax.nn.logsumexp, including rows that are all
    -inf, half -inf, hold one huge value, or are wide and spread (many rescales)."""
    x = jax.random.normal(jax.random.key(3), (6, 1003), jnp.float32) * 30.0
    x = x.at[0].set(-jnp.inf).at[1, :700].set(-jnp.inf).at[2, 11].set(3e38).at[3].set(0.0)
    got, want = jax.jit(row_logsumexp)(x), jax.nn.logsumexp(x, axis=-1)
    assert got[0] == -jnp.inf and want[0] == -jnp.inf
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6)
    np.testing.assert_allclose(got[3], np.log(1003.0), rtol=1e-6)
    assert row_logsumexp(x[None]).shape == (1, 6)


def test_fused_cross_entropy_bf16_hidden_keeps_head_dtype():
    h, w, t, m = ce_inputs((4, 30), 16, 50, seed=1)
    g_h, g_w = jax.grad(lambda h, w: fused_cross_entropy(h, w, t, m, chunk_size=32)[0], (0, 1))(
        h.astype(jnp.bfloat16), w
    )
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.float32
    want_h, want_w = jax.grad(lambda h, w: cross_entropy(jnp.dot(h, w), t, m)[0], (0, 1))(h, w)
    assert float(jnp.linalg.norm(g_w - want_w) / jnp.linalg.norm(want_w)) < 2e-2
    assert float(jnp.linalg.norm(g_h.astype(jnp.float32) - want_h) / jnp.linalg.norm(want_h)) < 2e-2


def test_fused_cross_entropy_gradient_never_holds_the_logits():
    """The jitted gradient's temporaries stay far under the [tokens, vocab] float32 logits it would otherwise keep
    (and under one chunk's few copies of them)."""
    tokens, d, vocab, chunk = 4096, 64, 8192, 256
    h, w, t, _ = ce_inputs((tokens,), d, vocab, masked=False)
    logits_bytes = tokens * vocab * 4
    grad = jax.jit(jax.grad(lambda h, w: fused_cross_entropy(h, w, t, chunk_size=chunk)[0], (0, 1)))
    fused_tmp = grad.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    plain = jax.jit(jax.grad(lambda h, w: cross_entropy(jnp.dot(h, w), t)[0], (0, 1)))
    plain_tmp = plain.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert plain_tmp >= logits_bytes
    assert fused_tmp < logits_bytes / 8, (fused_tmp, logits_bytes)


def test_pair_permutations_match_plain_indexing():
    """gather_pairs / combine_pairs (gather-only backward passes) against x[order // k] and the plain un-sort +
    weighted sum, values and gradients, routing weights included."""
    rng = np.random.RandomState(0)
    n, k, e, d = 23, 3, 5, 6
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    x = jnp.asarray(rng.randn(n, d), jnp.float32)
    wts = jnp.asarray(rng.rand(n, k), jnp.float32)
    po = pair_order(idx, e)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1)[np.asarray(po.order)], np.sort(np.asarray(idx).ravel()))
    np.testing.assert_array_equal(np.asarray(po.order)[np.asarray(po.inverse)], np.arange(n * k))
    np.testing.assert_array_equal(po.sizes, np.bincount(np.asarray(idx).ravel(), minlength=e))
    scale = jnp.asarray(rng.randn(n * k, d), jnp.float32)  # a per-row function between the two permutations

    def ours(x, wts):
        return combine_pairs(gather_pairs(x, po.order, po.inverse, k) * scale, po.order, po.inverse, wts)

    def plain(x, wts):
        y = x[po.order // k] * scale
        return jnp.einsum("nkd,nk->nd", y[jnp.argsort(po.order)].reshape(n, k, d), wts)

    np.testing.assert_allclose(ours(x, wts), plain(x, wts), rtol=1e-6, atol=1e-6)
    ct = jnp.asarray(rng.randn(n, d), jnp.float32)
    got = jax.grad(lambda x, w: jnp.sum(ours(x, w) * ct), (0, 1))(x, wts)
    want = jax.grad(lambda x, w: jnp.sum(plain(x, w) * ct), (0, 1))(x, wts)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_never_holds_the_logits():
    """The real train step (main head + MTP head) keeps only chunk-sized [CE_CHUNK, vocab] logits: the model's
    own logits output is unused there, so XLA drops it."""
    import re

    from dsjax.config import ModelConfig
    from dsjax.train.loop import init_params
    from dsjax.train.losses import CE_CHUNK
    from dsjax.train.step import make_step_fns
    from experiments.bench_util import synthetic_batch
    from experiments.configs import tiny

    vocab, batch, seq = 1000, 4, 2048  # 8192 tokens: two chunks per head
    cfg = ModelConfig.preset("tiny", vocab_size=vocab)
    step, _, use_mtp, tx = make_step_fns(cfg, tiny.get_config())
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    hlo = (
        step.lower(
            params,
            jax.eval_shape(tx.init, params),
            np.int32(0),
            jax.tree.map(jnp.asarray, synthetic_batch(vocab, batch, seq)),
        )
        .compile()
        .as_text()
    )
    with_vocab = set(re.findall(r"f32\[([\d,]*\b1000\b[\d,]*)\]", hlo))
    assert use_mtp and f"{CE_CHUNK},{vocab}" in with_vocab
    assert not any(str(batch * seq) in s.split(",") or str(seq) in s.split(",") for s in with_vocab), with_vocab
