"""A GRPO run's shared state: what every phase (warm start, rollouts, updates) and an AOT compile of the update
derive from one config. `initial_policy` picks the policy's config and params (an `init_checkpoint`'s
architecture, this run's runtime knobs, "auto" resolved for the run's devices); `GrpoRun` holds the task,
tokenizer, lengths, sampling configs, rewards and held-out prompts; `grpo_step_fns` builds the jitted update (the
policy loss over `mu` inner iterations' batches) and log-prob forward. The loop that uses them is trainer.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import RUNTIME_FIELDS, ModelConfig
from dsjax.errors import ConfigError
from dsjax.model import DeepSeekV3
from dsjax.rl.grpo import policy_loss
from dsjax.rl.rewards import Sample, exact_answer
from dsjax.rl.rollout import Rollout, cast_for_rollout, completion_logprobs, encode_prompts, sample_rollouts
from dsjax.rl.tasks import make_task
from dsjax.runtime import resolve
from dsjax.sampling import SamplingConfig
from dsjax.tokenizer import load_tokenizer
from dsjax.train.checkpoint_io import load_for_inference
from dsjax.train.loop import guarded_update, jit_forward, jit_train_step, model_config, to_plain
from dsjax.train.optim import OptimConfig, lr_schedule, make_optimizer


@functools.lru_cache(maxsize=8)
def grpo_step_fns(
    cfg,
    ocfg: OptimConfig,
    width: int,
    temperature: float,
    loss_type: str,
    eps_low: float,
    eps_high: float,
    beta: float,
    mesh=None,
):
    """(jitted update, jitted log-prob forward, optimizer); cached so repeated runs in one process reuse them."""
    model, tx, sched = DeepSeekV3(cfg), make_optimizer(ocfg), lr_schedule(ocfg)

    def logprobs(params, b):
        return completion_logprobs(model, params, b["sequences"], b["prompt_lengths"], width, temperature)[0]

    def loss_fn(params, b, first):
        lp, ent = completion_logprobs(model, params, b["sequences"], b["prompt_lengths"], width, temperature)
        old = jnp.where(first, jax.lax.stop_gradient(lp), b["old_logprobs"])
        loss, m = policy_loss(
            lp,
            old,
            b.get("ref_logprobs"),
            b["advantages"],
            b["mask"],
            loss_type=loss_type,
            epsilon_low=eps_low,
            epsilon_high=eps_high,
            beta=beta,
            max_completion_length=width,
        )
        return loss, (m, jax.lax.stop_gradient(lp), ent)

    def update(params, opt_state, opt_step, b, first):
        (loss, (m, lp, ent)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, b, first)
        params, opt_state, gnorm, skipped = guarded_update(tx, g, opt_state, params, loss)
        valid = b["valid"]
        n = jnp.maximum(valid.sum(), 1.0)
        m = {
            **m,
            "loss": loss,
            "grad_norm": gnorm,
            "skipped": skipped,
            "lr": sched(opt_step),
            "entropy": jnp.sum(ent * valid) / n,
            # sampler vs trainer log-probs of the same tokens; meaningful on inner iteration 1 (same params)
            "logprob_gap": jnp.sum(jnp.abs(b["sampler_logprobs"] - lp) * valid) / n,
        }
        return params, opt_state, m, lp

    # the log-probs stay split over the batch: they become the next inner iteration's old_logprobs
    return jit_train_step(update, cfg, tx, mesh, extra_outputs=2), jit_forward(logprobs, mesh), tx


def initial_policy(config, devices) -> tuple[ModelConfig, Any]:
    """(the policy's ModelConfig, its initial params or None for a random init).

    With `config.init_checkpoint`, the checkpoint's architecture and params, but the GRPO config's runtime knobs
    (dsjax.config.RUNTIME_FIELDS: dtype, remat, attention / decode kernels, MoE dispatch, ...), never the ones the
    checkpoint was trained with: where and how this run executes is this run's choice. Every "auto" knob is then
    resolved, once, for `devices`, the devices the run uses."""
    cfg, params = model_config(config), None
    if config.init_checkpoint:
        arch, params = load_for_inference(config.init_checkpoint)
        cfg = arch.replace(**{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    return resolve(cfg, devices), params


class GrpoRun:
    """Everything derived from a GRPO config that the phases (and an AOT compile of the update) share: the task,
    tokenizer, the policy's resolved config and initial params, prompt and completion lengths, sampling configs,
    rewards and the held-out prompts."""

    def __init__(self, config, devices):
        self.c = config
        r, t = config.rollout, config.task
        self.task = make_task(
            t.name, config.train.seed, **{k: v for k, v in t.items() if k not in ("name", "tokenizer")}
        )
        self.tok = load_tokenizer(t.tokenizer or None)
        self.cfg, self.init_params = initial_policy(config, devices)
        if config.init_checkpoint and self.tok.vocab_size > self.cfg.vocab_size:
            raise ConfigError(
                f"--config.task.tokenizer has {self.tok.vocab_size} ids, more than the checkpoint's vocab_size "
                f"{self.cfg.vocab_size}"
            )
        self.max_prompt_length = r.max_prompt_length or self.task.max_prompt_chars + 1  # + bos
        self.max_new_tokens = r.max_new_tokens or self.task.max_answer_chars + 2  # + eos + one spare
        # the GRPO optimizer, scheduled over every inner update; built (and validated) before any warm start
        self.optim = OptimConfig(
            **{**to_plain(config.optim), "total_steps": max(config.grpo.steps * config.grpo.mu, 1)}
        )
        if r.temperature <= 0:
            raise ConfigError(
                "--config.rollout.temperature must be > 0: GRPO needs sampled completions and their log-probs"
            )
        self.sampling = SamplingConfig(
            temperature=r.temperature,
            top_k=r.top_k,
            top_p=r.top_p,
            max_new_tokens=self.max_new_tokens,
            stop_tokens=(self.tok.eos_id,),
            pad_token=self.tok.pad_id,
        )
        self.greedy = SamplingConfig(
            temperature=0.0,
            max_new_tokens=self.max_new_tokens,
            stop_tokens=(self.tok.eos_id,),
            pad_token=self.tok.pad_id,
        )
        self.rewards = self.task.rewards(dict(config.rewards))
        # Encoding the held-out prompts up front checks the prompt limit before anything compiles.
        self.eval_problems = self.task.eval_problems()
        self.eval_prompts = self.encode([p.prompt for p in self.eval_problems])
        self.cache_dtype = jnp.dtype(r.cache_dtype or self.cfg.dtype)

    def update_fns(self, mesh=None):
        """(jitted GRPO update, jitted log-prob fn, optimizer) for this run's config: what the trainer runs and
        an AOT compile lowers."""
        g, r = self.c.grpo, self.c.rollout
        return grpo_step_fns(
            self.cfg,
            self.optim,
            self.max_new_tokens,
            float(r.temperature),
            g.loss_type,
            float(g.epsilon_low),
            float(g.epsilon_high),
            float(g.beta),
            mesh,
        )

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (bos first); a prompt longer than max_prompt_length is a ValueError."""
        return encode_prompts(self.tok, prompts, self.max_prompt_length)

    def samples(self, problems, ro: Rollout, group: int) -> list[Sample]:
        return [
            Sample(
                problems[i // group].prompt,
                self.tok.decode(ro.completions[i, : ro.lengths[i]]),
                problems[i // group].answer,
                bool(ro.finished[i]),
            )
            for i in range(len(ro.lengths))
        ]

    def generate(self, params, problems, sampling, key, group, prompts=None):
        prompts = prompts or self.encode([p.prompt for p in problems])
        return sample_rollouts(
            self.cfg,
            cast_for_rollout(params, self.cfg.dtype),
            prompts,
            sampling,
            key,
            group,
            self.max_prompt_length,
            self.cache_dtype,
        )

    def pass_at_1(self, params, problems=None, prompts=None) -> float:
        """Greedy exact-answer rate; the held-out set by default."""
        problems, prompts = (self.eval_problems, self.eval_prompts) if problems is None else (problems, prompts)
        ro = self.generate(params, problems, self.greedy, jax.random.key(0), 1, prompts)
        return float(np.mean([exact_answer(s) for s in self.samples(problems, ro, 1)]))
