"""The pretraining loop: data -> jitted train step (grad accumulation, AdamW, router-bias update) -> metrics,
periodic eval (loss, bits per byte), async Orbax checkpoints, resume, clean exit on SIGTERM / Ctrl-C.

`train(config, workdir, mesh)` takes the ml_collections config of experiments/configs/*.py (sections model, data,
optim, train) and a device mesh (sharding/mesh.py; default: every device on the data axis) and returns a summary
dict. Parameters and optimizer state are laid out by sharding/rules.py, batches are split over its batch axes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import queue
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dsjax.config import ModelConfig
from dsjax.data import make_datasets
from dsjax.model import DeepSeekV3, head_weight
from dsjax.runtime import resolve
from dsjax.tokenizer import load_tokenizer
from dsjax.train.checkpoint import Checkpointer, config_mismatch, model_config_dict, model_config_from_dict
from dsjax.train.losses import fused_cross_entropy, lm_loss
from dsjax.train.metrics import MetricsLogger, peak_flops, peak_memory_gib, train_flops_per_token
from dsjax.train.optim import OptimConfig, lr_schedule, make_optimizer, update_router_bias
from sharding.mesh import describe, make_mesh
from sharding.rules import batch_shards
from sharding.state import bind, replicated, shard_batch, state_shardings


_OVERRIDABLE = {f.name: f.type for f in dataclasses.fields(ModelConfig)
                if f.name not in ("rope_scaling", "eos_token_id", "bos_token_id")}


def model_config_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` config section: a preset name plus every ModelConfig field as an optional override, so any
    field can be set from the command line (--config.model.num_hidden_layers=4); None keeps the preset's value."""
    types = {"int": int, "float": float, "bool": bool, "str": str, "int | None": int}
    c = ml_collections.ConfigDict({"preset": preset})
    for name, typ in _OVERRIDABLE.items():
        c[name] = ml_collections.config_dict.placeholder(types[typ])
    for name, value in overrides.items():
        if name not in _OVERRIDABLE:
            raise ValueError(f"model override {name!r} is not a ModelConfig field")
        c[name] = value
    return c


def model_config(config) -> ModelConfig:
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    return ModelConfig.preset(config.model.preset, **fields)


def _to_plain(x):
    if hasattr(x, "to_dict"):
        return _to_plain(x.to_dict())
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


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
    buf[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return {"per_process": [json.loads(rows[i, :sizes[i]].tobytes().decode()) for i in range(len(sizes))]}


def own_data_state(data: dict) -> dict:
    """This process's entry of a `gather_data_states` result (a plain state is a single-process checkpoint)."""
    if "per_process" not in data:
        if jax.process_count() > 1:
            raise ValueError("the checkpoint holds one data-iterator state but this run has "
                             f"{jax.process_count()} processes; resume with the process count that wrote it")
        return data
    states = data["per_process"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint's data state was written by {len(states)} processes, this run has "
                         f"{jax.process_count()}; resume with the same process count")
    return states[jax.process_index()]


class _StopFlag:
    """SIGTERM / first Ctrl-C request a clean stop (checkpoint, then exit); a second Ctrl-C interrupts."""

    def __init__(self):
        self.signum = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint and stopping", flush=True)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def make_step_fns(cfg: ModelConfig, config, ocfg: OptimConfig, mesh=None):
    """(jitted train_step, jitted eval_step, use_mtp, optimizer). Cached on the things that shape the step,
    so repeated train() calls in one process (tests, notebooks) reuse compiled code. With a mesh, the steps keep
    params and optimizer state in their rule-table layout and trace with the mesh bound (sharding/state.py)."""
    t = config.train
    return _step_fns(cfg, ocfg, float(t.mtp_lambda), float(t.balance_alpha), float(t.bias_gamma), mesh)


def init_params(cfg: ModelConfig, seed: int, shardings=None):
    """Parameters created in place: with shardings, each device only ever holds its own shards."""
    model = DeepSeekV3(cfg)
    return jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"],
                   out_shardings=shardings)()


@functools.lru_cache(maxsize=8)
def _step_fns(cfg: ModelConfig, ocfg: OptimConfig, mtp_lambda: float, balance_alpha: float, bias_gamma: float,
              mesh=None):
    model = DeepSeekV3(cfg)
    tx, sched = make_optimizer(ocfg), lr_schedule(ocfg)
    use_mtp = bool(mtp_lambda) and cfg.num_nextn_predict_layers > 0

    def loss_fn(params, mb):
        # The logits the model also returns are unused, so XLA drops them: the head runs inside the fused CE.
        _, aux = model.apply({"params": params}, mb["inputs"], mb["positions"], mb["segment_ids"],
                             mtp=use_mtp, return_aux=True)
        with jax.named_scope("loss"):
            loss, m = lm_loss(aux["hidden"], head_weight(params, cfg), mb["targets"], mb["loss_mask"], aux,
                              mb["segment_ids"], mtp_lambda=mtp_lambda if use_mtp else 0.0,
                              balance_alpha=balance_alpha)
        counts = {}
        if cfg.num_moe_layers:
            counts["moe_layers"] = aux["expert_counts"]
        for k in range(aux["mtp_expert_counts"].shape[0] if "mtp_expert_counts" in aux else 0):
            counts[f"mtp_{k}"] = aux["mtp_expert_counts"][k]
        return loss, (m, counts)

    def train_step(params, opt_state, step, batch):
        accum = batch["inputs"].shape[0]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accum == 1:  # no accumulation buffers: zeroing and adding them is a pass over every gradient
            (_, (m, counts)), g = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        else:
            def micro(carry, mb):
                (_, (m, c)), g = grad_fn(params, mb)
                with jax.named_scope("accumulate"):
                    return jax.tree.map(jnp.add, carry, (g, m, c)), None

            first = jax.tree.map(lambda x: x[0], batch)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                lambda: (jax.grad(lambda p: loss_fn(p, first)[0])(params), *loss_fn(params, first)[1])))
            (g, m, counts), _ = jax.lax.scan(micro, zeros, batch)
            g = jax.tree.map(lambda x: x / accum, g)
            m = {k: v / accum if k.startswith("loss/") else v for k, v in m.items()}
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
            params = update_router_bias(params, counts, bias_gamma)
        out = {k: v for k, v in m.items() if k.startswith("loss/")}
        out["loss"] = out.pop("loss/total")
        out["grad_norm"] = optax.global_norm(g)
        out["lr"] = sched(step)
        if "moe_layers" in counts:
            c = counts["moe_layers"].astype(jnp.float32)
            out["expert_load/max_over_mean"] = jnp.max(c.max(-1) / jnp.maximum(c.mean(-1), 1.0))
            out["expert_load/min_over_mean"] = jnp.min(c.min(-1) / jnp.maximum(c.mean(-1), 1.0))
        return params, opt_state, out

    def eval_step(params, batch):
        _, aux = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                             return_aux=True)
        _, nats, count = fused_cross_entropy(aux["hidden"], head_weight(params, cfg), batch["targets"],
                                             batch["loss_mask"])
        return nats, count

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_step), use_mtp, tx
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    pshard, oshard = state_shardings(mesh, params, jax.eval_shape(tx.init, params))
    step = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(pshard, oshard, replicated(mesh)))
    return bind(mesh, step), bind(mesh, jax.jit(eval_step, out_shardings=replicated(mesh))), use_mtp, tx


def evaluate(eval_step, params, batches, mesh=None) -> dict[str, float]:
    nats = tokens = nbytes = 0.0
    for b in batches:
        n, c = eval_step(params, shard_batch(mesh, {k: v for k, v in b.items() if k != "num_bytes"}))
        nats, tokens, nbytes = nats + float(n), tokens + float(c), nbytes + float(np.sum(b["num_bytes"]))
    return {"loss": nats / max(tokens, 1.0), "bits_per_byte": nats / math.log(2) / max(nbytes, 1.0),
            "tokens": tokens}


def train(config, workdir: str, mesh=None) -> dict[str, Any]:
    t, d = config.train, config.data
    cfg = model_config(config)
    mesh = make_mesh("") if mesh is None else mesh
    tok = load_tokenizer(d.tokenizer or None)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"--config.data.tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{cfg.vocab_size} (--config.model.vocab_size)")
    if d.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--config.data.seq_len={d.seq_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    if d.batch_size % (t.grad_accum * jax.process_count()):
        raise ValueError(f"--config.data.batch_size={d.batch_size} must divide by grad_accum={t.grad_accum} x "
                         f"processes={jax.process_count()}")
    if d.batch_size // t.grad_accum % batch_shards(mesh):
        raise ValueError(f"--config.data.batch_size={d.batch_size} / grad_accum={t.grad_accum} must divide by the "
                         f"{batch_shards(mesh)} batch shards of --mesh={describe(mesh)}")
    ckpt = Checkpointer(workdir, keep=t.keep, async_save=t.async_save)
    resume_step = ckpt.latest_step()
    saved = None
    if resume_step is not None:  # check compatibility before anything is written
        saved = ckpt.read_config(resume_step)
        diff = config_mismatch(model_config_from_dict(saved["model"]), cfg)
        if diff:
            raise ValueError(f"{workdir}: the checkpoint at step {resume_step} was written with a different model "
                             "config; use a new --workdir or the old config. Differences: " + "; ".join(diff))
    train_it, eval_batches, info = make_datasets(
        d.spec, tok, seq_len=d.seq_len, batch_size=d.batch_size // jax.process_count(), seed=t.seed,
        eval_spec=d.eval_spec or None, add_bos=d.add_bos)
    ocfg = OptimConfig(**{**_to_plain(config.optim), "total_steps": t.steps})
    # "auto" knobs resolved once, for the mesh's devices; the checkpoint keeps the config as asked (cfg)
    run_cfg = resolve(cfg, mesh.devices.flat)
    train_step, eval_step, use_mtp, tx = make_step_fns(run_cfg, config, ocfg, mesh)
    key = jax.random.key(t.seed)
    shapes = jax.eval_shape(lambda: init_params(run_cfg, t.seed))
    pshard, oshard = state_shardings(mesh, shapes, jax.eval_shape(tx.init, shapes))
    params = init_params(run_cfg, t.seed, pshard)
    opt_state = jax.jit(tx.init, out_shardings=oshard)(params)
    run_config = {"model": model_config_dict(cfg), "experiment": _to_plain(config)}
    step = 0
    if resume_step is not None:
        params, opt_state, meta, data_state = ckpt.restore(resume_step, params, opt_state)
        step = int(meta["step"])
        key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        train_it.set_state(own_data_state(data_state))
        print(f"resumed from {ckpt.directory}/{step}", flush=True)
    counts = cfg.param_counts()
    flops_tok = train_flops_per_token(cfg, d.seq_len, use_mtp)
    peak = peak_flops(t.peak_tflops or None)
    print(f"model {config.model.preset}: {counts['total'] / 1e6:.2f}M params ({counts['active_per_token'] / 1e6:.2f}M "
          f"active/token), {flops_tok / 1e6:.1f} MFLOP/token; data: {info.num_train_docs} train / "
          f"{info.num_eval_docs} eval docs; {jax.device_count()} x {jax.devices()[0].device_kind}, mesh "
          f"{describe(mesh)}; attention {run_cfg.attention_impl}, experts {run_cfg.moe_backend}", flush=True)

    logger = MetricsLogger(workdir, t.steps, tensorboard=t.tensorboard)
    evals = eval_batches(t.eval_batches)
    first_eval = None
    if step == 0:
        first_eval = evaluate(eval_step, params, evals, mesh)
        logger.log(0, first_eval, prefix="eval")
    stop, prefetch = _StopFlag(), _Prefetch(train_it)
    accum = t.grad_accum
    data_state, last_eval = train_it.get_state(), first_eval
    tokens_per_step = d.batch_size * d.seq_len
    t_mark, steps_mark = None, step
    losses = {}  # logged steps' training loss (every process sees the same global value)
    t_first = time.time()
    try:
        while step < t.steps and stop.signum is None:
            batch, data_state = prefetch.next()
            batch = shard_batch(mesh, {k: v.reshape((accum, -1) + v.shape[1:]) for k, v in batch.items()
                                       if k != "num_bytes"}, batch_dim=1)
            params, opt_state, metrics = train_step(params, opt_state, np.int32(step), batch)
            step += 1
            if t_mark is None:  # the first step compiles; time from its end
                jax.block_until_ready(metrics)
                t_mark, steps_mark = time.time(), step
                mem = peak_memory_gib()
                print(f"first step done (compilation included) in {t_mark - t_first:.0f}s" +
                      (f"; peak device memory {mem:.1f} GiB" if mem is not None else ""), flush=True)
            if step % t.log_every == 0 or step == t.steps:
                m = jax.device_get(metrics)
                dt = time.time() - t_mark
                if step > steps_mark and dt > 0:
                    m["tokens_per_sec"] = (step - steps_mark) * tokens_per_step / dt
                    if peak:
                        m["mfu"] = m["tokens_per_sec"] * flops_tok / peak
                    t_mark, steps_mark = time.time(), step
                logger.log(step, m)
                losses[step] = float(m["loss"])
            if step % t.eval_every == 0 or step == t.steps:
                last_eval = evaluate(eval_step, params, evals, mesh)
                logger.log(step, last_eval, prefix="eval")
            if step % t.save_every == 0 or step == t.steps:
                ckpt.save(step, params, opt_state, jax.random.key_data(key), gather_data_states(data_state),
                          run_config, force=True)
        if stop.signum is not None and step % t.save_every != 0 and step != t.steps:
            ckpt.save(step, params, opt_state, jax.random.key_data(key), gather_data_states(data_state), run_config,
                      force=True)
    finally:
        prefetch.close()
        stop.restore()
        ckpt.close()
        logger.close()
    summary = {"step": step, "stopped_by_signal": stop.signum is not None,
               "eval_start": first_eval, "eval_end": last_eval, "workdir": os.path.abspath(workdir),
               "train_losses": losses}
    if first_eval and last_eval:
        print(f"validation bits per byte: {first_eval['bits_per_byte']:.3f} -> {last_eval['bits_per_byte']:.3f}",
              flush=True)
    return summary
