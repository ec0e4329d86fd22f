"""GRPO training: supervised warm start -> held-out pass@1 -> GRPO steps -> held-out pass@1.

One GRPO step: draw prompts from the task, sample G completions each (generation engine), score them with the
weighted reward functions, turn rewards into group advantages, then take `mu` optimizer steps on that batch.
Inner iteration 1 uses the current policy's own (detached) log-probs as the old ones, so rho == 1 there and no
separate forward is needed; its log-probs are kept, and iterations 2..mu use them as pi_old, so the ratio moves
away from 1 and the clip engages. With beta > 0 a frozen copy of the warm-start params gives the reference
log-probs (one forward per step). DAPO dynamic sampling re-samples with fresh prompts until the batch holds
`num_prompts` groups whose rewards are not all equal (or the round budget runs out; remaining slots are filled
with masked-out groups, so shapes never change).

State: <workdir>/sft/checkpoints (warm-start params, held-out pass@1 before GRPO) and <workdir>/checkpoints
(policy, optimizer state, step, RNG, task-stream position). Rerunning with the same workdir resumes the GRPO
step count; a finished warm start is reused, never retrained.
`train(config, workdir)` takes experiments/configs/grpo.py's config and returns a summary dict.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.errors import ConfigError
from dsjax.rl.grpo import LOSS_TYPES, SCALES, group_advantages
from dsjax.rl.rewards import score
from dsjax.rl.rollout import (
    Rollout,
    cast_for_rollout,
    training_mask,
)
from dsjax.rl.run import GrpoRun
from dsjax.rl.tasks import RL_STREAM
from dsjax.rl.warm_start import warm_start
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.checkpoint_io import model_config_dict
from dsjax.train.lock import WorkdirLock
from dsjax.train.loop import (
    NonFiniteGuard,
    ResumeCheck,
    StopFlag,
    check_counts,
    save_due,
    to_plain,
)
from dsjax.train.metrics import MetricsLogger
from sharding.mesh import describe
from sharding.rules import batch_shards
from sharding.state import shard_batch, shard_train_state


def groups_with_spread(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[N] bool per group: rewards not all equal. A flat group has zero advantage everywhere, so it teaches
    nothing but still dilutes the per-token averages (DAPO's dynamic sampling drops it)."""
    g = np.asarray(rewards).reshape(-1, group_size)
    return g.max(axis=1) > g.min(axis=1)


def _concat(parts: list[Rollout]) -> Rollout:
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    stats = {k: sum(p.stats[k] for p in parts) for k in ("new_tokens", "prefill_s", "decode_s")}
    return Rollout(
        cat("sequences"),
        cat("prompt_lengths"),
        cat("completions"),
        cat("lengths"),
        cat("finished"),
        cat("sampler_logprobs"),
        stats,
    )


def _collect(run: GrpoRun, params, step: int, key):
    """One step's training batch -> (rollout, rewards, keep_rows, first round's (rollout, scores), stats)."""
    g, r = run.c.grpo, run.c.rollout
    G, n = r.num_samples, r.num_prompts
    rounds = g.dynamic_sampling_max_rounds if g.dynamic_sampling else 1
    kept, spare, first = [], [], None
    gen_tokens = gen_s = 0.0
    for i in range(rounds):
        problems = run.task.problems(RL_STREAM, step * rounds + i, n)
        ro = run.generate(params, problems, run.sampling, jax.random.fold_in(jax.random.fold_in(key, step), i), G)
        sc = score(run.rewards, run.samples(problems, ro, G))
        gen_tokens, gen_s = gen_tokens + ro.stats["new_tokens"], gen_s + ro.stats["prefill_s"] + ro.stats["decode_s"]
        first = first or (ro, sc)
        if not g.dynamic_sampling:
            break
        spread = groups_with_spread(sc.total, G)
        for j in range(n):
            rows = np.arange(j * G, (j + 1) * G)
            (kept if spread[j] else spare).append((ro.take(rows), sc.total[rows]))
        if len(kept) >= n:
            break
    stats = {"rollout_tokens": gen_tokens, "rollout_s": gen_s, "dynamic/rounds": i + 1}
    if not g.dynamic_sampling:
        return first[0], first[1].total, np.ones(n * G, bool), first, stats
    chosen = kept[:n] + spare[: max(n - len(kept), 0)]
    keep = np.repeat(np.arange(n) < len(kept), G)
    stats["dynamic/kept_groups"] = min(len(kept), n)
    return _concat([c[0] for c in chosen]), np.concatenate([c[1] for c in chosen]), keep, first, stats


def _step_metrics(first, stats, ms, G, mu, beta, ro, train_s) -> dict[str, float]:
    ro0, sc0 = first
    out = sc0.metrics()
    out["frac_reward_zero_std"] = 1.0 - float(groups_with_spread(sc0.total, G).mean())
    out.update(
        {
            "completion/length_mean": float(ro0.lengths.mean()),
            "completion/length_max": float(ro0.lengths.max()),
            "completion/truncated_frac": 1.0 - float(ro0.finished.mean()),
        }
    )
    for k in ms[0]:
        if k == "kl" and not beta:
            continue  # no reference model: nothing was measured
        vals = [float(m[k]) for m in ms]
        out[k] = min(vals) if k == "ratio/min" else max(vals) if k == "ratio/max" else float(np.mean(vals))
    # iteration 1 runs on the sampling params: its entropy and sampler-vs-trainer gap describe the rollout
    out["entropy"], out["logprob_gap"], out["lr"] = (
        float(ms[0]["entropy"]),
        float(ms[0]["logprob_gap"]),
        float(ms[-1]["lr"]),
    )
    out["clip_ratio/region_last_iter"] = float(ms[-1]["clip_ratio/region"])
    out["rollout_tokens_per_s"] = stats.pop("rollout_tokens") / max(stats.pop("rollout_s"), 1e-9)
    out["train_tokens_per_s"] = mu * float(ro.prompt_lengths.sum() + ro.lengths.sum()) / max(train_s, 1e-9)
    out.update({k: float(v) for k, v in stats.items()})
    return out


def _console(step, total, m, eta) -> str:
    parts = [f"grpo {step}/{total}", f"reward {m['reward/mean']:.3f}"]
    if "reward/correct/mean" in m:
        parts.append(f"correct {m['reward/correct/mean']:.3f}")
    parts += [
        f"zero-std {m['frac_reward_zero_std']:.2f}",
        f"len {m['completion/length_mean']:.1f}",
        f"ent {m['entropy']:.3f}",
        f"clip {m['clip_ratio/region']:.3f}",
        f"gap {m['logprob_gap']:.1e}",
    ]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    parts += [
        f"rollout {m['rollout_tokens_per_s'] / 1e3:.1f}k tok/s",
        f"train {m['train_tokens_per_s'] / 1e3:.1f}k tok/s",
        f"ETA {eta:.0f}s",
    ]
    return " | ".join(parts)


def _grpo_mesh(mesh):
    """The mesh GRPO runs on: None for one device (the plain path); a multi-process one is refused."""
    if mesh is not None and mesh.size == 1:
        mesh = None
    if mesh is not None and jax.process_count() > 1:
        raise ValueError(
            "GRPO runs in one process (its rollouts are generated on this host); multi-device meshes "
            f"are supported, multi-process ones not yet: {jax.process_count()} processes"
        )
    return mesh


def _check_config(config, mesh) -> None:
    """Raises ConfigError naming the field for GRPO settings that cannot run, before anything is read, written or
    compiled (a bad loss_type used to fail only after the warm start)."""
    g, r, s = config.grpo, config.rollout, config.sft
    check_counts(config, "grpo", positive=("mu",), nonnegative=("steps", "dynamic_sampling_max_rounds"))
    check_counts(config, "rollout", positive=("num_prompts", "num_samples"), nonnegative=("max_new_tokens",))
    check_counts(config, "train", positive=("log_every", "keep"), nonnegative=("eval_every", "save_every"))
    for field, value, allowed in (
        ("grpo.loss_type", g.loss_type, LOSS_TYPES),
        ("grpo.advantage_scale", g.advantage_scale, SCALES),
    ):
        if value not in allowed:
            raise ConfigError(f"--config.{field}={value!r} is not one of {', '.join(allowed)}")
    if s.target_pass_at_1 and s.check_every < 1:
        raise ConfigError("--config.sft.target_pass_at_1 needs --config.sft.check_every >= 1")
    if mesh is not None:
        shards = batch_shards(mesh)
        for name, rows in (
            ("rollout.num_prompts x rollout.num_samples", r.num_prompts * r.num_samples),
            ("sft.batch_size", s.batch_size),
        ):
            if rows % shards:
                raise ConfigError(
                    f"--config.{name} = {rows} rows do not split over the {shards} batch shards of "
                    f"--mesh={describe(mesh)}"
                )


class _Grpo:
    """The GRPO phase: the policy's params, optimizer state and step count, the compiled update, the frozen
    reference (beta > 0), and the checkpoint it saves to."""

    def __init__(self, run: GrpoRun, params, mesh, ckpt: Checkpointer, key, before: float, run_config: dict):
        g = run.c.grpo
        self.update, self.logprob_fn, tx = run.update_fns(mesh)
        # frozen reference = the warm start; copied because the update donates (and so invalidates) `params`
        self.ref = jax.tree.map(jnp.copy, cast_for_rollout(params, run.cfg.dtype)) if g.beta else None
        self.params, self.opt_state, self.step = params, tx.init(params), 0
        if mesh is not None:
            self.params, self.opt_state = shard_train_state(mesh, self.params, self.opt_state)
        self.run, self.mesh, self.ckpt = run, mesh, ckpt
        self.guard = NonFiniteGuard(run.c.train.max_skipped_steps, "--config.train.max_skipped_steps")
        self.key, self.before, self.run_config = key, before, run_config  # what each checkpoint records
        self.warned = set()  # reward functions whose first failure was already reported

    def restore(self, check: ResumeCheck):
        """The newest intact GRPO checkpoint, if any (a corrupt newer step is moved aside with a message)."""
        restored = self.ckpt.restore_latest(self.params, self.opt_state, check_config=check)
        if restored is not None:
            _, self.params, self.opt_state, meta, _ = restored
            self.step = int(meta["step"])
            print(f"resumed GRPO from {self.ckpt.directory}/{self.step}", flush=True)

    def save(self):
        self.ckpt.save(
            self.step,
            self.params,
            self.opt_state,
            jax.random.key_data(self.key),
            {"task_stream": RL_STREAM, "task_step": self.step, "pass@1/before": self.before},
            self.run_config,
            force=True,
        )

    def _warn_reward_errors(self, scores):
        for name, msg in scores.first_error.items():
            if name not in self.warned:
                self.warned.add(name)
                print(
                    f"warning: reward {name!r} failed on some samples (scored 0, counted in "
                    f"reward/{name}/errors); first error: {msg}",
                    flush=True,
                )

    def train_step(self, k_roll) -> dict[str, float]:
        """One GRPO step: a rollout batch scored into advantages, then `mu` optimizer steps on it (iteration 1's
        log-probs become pi_old for the rest). Returns the step's host metrics."""
        g, G = self.run.c.grpo, self.run.c.rollout.num_samples
        ro, rewards, keep, first, stats = _collect(self.run, self.params, self.step, k_roll)
        self._warn_reward_errors(first[1])
        batch = {
            "sequences": ro.sequences,
            "prompt_lengths": ro.prompt_lengths,
            "mask": training_mask(ro, g.mask_truncated_completions, keep),
            "advantages": np.asarray(group_advantages(rewards, G, g.advantage_scale)),
            "valid": ro.valid.astype(np.float32),
            "sampler_logprobs": ro.sampler_logprobs,
            "old_logprobs": np.zeros_like(ro.sampler_logprobs),
        }
        batch = shard_batch(self.mesh, batch)
        t0 = time.time()
        if g.beta:
            batch["ref_logprobs"] = self.logprob_fn(self.ref, batch)
        ms = []
        for it in range(g.mu):
            self.params, self.opt_state, m, lp = self.update(
                self.params, self.opt_state, jnp.int32(self.step * g.mu + it), batch, jnp.bool_(it == 0)
            )
            if it == 0:
                batch["old_logprobs"] = lp
            ms.append(m)
        ms = jax.device_get(ms)
        for it, mm in enumerate(ms):  # a non-finite inner update was not applied; too many in a row stop the run
            self.guard.observe(self.step * g.mu + it + 1, mm.pop("skipped"))
        self.step += 1
        return _step_metrics(first, stats, ms, G, g.mu, g.beta, ro, time.time() - t0)

    def run_steps(self, k_roll, logger: MetricsLogger, stop: StopFlag):
        """Steps until `grpo.steps` or a stop request: log, eval and checkpoint at their intervals. Returns each
        step's mean reward and the (rollout, train) tokens/s of steps after the process's first."""
        g, t = self.run.c.grpo, self.run.c.train
        history, speeds, t_loop, first_step = [], [], time.time(), self.step
        while self.step < g.steps and not stop.requested:
            m = self.train_step(k_roll)
            step = self.step
            history.append(m["reward/mean"])
            if step > first_step + 1:  # the first step of a process compiles
                speeds.append((m["rollout_tokens_per_s"], m["train_tokens_per_s"]))
            logger.log(step, m, prefix="train", console=False)
            if step % t.log_every == 0 or step == g.steps:
                eta = (time.time() - t_loop) / (step - first_step) * (g.steps - step)
                print(_console(step, g.steps, m, eta), flush=True)
            if t.eval_every and step % t.eval_every == 0 and step != g.steps:
                logger.log(step, {"pass_at_1": self.run.pass_at_1(self.params)}, prefix="eval")
            if t.save_every > 0 and save_due(step, g.steps, t.save_every):
                self.save()
        return history, speeds


def _summary(
    run: GrpoRun, grpo: _Grpo, logger: MetricsLogger, history, speeds, stopped: bool, t_start: float, workdir: str
) -> dict[str, Any]:
    """Held-out pass@1 after GRPO, printed and logged with the throughput; the summary dict train() returns."""
    after = run.pass_at_1(grpo.params)
    logger.log(grpo.step, {"pass_at_1": after}, prefix="eval", console=False)
    logger.close()
    print(
        f"held-out pass@1 ({len(run.eval_problems)} problems, greedy): warm start {grpo.before:.3f} -> after "
        f"{grpo.step} GRPO steps {after:.3f}",
        flush=True,
    )
    summary = {
        "pass@1/before": grpo.before,
        "pass@1/after": after,
        "step": grpo.step,
        "rewards": history,
        "stopped_by_signal": stopped,
        "wall_s": time.time() - t_start,
        "workdir": os.path.abspath(workdir),
    }
    if speeds:
        summary["rollout_tokens_per_s"], summary["train_tokens_per_s"] = map(float, np.mean(speeds, axis=0))
        print(
            f"rollout {summary['rollout_tokens_per_s']:.0f} tokens/s, train {summary['train_tokens_per_s']:.0f} "
            f"tokens/s (mean over steps after the first, which compiles)",
            flush=True,
        )
    return summary


def train(config, workdir: str, mesh=None) -> dict[str, Any]:
    """Warm start, then GRPO (resumed from `workdir`'s checkpoints where present); returns a summary dict.

    With a mesh of more than one device, params and optimizer state take their rule-table layout
    (sharding/rules.py), the warm-start and GRPO batches are split over its batch axes, and the updates trace with
    the mesh bound (expert-parallel MoE), as in pretraining. Rollouts run on the same sharded params."""
    t_start = time.time()
    mesh = _grpo_mesh(mesh)
    _check_config(config, mesh)
    run = GrpoRun(config, jax.devices()[:1] if mesh is None else mesh.devices.flat)
    lock = WorkdirLock(workdir).acquire()  # one run per workdir, before anything is written
    try:
        return _train(config, workdir, mesh, run, t_start)
    finally:
        lock.release()


def _train(config, workdir: str, mesh, run: GrpoRun, t_start: float) -> dict[str, Any]:
    g, t = config.grpo, config.train
    ckpt = Checkpointer(workdir, keep=t.keep, async_save=t.async_save)
    check = ResumeCheck(run.cfg, workdir)
    check.early(ckpt)  # a checkpoint of another model is refused before the warm start
    run_config = {"model": model_config_dict(run.cfg), "experiment": to_plain(config)}
    key = jax.random.key(t.seed)
    k_init, k_roll = jax.random.split(key)
    if mesh is not None:
        print(f"mesh {describe(mesh)}", flush=True)
    params, before = warm_start(run, workdir, k_init, run_config, mesh)
    print(f"held-out pass@1 after warm start: {before:.3f} ({len(run.eval_problems)} problems, greedy)", flush=True)
    grpo = _Grpo(run, params, mesh, ckpt, key, before, run_config)
    grpo.restore(check)
    logger, stop = MetricsLogger(workdir, g.steps, tensorboard=t.tensorboard), StopFlag()
    try:
        history, speeds = grpo.run_steps(k_roll, logger, stop)
        if stop.requested and t.save_every > 0 and not save_due(grpo.step, g.steps, t.save_every):
            grpo.save()  # the loop did not just save
    finally:
        stop.restore()
        ckpt.close()
    return _summary(run, grpo, logger, history, speeds, stop.requested, t_start, workdir)
