"""GRPO's supervised warm start: teach the policy the answer format before reinforcement learning.

`warm_start` trains on the task's problems with their answers (loss on answer + eos only) until greedy pass@1 on
training-distribution probe problems reaches `sft.target_pass_at_1` or `sft.steps` run out, then measures
held-out pass@1 and saves the params under <workdir>/sft; a finished warm start there is reused, never retrained.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import DeepSeekV3
from dsjax.rl.rollout import encode_prompts
from dsjax.rl.tasks import PROBE_STREAM, SFT_STREAM
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.loop import NonFiniteGuard, guarded_update, jit_train_step
from dsjax.train.losses import cross_entropy
from dsjax.train.metrics import MetricsLogger
from dsjax.train.optim import OptimConfig, lr_schedule, make_optimizer
from sharding.state import shard_batch, shard_train_state


@functools.lru_cache(maxsize=4)
def sft_fns(cfg, ocfg: OptimConfig, mesh=None):
    model, tx, sched = DeepSeekV3(cfg), make_optimizer(ocfg), lr_schedule(ocfg)

    def step(params, opt_state, i, inputs, targets, mask):
        def loss_fn(p):
            return cross_entropy(model.apply({"params": p}, inputs).logits, targets, mask)[0]

        loss, g = jax.value_and_grad(loss_fn)(params)
        params, opt_state, _, skipped = guarded_update(tx, g, opt_state, params, loss)
        return params, opt_state, {"loss": loss, "lr": sched(i), "skipped": skipped}

    return jit_train_step(step, cfg, tx, mesh, extra_outputs=1), tx


@functools.lru_cache(maxsize=4)
def init_fn(cfg):
    model = DeepSeekV3(cfg)
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])


def sft_arrays(tok, problems, max_prompt_length: int, max_new_tokens: int):
    """(inputs, targets, mask) [B, P + N - 1]: bos + prompt + answer + eos; loss on answer and eos only."""
    width = max_prompt_length + max_new_tokens
    seq, mask = np.zeros((len(problems), width), np.int32), np.zeros((len(problems), width), np.float32)
    prompts = encode_prompts(tok, [p.prompt for p in problems], max_prompt_length)
    for i, (p, ids) in enumerate(zip(problems, prompts)):
        ans = tok.encode(p.answer) + [tok.eos_id]
        if len(ans) > max_new_tokens:
            raise ValueError(
                f"answer {p.answer!r} + eos is {len(ans)} tokens, more than max_new_tokens="
                f"{max_new_tokens}: the policy could never produce it"
            )
        seq[i, : len(ids)], seq[i, len(ids) : len(ids) + len(ans)] = ids, ans
        mask[i, len(ids) : len(ids) + len(ans)] = 1.0
    return seq[:, :-1], seq[:, 1:], mask[:, 1:]


# GRPO starts a fresh optimizer, so the warm start's optimizer state is not kept (Orbax refuses empty trees).
NO_OPT_STATE = {"unused": np.zeros((), np.int32)}


def warm_start(run, workdir: str, key, run_config, mesh=None) -> tuple[Any, float]:
    """Warm-start params and their held-out pass@1 for `run` (dsjax.rl.run.GrpoRun): from <workdir>/sft if
    present, else init_checkpoint or random init, then `sft.steps` supervised steps, then saved there."""
    s, cfg = run.c.sft, run.cfg
    ocfg = OptimConfig(
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        total_steps=max(s.steps, 1),
        schedule="cosine",
        weight_decay=s.weight_decay,
    )
    step_fn, tx = sft_fns(cfg, ocfg, mesh)
    ckpt = Checkpointer(os.path.join(workdir, "sft"), keep=1, async_save=False)
    try:
        init = init_fn(cfg)
        restored = ckpt.restore_latest(jax.eval_shape(init, key), NO_OPT_STATE)  # a corrupt one is moved aside
        if restored is not None:
            _, params, _, _, data = restored
            print(f"warm start: reusing {ckpt.directory} (held-out pass@1 {data['pass_at_1']:.3f})", flush=True)
            return (params if mesh is None else shard_train_state(mesh, params)), float(data["pass_at_1"])
        params = init(key) if run.init_params is None else run.init_params
        opt_state = tx.init(params)
        if mesh is not None:
            params, opt_state = shard_train_state(mesh, params, opt_state)
        logger = MetricsLogger(os.path.join(workdir, "sft"), s.steps, tensorboard=run.c.train.tensorboard)
        # Stopping probe: training-distribution problems (never held-out ones), as many as the held-out set so
        # the greedy pass reuses its compiled program. Stopping at a target rate rather than a step count makes
        # the warm start's level independent of how fast a given seed or machine happens to learn.
        probe = run.task.problems(PROBE_STREAM, 0, len(run.eval_problems))
        guard = NonFiniteGuard(run.c.train.max_skipped_steps, "--config.train.max_skipped_steps")
        probe_prompts = run.encode([p.prompt for p in probe])
        t0, done = time.time(), 0
        while done < s.steps:
            arrays = sft_arrays(
                run.tok, run.task.problems(SFT_STREAM, done, s.batch_size), run.max_prompt_length, run.max_new_tokens
            )
            params, opt_state, m = step_fn(params, opt_state, jnp.int32(done), *shard_batch(mesh, arrays))
            done += 1
            guard.observe(done, m["skipped"])
            check = bool(s.target_pass_at_1) and done % s.check_every == 0
            if check:
                m = {**m, "probe_pass_at_1": run.pass_at_1(params, probe, probe_prompts)}
            if check or done % s.log_every == 0 or done == s.steps:
                logger.log(done, jax.device_get(m), prefix="sft", console=False)
                probe_msg = f" | probe pass@1 {m['probe_pass_at_1']:.3f}" if "probe_pass_at_1" in m else ""
                print(
                    f"sft {done}/{s.steps} | loss {float(m['loss']):.4f}{probe_msg} | {time.time() - t0:.0f}s",
                    flush=True,
                )
            if m.get("probe_pass_at_1", 0.0) >= s.target_pass_at_1 > 0:
                break
        logger.close()
        p1 = run.pass_at_1(params)
        if run.c.train.save_every > 0:
            ckpt.save(done, params, NO_OPT_STATE, jax.random.key_data(key), {"pass_at_1": p1}, run_config, force=True)
        return params, p1
    finally:
        ckpt.close()
