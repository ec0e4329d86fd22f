"""GRPO advantages and policy loss (DeepSeekMath; Dr. GRPO and DAPO variants), as pure functions.

Why each piece exists:
- Group advantages: GRPO has no value network. The G completions of one prompt are the baseline for each other,
  so A_i = r_i - mean(group); dividing by the group std (original GRPO) makes every prompt's signal the same size,
  which Dr. GRPO argues biases towards too-easy/too-hard prompts, hence `scale="none"`; `"batch"` is the middle way.
  A group whose rewards are all equal carries no signal, so it gets exactly 0 (not 0/eps round-off, never NaN).
- Ratio and clipping: rho = pi/pi_old with old log-probs stored at sampling time. On the first inner iteration
  rho == 1 and the clip does nothing; it only bites on later inner iterations (or with a stale sampler), where it
  stops the update from moving a token's probability further than 1 +- eps in the direction the advantage pushes.
  `epsilon_high > epsilon_low` (DAPO's clip-higher) leaves more room to raise unlikely tokens.
- KL penalty with the k3 estimator exp(ref - lp) - (ref - lp) - 1: non-negative per token, unbiased for
  KL(pi || ref) at tokens sampled from pi, and — computed per token from the current policy's log-probs — its
  gradient wrt the log-probs, 1 - exp(ref - lp), is non-zero in expectation, so it really pulls pi to ref.
- Aggregation decides how much each token weighs: "grpo" averages per sequence, so tokens of long completions
  weigh less; "dapo" averages over all tokens of the batch; "dr_grpo" divides by a constant (B * max length), so
  the loss scale does not depend on the completion lengths at all.
Gradients flow only through `logprobs`; old/ref log-probs, advantages and the mask are constants. Values at
masked positions are ignored (they may be padding garbage, even inf) and get zero gradient.
"""

import numbers
from typing import Literal

import jax
import jax.numpy as jnp

Scale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "dr_grpo"]
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_EPS = 1e-4


def group_advantages(rewards: jax.Array, group_size: int, scale: Scale = "group") -> jax.Array:
    """Per-completion advantages; rewards [N*G], the G completions of each prompt consecutive -> [N*G] float32."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N*G], got shape {rewards.shape}")
    n = rewards.shape[0]
    if not isinstance(group_size, numbers.Integral) or group_size < 1 or n % group_size:
        raise ValueError(f"rewards length {n} is not divisible by group_size {group_size} (need a positive divisor)")
    groups = rewards.reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    # Equal rewards must give exactly 0; the float32 mean of equal numbers can differ from them by round-off.
    flat = groups.max(axis=1, keepdims=True) == groups.min(axis=1, keepdims=True)
    if scale == "group":
        # ddof=1 is undefined for one sample; such a group is flat anyway, so the guard only avoids 0/0.
        std = jnp.std(groups, axis=1, ddof=1, keepdims=True) if group_size > 1 else jnp.zeros_like(centered)
        centered = centered / (std + STD_EPS)
    elif scale == "batch":
        std = jnp.std(rewards, ddof=1) if n > 1 else jnp.zeros((), jnp.float32)
        centered = centered / (std + STD_EPS)
    return jnp.where(flat, 0.0, centered).reshape(-1)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: LossType = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.04,
    max_completion_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate GRPO loss (+ beta * k3 KL) over completion tokens.

    logprobs, old_logprobs, ref_logprobs, mask: [B, T] (mask 1 on completion tokens); advantages: [B].
    `loss_type`, the epsilons, `beta` and `max_completion_length` are static Python values.
    "grpo": a sequence with no completion tokens is left out of the mean over sequences (it has no tokens to
    average, and counting it as 0 would shrink the others' weight); if every sequence is empty the loss is 0.
    Returns (scalar loss, metrics of scalar float32 arrays).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs; pass them or set beta=0")
    mask = jax.lax.stop_gradient(jnp.asarray(mask, jnp.float32))
    on = mask > 0
    batch, length = mask.shape

    def clean(x: jax.Array) -> jax.Array:
        # Zero the padding before exp: inf * 0 in the forward or backward pass would turn into NaN.
        return jnp.where(on, jnp.asarray(x, jnp.float32), 0.0)

    logprobs = clean(logprobs)
    old = jax.lax.stop_gradient(clean(old_logprobs))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]

    rho = jnp.exp(logprobs - old)
    surrogate = jnp.minimum(rho * adv, jnp.clip(rho, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv)
    per_token = -surrogate
    k3 = jnp.zeros_like(rho)
    if ref_logprobs is not None:
        log_ratio = jax.lax.stop_gradient(clean(ref_logprobs)) - logprobs
        k3 = jnp.exp(log_ratio) - log_ratio - 1.0
    if beta != 0:
        per_token = per_token + beta * k3

    if loss_type == "grpo":
        tokens = jnp.sum(mask, axis=1)
        per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(tokens, 1.0)
        has_tokens = (tokens > 0).astype(jnp.float32)
        loss = jnp.sum(per_seq * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    elif loss_type == "dapo":
        loss = _masked_mean(per_token, mask)
    else:
        max_len = length if max_completion_length is None else max_completion_length
        if max_len <= 0:
            raise ValueError(f"max_completion_length must be positive, got {max_len}")
        loss = jnp.sum(per_token * mask) / (batch * max_len)

    rho_c = jax.lax.stop_gradient(rho)
    low = (adv < 0) & (rho_c < 1.0 - epsilon_low)
    high = (adv > 0) & (rho_c > 1.0 + epsilon_high)
    any_token = jnp.any(on)
    metrics = {
        "kl": _masked_mean(jax.lax.stop_gradient(k3), mask),
        "clip_ratio/low": _masked_mean(low.astype(jnp.float32), mask),
        "clip_ratio/high": _masked_mean(high.astype(jnp.float32), mask),
        "clip_ratio/region": _masked_mean((low | high).astype(jnp.float32), mask),
        "ratio/mean": _masked_mean(rho_c, mask),
        # With no completion token at all there is no min/max; report 0 rather than +-inf.
        "ratio/min": jnp.where(any_token, jnp.min(jnp.where(on, rho_c, jnp.inf)), 0.0),
        "ratio/max": jnp.where(any_token, jnp.max(jnp.where(on, rho_c, -jnp.inf)), 0.0),
        "advantage/mean": jnp.mean(adv),
    }
    return loss, metrics
