"""Training objective: next-token CE + MTP CE (DeepSeek-V3 eq. 24-25) + optional sequence-wise balance loss.

Convention: `targets[t]` is the token after `inputs[t]`. MTP depth k at position t reads `inputs[t + k]` and
predicts `targets[t + k]` (= token t + k + 1); it counts only where that target is a real next token and the
whole span stays inside one packed document.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


def mtp_targets(targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None, k: int):
    """(targets, mask) for MTP depth k at every position t: target t + k, valid iff in range and same document."""
    shifted = jnp.pad(targets[..., k:], [(0, 0)] * (targets.ndim - 1) + [(0, k)])
    mask = jnp.pad(loss_mask[..., k:].astype(jnp.float32), [(0, 0)] * (targets.ndim - 1) + [(0, k)])
    if segment_ids is not None:
        seg_k = jnp.pad(segment_ids[..., k:], [(0, 0)] * (targets.ndim - 1) + [(0, k)], constant_values=-1)
        mask = mask * (seg_k == segment_ids)
    return shifted, mask


def lm_loss(logits, targets, loss_mask, aux=None, segment_ids=None, *, mtp_lambda: float = 0.0,
            balance_alpha: float = 0.0):
    """Total loss and metrics. aux is the model's return_aux dict (needs mtp_logits when mtp_lambda > 0)."""
    main, nats, count = cross_entropy(logits, targets, loss_mask)
    loss = main
    metrics = {"loss/main": main, "nats": nats, "tokens": count}
    if mtp_lambda:
        mtp_logits = aux["mtp_logits"]
        depth = mtp_logits.shape[0]
        mtp_total = 0.0
        for k in range(1, depth + 1):
            tk, mk = mtp_targets(targets, loss_mask, segment_ids, k)
            ce_k, _, _ = cross_entropy(mtp_logits[k - 1], tk, mk)
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
