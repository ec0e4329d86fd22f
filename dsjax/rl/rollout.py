"""GRPO rollouts: G sampled completions per prompt from the generation engine, packed into fixed-shape training
arrays, and the trainer's recomputation of their per-token log-probabilities.

Shapes never depend on the data: prompts are checked against `max_prompt_length` (P) and every row of the
training batch is P + max_new_tokens (N) wide, prompt then completion, zeros after. So the update step and the
log-prob forward compile once per run, whatever the prompts' lengths or when each completion ended.

Log-probabilities. The trainer recomputes log pi(token) with a full forward over prompt + completion, in float32,
at the sampling temperature: log_softmax(logits / T). With plain temperature sampling that is exactly the
distribution the sampler drew from, so in float32 the sampler's and the trainer's log-probs agree to round-off
and the logged gap (`logprob_gap`) is ~1e-6; bf16 rollouts show a real gap, which is why the old log-probs for
the importance ratio come from the trainer, not the sampler. With top-k / top-p the sampler reports log-probs of
the truncated, renormalised distribution while the trainer uses log_softmax(logits / T): the ratio then targets
the untruncated policy and the gap is no longer ~0. Rollouts default to no top-k / top-p for that reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.generate import bucket_length, generate
from dsjax.model import DeepSeekV3
from dsjax.sampling import SamplingConfig

__all__ = ["encode_prompts", "cast_for_rollout", "Rollout", "sample_rollouts", "completion_logprobs", "training_mask"]

_ROUTER_F32 = ("gate/kernel", "e_score_correction_bias")  # router math stays float32 (DESIGN.md section 3)


def encode_prompts(tok, texts: Sequence[str], max_prompt_length: int, add_bos: bool = True) -> list[list[int]]:
    """Token ids per prompt; a prompt over the limit is an error, never silently truncated (a cut prompt would
    be a different problem with the same reference answer)."""
    out = []
    for i, text in enumerate(texts):
        ids = ([tok.bos_id] if add_bos else []) + tok.encode(text)
        if len(ids) > max_prompt_length:
            raise ValueError(
                f"prompt {i} ({text[:80]!r}) is {len(ids)} tokens, longer than max_prompt_length="
                f"{max_prompt_length}; raise --config.rollout.max_prompt_length or shorten the prompt"
            )
        out.append(ids)
    return out


def cast_for_rollout(params, dtype):
    """Params in the compute dtype for sampling (the engine would cast them every decode step otherwise)."""
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return x.astype(jnp.float32 if name.endswith(_ROUTER_F32) else dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


@dataclasses.dataclass
class Rollout:
    """Host (NumPy) arrays for B = prompts x G rows, the G samples of each prompt consecutive."""

    sequences: np.ndarray  # [B, P + N] int32: prompt, completion, then 0
    prompt_lengths: np.ndarray  # [B] int32
    completions: np.ndarray  # [B, N] int32 (pad token after each end)
    lengths: np.ndarray  # [B] int32 completion lengths, stop token included
    finished: np.ndarray  # [B] bool: ended by a stop token (False: truncated at N)
    sampler_logprobs: np.ndarray  # [B, N] float32, 0 after each end
    stats: dict[str, Any]

    @property
    def valid(self) -> np.ndarray:
        """[B, N] bool: positions holding a sampled token."""
        return np.arange(self.completions.shape[1])[None] < self.lengths[:, None]

    def take(self, rows: np.ndarray) -> Rollout:
        return Rollout(
            self.sequences[rows],
            self.prompt_lengths[rows],
            self.completions[rows],
            self.lengths[rows],
            self.finished[rows],
            self.sampler_logprobs[rows],
            self.stats,
        )


def sample_rollouts(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    key: jax.Array,
    num_samples: int,
    max_prompt_length: int,
    cache_dtype=jnp.float32,
) -> Rollout:
    """num_samples completions of each prompt (prompt-major). The cache size is fixed by max_prompt_length, so the
    decode loop compiles once per run."""
    lens = np.asarray([len(p) for p in prompts], np.int32)
    if lens.max() > max_prompt_length:
        raise ValueError(
            f"prompt {int(lens.argmax())} has {int(lens.max())} tokens, longer than "
            f"max_prompt_length={max_prompt_length}"
        )
    n = sampling.max_new_tokens
    # The decode loop checks for "all rows done" every sync_every steps and runs whole bodies of that many steps;
    # short completions (the first token comes from the prefill) then finish in one body without wasted steps.
    res = generate(
        cfg,
        params,
        [list(p) for p in prompts],
        sampling,
        key,
        num_samples=num_samples,
        max_len=bucket_length(max_prompt_length) + n,
        cache_dtype=cache_dtype,
        sync_every=max(1, min(8, n - 1)),
    )
    comp, lp = np.asarray(res.tokens), np.asarray(res.logprobs)
    lengths, finished = np.asarray(res.lengths), np.asarray(res.finished)
    plens = np.repeat(lens, num_samples)
    valid = np.arange(n)[None] < lengths[:, None]
    seq = np.zeros((len(plens), max_prompt_length + n), np.int32)
    for i, p in enumerate(prompts):
        rows = slice(i * num_samples, (i + 1) * num_samples)
        seq[rows, : len(p)] = p
    # Each completion starts right after its own prompt: positions stay 0..len-1 as at sampling time.
    cols = plens[:, None] + np.arange(n)[None]
    np.put_along_axis(seq, cols, np.where(valid, comp, 0), axis=1)
    return Rollout(seq, plens, comp, lengths, finished, np.where(valid, lp, 0.0).astype(np.float32), res.stats)


def completion_logprobs(model: DeepSeekV3, params, sequences, prompt_lengths, width: int, temperature: float):
    """(log-probs [B, width], entropies [B, width]) of the completion tokens at the sampling temperature, float32.

    Completion token j of row b sits at sequences[b, P_b + j] and is predicted from position P_b + j - 1. Only
    those positions go through the head: the [B, P + N, V] logits of the full sequence are never built (the
    model's own logits output is unused, so XLA drops it), which matters for large vocabularies.
    """
    aux = model.apply({"params": params}, sequences).aux
    idx = prompt_lengths[:, None] - 1 + jnp.arange(width)[None]
    h = jnp.take_along_axis(aux["hidden"], idx[..., None], axis=1)
    logits = model.apply({"params": params}, h, method=DeepSeekV3.head).astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    targets = jnp.take_along_axis(sequences, prompt_lengths[:, None] + jnp.arange(width)[None], axis=1)
    token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return token_lp, jax.lax.stop_gradient(entropy)


def training_mask(rollout: Rollout, mask_truncated: bool, keep_rows: np.ndarray | None = None) -> np.ndarray:
    """[B, N] float32 loss mask: sampled tokens, minus truncated completions (DAPO's overlong filtering: a cut-off
    answer was never judged on its merits, so it should teach nothing) and rows of dropped groups."""
    mask = rollout.valid
    if mask_truncated:
        mask = mask & rollout.finished[:, None]
    if keep_rows is not None:
        mask = mask & keep_rows[:, None]
    return mask.astype(np.float32)
