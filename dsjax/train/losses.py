"""Training objective: next-token CE + MTP CE (DeepSeek-V3 eq. 24-25) + optional sequence-wise balance loss.

Convention: `targets[t]` is the token after `inputs[t]`. MTP depth k at position t reads `inputs[t + k]` and
predicts `targets[t + k]` (= token t + k + 1); it counts only where that target is a real next token and the
whole span stays inside one packed document.

The output head and its cross-entropy are fused (`fused_cross_entropy`): the [tokens, vocab] logits exist one
chunk of tokens at a time, so training never holds float32 logits for the whole batch (16,384 tokens x 129,280
ids would be 8.5 GB per head, paid again for every MTP depth).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CE_CHUNK = 4096  # tokens per chunk of the fused head: [4096, 129280] float32 logits = 2.1 GB live at a time


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Masked mean CE in float32 -> (mean, sum of nats, token count)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = logz - picked
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    total = jnp.sum(nll * mask)
    count = jnp.sum(mask)
    return total / jnp.maximum(count, 1.0), total, count


def fused_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *, chunk_size: int = CE_CHUNK
):
    """`cross_entropy(hidden @ head, targets, mask)` without the whole logits array -> (mean, nats, count).

    hidden [..., D] in the compute dtype; head [D, V] (any dtype: cast to hidden's, gradient returned in its own);
    targets / mask [...]. Tokens go through in chunks of `chunk_size`: each chunk's logits are one matmul with
    float32 accumulation, then a stable logsumexp. Under differentiation the forward pass also forms each chunk's
    logit gradient (softmax - onehot, masked) and immediately contracts it into d hidden and d head (float32
    accumulation across chunks), so the backward pass only scales those by the incoming cotangent: 3 matmuls per
    chunk instead of the 4 of recomputing the logits in the backward, and no [tokens, vocab] array outlives its
    chunk. The logit gradient enters its two matmuls in the compute dtype (float32 stays float32).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    m = jnp.ones(t.shape, jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    chunk = max(1, min(chunk_size, n))
    pad = -n % chunk
    if pad:  # padded tokens carry mask 0: no loss, no gradient
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t, m = jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    total = _ce_sum(h, head, t, m, chunk)
    count = jnp.sum(m)
    return total / jnp.maximum(count, 1.0), total, count


def _chunk_logits(h_c, w):
    return jnp.dot(h_c, w, preferred_element_type=jnp.float32)


def _merge_max_sumexp(a, b):
    """Combine two (max, sum of exp(x - max)) partials: the rescale costs one exp (of min - max)."""
    (m1, s1), (m2, s2) = a, b
    lo = jnp.minimum(m1, m2)
    e = jnp.where(lo == -jnp.inf, 0.0, jnp.exp(lo - jnp.maximum(m1, m2)))  # -inf - -inf would be nan
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)


def row_logsumexp(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis of float32 x in one pass over x (an online max + rescaled sum as one variadic
    reduction): the head's [chunk, vocab] logits are read once for it instead of twice (max, then sum of exp),
    and they are the largest array of the training step."""
    m, s = jax.lax.reduce(
        (x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)), _merge_max_sumexp, (x.ndim - 1,)
    )
    return m + jnp.log(s)


def _chunks(x, chunk):
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce_sum(h, head, t, m, chunk):
    """Sum over tokens of mask * (logsumexp(h @ head) - logit of the target), float32."""
    w = head.astype(h.dtype)

    def body(total, xs):
        h_c, t_c, m_c = xs
        logits = _chunk_logits(h_c, w)
        nll = row_logsumexp(logits) - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return total + jnp.sum(nll * m_c), None

    with jax.named_scope("cross_entropy"):
        total, _ = jax.lax.scan(
            body, jnp.zeros((), jnp.float32), (_chunks(h, chunk), _chunks(t, chunk), _chunks(m, chunk))
        )
    return total


def _ce_sum_fwd(h, head, t, m, chunk):
    w = head.astype(h.dtype)
    vocab = w.shape[1]

    def body(carry, xs):
        total, dw = carry
        h_c, t_c, m_c = xs
        logits = _chunk_logits(h_c, w)
        lse = row_logsumexp(logits)
        hit = jnp.arange(vocab, dtype=jnp.int32)[None, :] == t_c[:, None]
        nll = lse - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        # d nll / d logits = softmax - onehot, per token times its mask
        dlogits = ((jnp.exp(logits - lse[:, None]) - hit) * m_c[:, None]).astype(h.dtype)
        dh_c = jnp.dot(dlogits, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = dw + jnp.dot(h_c.T, dlogits, preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * m_c), dw), dh_c

    with jax.named_scope("cross_entropy"):
        init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
        (total, dw), dh = jax.lax.scan(body, init, (_chunks(h, chunk), _chunks(t, chunk), _chunks(m, chunk)))
    return total, (dh.reshape(h.shape), dw, jnp.zeros((0,), head.dtype))  # the empty array carries the dtype


def _ce_sum_bwd(chunk, res, g):
    dh, dw, like_head = res
    with jax.named_scope("cross_entropy"):
        return (g * dh).astype(dh.dtype), (g * dw).astype(like_head.dtype), None, None


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None, k: int):
    """(targets, mask) for MTP depth k at every position t: target t + k, valid iff in range and same document."""
    shifted = jnp.pad(targets[..., k:], [(0, 0)] * (targets.ndim - 1) + [(0, k)])
    mask = jnp.pad(loss_mask[..., k:].astype(jnp.float32), [(0, 0)] * (targets.ndim - 1) + [(0, k)])
    if segment_ids is not None:
        seg_k = jnp.pad(segment_ids[..., k:], [(0, 0)] * (targets.ndim - 1) + [(0, k)], constant_values=-1)
        mask = mask * (seg_k == segment_ids)
    return shifted, mask


def lm_loss(
    hidden,
    head,
    targets,
    loss_mask,
    aux=None,
    segment_ids=None,
    *,
    mtp_lambda: float = 0.0,
    balance_alpha: float = 0.0,
    chunk_size: int = CE_CHUNK,
):
    """Total loss and metrics from the final hidden states (the model's `aux["hidden"]`, [B, T, D]) and the
    output head [D, V] (`dsjax.model.head_weight`). aux is the model output's aux dict (needs mtp_hidden when
    mtp_lambda > 0). Every head pass goes through `fused_cross_entropy`."""
    ce = functools.partial(fused_cross_entropy, head=head, chunk_size=chunk_size)
    main, nats, count = ce(hidden, targets=targets, mask=loss_mask)
    loss = main
    metrics = {"loss/main": main, "nats": nats, "tokens": count}
    if mtp_lambda:
        mtp_hidden = aux["mtp_hidden"]
        depth = mtp_hidden.shape[0]
        mtp_total = 0.0
        for k in range(1, depth + 1):
            tk, mk = mtp_targets(targets, loss_mask, segment_ids, k)
            ce_k, _, _ = ce(mtp_hidden[k - 1], targets=tk, mask=mk)
            metrics[f"loss/mtp_{k}"] = ce_k
            mtp_total = mtp_total + ce_k
        metrics["loss/mtp"] = mtp_total / depth
        loss = loss + mtp_lambda / depth * mtp_total
    if balance_alpha and aux is not None and "balance_loss" in aux:
        bal = jnp.sum(aux["balance_loss"])
        metrics["loss/balance"] = bal
        loss = loss + balance_alpha * bal
    metrics["loss/total"] = loss
    return loss, metrics
