"""Next-token sampling and the speculative-sampling accept/reject rule (pure functions, jit-friendly).

Processing order: temperature, then top-k, then top-p. Top-k does not depend on the temperature, but top-p does
(it thresholds probabilities after the temperature), and top-p runs on the top-k-renormalised distribution, the
order transformers' and vLLM's samplers use. Greedy is temperature 0.

Logprobs are those of the distribution a token was actually drawn from: log_softmax of the processed logits
(tokens outside top-k/top-p have -inf). Greedy draws from a point mass, whose log-probability (0) says nothing,
so greedy reports the log-probability under the untempered model distribution, log_softmax(logits).
With no top-k/top-p, a sampled token's logprob is log_softmax(logits / T): "logprobs at the sampling temperature",
what GRPO's importance ratios need.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens and when to stop.

    temperature     0 = greedy (argmax); otherwise logits / temperature.
    top_k           keep the k most likely tokens (0 = off). Ties with the k-th logit are kept too.
    top_p           nucleus: keep the smallest most-likely prefix whose probability reaches top_p (1 = off).
    max_new_tokens  completion length bound (also the width of the returned token array).
    stop_tokens     a sequence ends after emitting any of these (the stop token is part of the completion).
    pad_token       emitted after a sequence ends.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def program(self) -> SamplerProgram:
        """The parts that change the compiled program; temperature and top_p values are traced."""
        if self.greedy:  # top-k/top-p cannot change an argmax
            return SamplerProgram(True, 0, False)
        return SamplerProgram(False, self.top_k, self.top_p < 1)

    def traced(self) -> dict:
        """Values passed to the compiled program as arrays, so changing them does not recompile."""
        return {"temperature": jnp.float32(self.temperature or 1.0), "top_p": jnp.float32(self.top_p)}


@dataclasses.dataclass(frozen=True)
class SamplerProgram:
    greedy: bool
    top_k: int
    use_top_p: bool


def processed_logits(logits, temperature=1.0, top_k: int = 0, top_p=None):
    """logits [..., V] -> logits / temperature with tokens outside top-k, then top-p, set to -inf.

    top_k is static; temperature and top_p may be traced (None skips top-p). The kept set is found by value
    thresholds, so a token tied with the last kept one is kept as well.
    """
    x = logits.astype(jnp.float32) / temperature
    desc = None
    if top_k and top_k < x.shape[-1]:
        desc = jax.lax.top_k(x, top_k)[0]  # sorted descending: reused by top-p instead of a full-vocab sort
        x = jnp.where(x >= desc[..., -1:], x, -jnp.inf)
    if top_p is not None:
        if desc is None:
            desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum((mass_before < top_p).sum(-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        x = jnp.where(x >= cutoff, x, -jnp.inf)
    return x


def sampling_logprobs(logits, prog: SamplerProgram, temperature, top_p):
    """Log-probabilities [..., V] of the distribution `prog` draws from (untempered for greedy)."""
    if prog.greedy:
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.log_softmax(
        processed_logits(logits, temperature, prog.top_k, top_p if prog.use_top_p else None), axis=-1
    )


def pick(key, logp, greedy: bool):
    """A token per row from log-probs [B, V] (argmax when greedy) and its log-probability."""
    tok = jnp.argmax(logp, -1) if greedy else jax.random.categorical(key, logp, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def sample(key, logits, prog: SamplerProgram, temperature=1.0, top_p=1.0):
    """logits [B, V] -> (tokens [B] int32, logprobs [B] float32); see the module docstring for logprobs."""
    return pick(key, sampling_logprobs(logits, prog, temperature, top_p), prog.greedy)


def speculative_accept(key, target_logp, draft_logp, draft):
    """Speculative sampling for one drafted token per row (Leviathan et al. 2023; Chen et al. 2023).

    target_logp, draft_logp [B, V]: log-probs of the target p and the draft q the draft was drawn from.
    Accept with probability min(1, p(d) / q(d)); on rejection draw from the residual max(p - q, 0) normalised.
    The emitted token is then distributed exactly as p. Returns (token [B], accepted [B] bool).
    """
    k_u, k_r = jax.random.split(key)
    p, q = jnp.exp(target_logp), jnp.exp(draft_logp)
    p_d = jnp.take_along_axis(p, draft[:, None], -1)[:, 0]
    q_d = jnp.take_along_axis(q, draft[:, None], -1)[:, 0]
    accepted = jax.random.uniform(k_u, p_d.shape) * q_d < p_d
    residual = jnp.maximum(p - q, 0.0)
    res_logits = jnp.where(residual > 0, jnp.log(jnp.where(residual > 0, residual, 1.0)), -jnp.inf)
    # p == q leaves no residual; then rejection has probability 0 and this fallback only keeps the draw finite
    res_logits = jnp.where((residual > 0).any(-1, keepdims=True), res_logits, target_logp)
    fixed = jax.random.categorical(k_r, res_logits, axis=-1).astype(jnp.int32)
    return jnp.where(accepted, draft, fixed), accepted
