"""The pretraining step: `step_fns` builds the jitted train step (forward with MTP, fused cross-entropy, balance
loss, gradient accumulation over micro-batches, AdamW behind the non-finite guard, the aux-loss-free router-bias
update) and eval step of a model and optimizer config; `make_step_fns` takes them from a run's ml_collections
config; `evaluate` runs the eval step over fixed batches. The loop around them is trainer.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model import DeepSeekV3, head_weight
from dsjax.train.loop import guarded_update, jit_forward, jit_train_step, to_plain
from dsjax.train.losses import fused_cross_entropy, lm_loss
from dsjax.train.optim import OptimConfig, lr_schedule, make_optimizer, update_router_bias
from sharding.state import shard_batch


def make_step_fns(cfg: ModelConfig, config, mesh=None):
    """(jitted train_step, jitted eval_step, use_mtp, optimizer) for a run's ml_collections config: `step_fns`
    with its `optim` section (scheduled over train.steps) and the loss weights and bias rate of its `train`."""
    t = config.train
    return step_fns(
        cfg,
        OptimConfig(**{**to_plain(config.optim), "total_steps": t.steps}),
        mtp_lambda=float(t.mtp_lambda),
        balance_alpha=float(t.balance_alpha),
        bias_gamma=float(t.bias_gamma),
        mesh=mesh,
    )


def _step_metrics(m: dict, counts: dict, gnorm, skipped, lr) -> dict:
    """The logged metrics of one step: losses, grad norm, whether it was skipped (not finite), LR, expert load
    spread of the MoE layers (the busiest layer's) and of each MTP module's."""
    out = {k: v for k, v in m.items() if k.startswith("loss/")}
    out["loss"] = out.pop("loss/total")
    out["grad_norm"] = gnorm
    out["skipped"] = skipped
    out["lr"] = lr
    if "moe_layers" in counts:
        c = counts["moe_layers"].astype(jnp.float32)
        out["expert_load/max_over_mean"] = jnp.max(c.max(-1) / jnp.maximum(c.mean(-1), 1.0))
        out["expert_load/min_over_mean"] = jnp.min(c.min(-1) / jnp.maximum(c.mean(-1), 1.0))
    for k in (k for k in counts if k.startswith("mtp_")):  # each MTP module's own router (its own bias)
        c = counts[k].astype(jnp.float32)
        out[f"expert_load/{k}_max_over_mean"] = c.max() / jnp.maximum(c.mean(), 1.0)
    return out


@functools.lru_cache(maxsize=8)
def step_fns(
    cfg: ModelConfig, ocfg: OptimConfig, *, mtp_lambda: float, balance_alpha: float, bias_gamma: float, mesh=None
):
    """(jitted train_step, jitted eval_step, use_mtp, optimizer). Cached on the things that shape the step,
    so repeated train() calls in one process (tests, notebooks, benchmarks) reuse compiled code. With a mesh, the
    steps keep params and optimizer state in their rule-table layout and trace with the mesh bound
    (sharding/state.py).

    train_step(params, opt_state, step, batch) -> (params, opt_state, metrics): batch leaves are
    [grad_accum, rows, ...]; eval_step(params, batch) -> (summed nats, token count)."""
    model = DeepSeekV3(cfg)
    tx, sched = make_optimizer(ocfg), lr_schedule(ocfg)
    use_mtp = bool(mtp_lambda) and cfg.num_nextn_predict_layers > 0

    def loss_fn(params, mb):
        # The logits the model also returns are unused, so XLA drops them: the head runs inside the fused CE.
        aux = model.apply({"params": params}, mb["inputs"], mb["positions"], mb["segment_ids"], mtp=use_mtp).aux
        with jax.named_scope("loss"):
            loss, m = lm_loss(
                aux["hidden"],
                head_weight(params, cfg),
                mb["targets"],
                mb["loss_mask"],
                aux,
                mb["segment_ids"],
                mtp_lambda=mtp_lambda if use_mtp else 0.0,
                balance_alpha=balance_alpha,
            )
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
            zeros = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: (jax.grad(lambda p: loss_fn(p, first)[0])(params), *loss_fn(params, first)[1])),
            )
            (g, m, counts), _ = jax.lax.scan(micro, zeros, batch)
            g = jax.tree.map(lambda x: x / accum, g)
            m = {k: v / accum if k.startswith("loss/") else v for k, v in m.items()}
        with jax.named_scope("optimizer"):
            params, opt_state, gnorm, skipped = guarded_update(
                tx, g, opt_state, params, m["loss/total"], after=lambda p: update_router_bias(p, counts, bias_gamma)
            )
        return params, opt_state, _step_metrics(m, counts, gnorm, skipped, sched(step))

    def eval_step(params, batch):
        aux = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]).aux
        _, nats, count = fused_cross_entropy(
            aux["hidden"], head_weight(params, cfg), batch["targets"], batch["loss_mask"]
        )
        return nats, count

    return (
        jit_train_step(train_step, cfg, tx, mesh, extra_outputs=1),
        jit_forward(eval_step, mesh, replicate_outputs=True),
        use_mtp,
        tx,
    )


def evaluate(eval_step, params, batches, mesh=None) -> dict[str, float]:
    """Mean loss per token, bits per byte and token count of `params` over the fixed eval batches."""
    nats = tokens = nbytes = 0.0
    for b in batches:
        n, c = eval_step(params, shard_batch(mesh, {k: v for k, v in b.items() if k != "num_bytes"}))
        nats, tokens, nbytes = nats + float(n), tokens + float(c), nbytes + float(np.sum(b["num_bytes"]))
    return {"loss": nats / max(tokens, 1.0), "bits_per_byte": nats / math.log(2) / max(nbytes, 1.0), "tokens": tokens}
