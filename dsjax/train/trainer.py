"""The pretraining loop: data -> jitted train step (grad accumulation, AdamW, router-bias update) -> metrics,
periodic eval (loss, bits per byte), async Orbax checkpoints, resume, clean exit on SIGTERM / Ctrl-C.

`train(config, workdir, mesh)` takes the ml_collections config of experiments/configs/*.py (sections model, data,
optim, train) and a device mesh (sharding/mesh.py; default: every device on the data axis) and returns a summary
dict. Parameters and optimizer state are laid out by sharding/rules.py, batches are split over its batch axes.
The jitted step itself is dsjax/train/step.py; the plumbing shared with the GRPO trainer (stop flag, resume check,
optimizer step, jitting with or without a mesh) is in dsjax/train/loop.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.data import make_datasets
from dsjax.errors import ConfigError
from dsjax.runtime import resolve
from dsjax.tokenizer import load_tokenizer
from dsjax.train.checkpoint import Checkpointer
from dsjax.train.checkpoint_io import model_config_dict
from dsjax.train.lock import WorkdirLock
from dsjax.train.loop import (
    NonFiniteGuard,
    ResumeCheck,
    StopFlag,
    check_counts,
    init_params,
    model_config,
    save_due,
    to_plain,
)
from dsjax.train.metrics import MetricsLogger, peak_flops, peak_memory_gib, train_flops_per_token
from dsjax.train.step import evaluate, make_step_fns
from sharding.mesh import describe, make_mesh
from sharding.rules import batch_shards
from sharding.state import shard_batch, state_shardings


class _Prefetch:
    """Reads batches on a thread; each item carries the iterator state *after* it, so a checkpoint saved after
    consuming batch n records exactly where batch n + 1 starts, however far the thread has read ahead."""

    def __init__(self, it, depth: int = 2):
        self._it, self._q, self._stop = it, queue.Queue(depth), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                item = (batch, self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # surface data errors in the training thread
            self._q.put(e)

    def next(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()


def gather_data_states(state: dict) -> dict:
    """Every process's data-iterator state, for the checkpoint. Each host reads its own shard, so each has its own
    position, but Orbax writes a JSON item from the primary process only: without the gather, every host would
    resume from host 0's position. Single-process runs keep the plain state."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return {"per_process": [json.loads(rows[i, : sizes[i]].tobytes().decode()) for i in range(len(sizes))]}


def own_data_state(data: dict) -> dict:
    """This process's entry of a `gather_data_states` result (a plain state is a single-process checkpoint)."""
    if "per_process" not in data:
        if jax.process_count() > 1:
            raise ValueError(
                "the checkpoint holds one data-iterator state but this run has "
                f"{jax.process_count()} processes; resume with the process count that wrote it"
            )
        return data
    states = data["per_process"]
    if len(states) != jax.process_count():
        raise ValueError(
            f"the checkpoint's data state was written by {len(states)} processes, this run has "
            f"{jax.process_count()}; resume with the same process count"
        )
    return states[jax.process_index()]


def _check_inputs(config, cfg: ModelConfig, vocab_size: int, mesh) -> None:
    """Raises ConfigError, naming the flag to change, for a count out of range or a data config that does not fit
    the model or the mesh (all before anything compiles)."""
    t, d = config.train, config.data
    check_counts(
        config,
        "train",
        positive=("steps", "log_every", "eval_every", "save_every", "keep", "grad_accum", "max_skipped_steps"),
        nonnegative=("eval_batches",),
    )
    check_counts(config, "data", positive=("seq_len", "batch_size"))
    if vocab_size > cfg.vocab_size:
        raise ConfigError(
            f"--config.data.tokenizer has {vocab_size} ids but the model's vocab_size is "
            f"{cfg.vocab_size} (--config.model.vocab_size)"
        )
    if d.seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"--config.data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}"
        )
    if d.batch_size % (t.grad_accum * jax.process_count()):
        raise ConfigError(
            f"--config.data.batch_size={d.batch_size} must divide by grad_accum={t.grad_accum} x "
            f"processes={jax.process_count()}"
        )
    if d.batch_size // t.grad_accum % batch_shards(mesh):
        raise ConfigError(
            f"--config.data.batch_size={d.batch_size} / grad_accum={t.grad_accum} must divide by the "
            f"{batch_shards(mesh)} batch shards of --mesh={describe(mesh)}"
        )


@dataclasses.dataclass
class _State:
    """What a checkpoint holds: params, optimizer state, the run's RNG key, the step count, and the data
    iterator's position after the last batch consumed."""

    params: Any
    opt_state: Any
    key: Any
    step: int = 0
    data_state: dict | None = None

    def save(self, ckpt: Checkpointer, run_config: dict):
        ckpt.save(
            self.step,
            self.params,
            self.opt_state,
            jax.random.key_data(self.key),
            gather_data_states(self.data_state),
            run_config,
            force=True,
        )


def _init_or_restore(run_cfg: ModelConfig, tx, mesh, seed: int, ckpt: Checkpointer, check, train_it) -> _State:
    """Fresh state placed on the mesh, then the newest intact checkpoint's state when there is one (a corrupt newer
    step is moved aside with a message; `check` refuses one from another model or other data). The data position
    is restored too, unless the data settings changed (`check.data_changed`, when allowed)."""
    shapes = jax.eval_shape(lambda: init_params(run_cfg, seed))
    pshard, oshard = state_shardings(mesh, shapes, jax.eval_shape(tx.init, shapes))
    params = init_params(run_cfg, seed, pshard)
    state = _State(params, jax.jit(tx.init, out_shardings=oshard)(params), jax.random.key(seed))
    restored = ckpt.restore_latest(state.params, state.opt_state, check_config=check)
    if restored is not None:
        _, state.params, state.opt_state, meta, data_state = restored
        state.step = int(meta["step"])
        state.key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        if check.data_changed:
            print("data settings changed (" + "; ".join(check.data_changed) + "): the data starts from the beginning")
        else:
            train_it.set_state(own_data_state(data_state))
        print(f"resumed from {ckpt.directory}/{state.step}", flush=True)
    state.data_state = train_it.get_state()
    return state


class _Throughput:
    """Tokens/s and MFU between logged steps. The first step of a process compiles, so timing starts at its end
    (`first_step_done` reports how long it took, compilation included)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.t_start, self.t_mark, self.steps_mark = time.time(), None, 0

    def first_step_done(self, step: int, metrics):
        jax.block_until_ready(metrics)
        self.t_mark, self.steps_mark = time.time(), step
        mem = peak_memory_gib()
        print(
            f"first step done (compilation included) in {self.t_mark - self.t_start:.0f}s"
            + (f"; peak device memory {mem:.1f} GiB" if mem is not None else ""),
            flush=True,
        )

    def add_rates(self, step: int, m: dict):
        """Adds tokens_per_sec (and mfu, when the peak is known) since the last call to the host metrics `m`."""
        dt = time.time() - self.t_mark
        if step > self.steps_mark and dt > 0:
            m["tokens_per_sec"] = (step - self.steps_mark) * self.tokens_per_step / dt
            if self.peak:
                m["mfu"] = m["tokens_per_sec"] * self.flops_per_token / self.peak
            self.t_mark, self.steps_mark = time.time(), step


@dataclasses.dataclass
class _Loop:
    """The step loop's fixed pieces: the run's config and mesh, the compiled steps, the eval batches, and where
    metrics and checkpoints go."""

    config: Any
    mesh: Any
    train_step: Any
    eval_step: Any
    evals: list
    ckpt: Checkpointer
    logger: MetricsLogger
    run_config: dict

    def run(self, state: _State, prefetch: _Prefetch, speed: _Throughput, stop: StopFlag):
        """Steps until `train.steps` or a stop request: log, eval and checkpoint at their intervals. Returns the
        logged steps' training losses and the last eval (None if none ran)."""
        t = self.config.train
        losses, last_eval = {}, None  # training losses: every process sees the same global value
        guard, pending = NonFiniteGuard(t.max_skipped_steps, "--config.train.max_skipped_steps"), None
        while state.step < t.steps and not stop.requested:
            batch, state.data_state = prefetch.next()
            batch = shard_batch(
                self.mesh,
                {k: v.reshape((t.grad_accum, -1) + v.shape[1:]) for k, v in batch.items() if k != "num_bytes"},
                batch_dim=1,
            )
            state.params, state.opt_state, metrics = self.train_step(
                state.params, state.opt_state, np.int32(state.step), batch
            )
            state.step += 1
            step = state.step
            if pending is not None:  # one step late, so the device always has the next step queued
                guard.observe(*pending)
            pending = (step, metrics["skipped"])
            if speed.t_mark is None:
                speed.first_step_done(step, metrics)
            if step % t.log_every == 0 or step == t.steps:
                m = jax.device_get(metrics)
                speed.add_rates(step, m)
                self.logger.log(step, m)
                losses[step] = float(m["loss"])
            if step % t.eval_every == 0 or step == t.steps:
                last_eval = evaluate(self.eval_step, state.params, self.evals, self.mesh)
                self.logger.log(step, last_eval, prefix="eval")
            if save_due(step, t.steps, t.save_every):
                guard.observe(*pending)  # a run that is diverging stops before it saves
                pending = None
                state.save(self.ckpt, self.run_config)
        if pending is not None:
            guard.observe(*pending)
        return losses, last_eval


def _print_header(config, cfg: ModelConfig, run_cfg: ModelConfig, info, flops_tok: float, mesh):
    counts = cfg.param_counts()
    print(
        f"model {config.model.preset}: {counts['total'] / 1e6:.2f}M params ({counts['active_per_token'] / 1e6:.2f}M "
        f"active/token), {flops_tok / 1e6:.1f} MFLOP/token; data: {info.num_train_docs} train / "
        f"{info.num_eval_docs} eval docs; {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
        f"{describe(mesh)}; attention {run_cfg.attention_impl}, experts {run_cfg.moe_backend}",
        flush=True,
    )


def train(config, workdir: str, mesh=None) -> dict[str, Any]:
    """Pretrains (or resumes, from `workdir`'s latest checkpoint) and returns {"step", "stopped_by_signal",
    "eval_start", "eval_end", "workdir", "train_losses"}."""
    d = config.data
    cfg = model_config(config)
    mesh = make_mesh("") if mesh is None else mesh
    tok = load_tokenizer(d.tokenizer or None)
    _check_inputs(config, cfg, tok.vocab_size, mesh)
    lock = WorkdirLock(workdir).acquire()  # one run per workdir, before anything is written
    try:
        return _train(config, workdir, mesh, cfg, tok)
    finally:
        lock.release()


def _train(config, workdir: str, mesh, cfg: ModelConfig, tok) -> dict[str, Any]:
    t, d = config.train, config.data
    ckpt = Checkpointer(workdir, keep=t.keep, async_save=t.async_save)
    check = ResumeCheck(cfg, workdir, config, t.allow_data_change)
    check.early(ckpt)  # a checkpoint of another model or other data is refused before the data is read
    train_it, eval_batches, info = make_datasets(
        d.spec,
        tok,
        seq_len=d.seq_len,
        batch_size=d.batch_size // jax.process_count(),
        seed=t.seed,
        eval_spec=d.eval_spec or None,
        add_bos=d.add_bos,
    )
    # "auto" knobs resolved once, for the mesh's devices; the checkpoint keeps the config as asked (cfg)
    run_cfg = resolve(cfg, mesh.devices.flat)
    train_step, eval_step, use_mtp, tx = make_step_fns(run_cfg, config, mesh)
    state = _init_or_restore(run_cfg, tx, mesh, t.seed, ckpt, check, train_it)
    run_config = {"model": model_config_dict(cfg), "experiment": to_plain(config)}
    flops_tok = train_flops_per_token(cfg, d.seq_len, use_mtp)
    _print_header(config, cfg, run_cfg, info, flops_tok, mesh)

    logger = MetricsLogger(workdir, t.steps, tensorboard=t.tensorboard)
    evals = eval_batches(t.eval_batches)
    first_eval = None
    if state.step == 0:
        first_eval = evaluate(eval_step, state.params, evals, mesh)
        logger.log(0, first_eval, prefix="eval")
    loop = _Loop(config, mesh, train_step, eval_step, evals, ckpt, logger, run_config)
    stop, prefetch = StopFlag(), _Prefetch(train_it)
    speed = _Throughput(d.batch_size * d.seq_len, flops_tok, peak_flops(t.peak_tflops or None))
    try:
        losses, last_eval = loop.run(state, prefetch, speed, stop)
        if stop.requested and not save_due(state.step, t.steps, t.save_every):  # the loop did not just save
            state.save(ckpt, run_config)
    finally:
        prefetch.close()
        stop.restore()
        ckpt.close()
        logger.close()
    last_eval = last_eval or first_eval
    if first_eval and last_eval:
        print(
            f"validation bits per byte: {first_eval['bits_per_byte']:.3f} -> {last_eval['bits_per_byte']:.3f}",
            flush=True,
        )
    return {
        "step": state.step,
        "stopped_by_signal": stop.requested,
        "eval_start": first_eval,
        "eval_end": last_eval,
        "workdir": os.path.abspath(workdir),
        "train_losses": losses,
    }
