"""The pretraining step's parts: packing isolation, router bias update (per optimizer step under grad
accumulation), optimizer labels and moments, LR schedule, loss weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsjax
from dsjax.errors import ConfigError
from dsjax.model import head_weight
from dsjax.train.losses import lm_loss
from dsjax.train.metrics import MetricsLogger
from dsjax.train.optim import (
    OptimConfig,
    lr_schedule,
    make_optimizer,
    param_labels,
    scale_by_adam_stored_as,
    update_router_bias,
)
from tests.conftest import param_shapes, randomize_params, small_config, tokens


def test_packed_documents_do_not_see_each_other(tiny_cfg, tiny_params):
    model = dsjax.DeepSeekV3(tiny_cfg)
    a, b = tokens(1, 7, tiny_cfg.vocab_size, seed=1), tokens(1, 9, tiny_cfg.vocab_size, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    run = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg).logits)
    both = run(tiny_params, packed, pos, seg)
    alone = run(tiny_params, b, jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32))
    np.testing.assert_allclose(both[:, 7:], alone, atol=1e-5)
    # and document B's tokens really can change A's logits when not separated (the mask is what isolates them)
    joined = run(tiny_params, packed, jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32))
    assert float(jnp.abs(joined[:, 7:] - alone).max()) > 1e-3


def test_router_bias_update_rule():
    params = {
        "moe_layers": {"mlp": {"gate": {"e_score_correction_bias": jnp.zeros((2, 4)), "kernel": jnp.ones((2, 3, 4))}}},
        "mtp_0": {"block": {"mlp": {"gate": {"e_score_correction_bias": jnp.zeros(4)}}}},
    }
    counts = {"moe_layers": jnp.array([[10, 0, 5, 5], [5, 5, 5, 5]]), "mtp_0": jnp.array([1, 2, 3, 6])}
    out = update_router_bias(params, counts, 0.01)
    np.testing.assert_allclose(
        out["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"], [[-0.01, 0.01, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    np.testing.assert_allclose(
        out["mtp_0"]["block"]["mlp"]["gate"]["e_score_correction_bias"], [0.01, 0.01, 0.0, -0.01]
    )  # mean load 3
    np.testing.assert_array_equal(out["moe_layers"]["mlp"]["gate"]["kernel"], 1.0)


def test_optimizer_freezes_router_bias_and_skips_norm_decay(tiny_cfg):
    params = randomize_params(param_shapes(tiny_cfg), seed=4)
    labels = param_labels(params)
    assert labels["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] == "bias"
    assert labels["norm"]["weight"] == "no_decay"
    assert labels["moe_layers"]["mlp"]["experts_gate_up_proj"] == "decay"
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.5))
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
    updates = update(jax.tree.map(jnp.ones_like, params), params)
    assert float(jnp.abs(updates["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]).max()) == 0.0
    # zero gradient: a decayed matrix still moves (weight decay), a norm weight does not
    updates = update(jax.tree.map(jnp.zeros_like, params), params)
    assert float(jnp.abs(updates["lm_head"]).max()) > 0
    assert float(jnp.abs(updates["norm"]["weight"]).max()) == 0.0


def test_bf16_moments_track_float32_adamw(tiny_cfg):
    """moment_dtype=bfloat16 stores both AdamW moments in bf16 (half the state) and stays within bf16 rounding
    of optax's float32 AdamW over 10 steps; stored as float32 it is optax's update to float32 rounding."""
    params = randomize_params(param_shapes(tiny_cfg), seed=5)
    grads = [jax.jit(lambda p, i=i: jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 1e-2, p))(params) for i in range(10)]

    def run(tx):
        state, ups = tx.init(params), []
        update = jax.jit(tx.update)
        for g in grads:
            u, state = update(g, state, params)
            ups.append(u)
        return ups, state

    ref, _ = run(make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10)))
    low, state = run(make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10, moment_dtype="bfloat16")))
    moments = [x for x in jax.tree.leaves(state) if x.ndim >= 1]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments if x.size > 1)
    for a, b in zip(jax.tree.leaves(ref[-1]), jax.tree.leaves(low[-1])):
        scale = float(jnp.abs(a).max()) or 1.0
        assert float(jnp.abs(a - b).max()) <= 2e-2 * scale
    ours, theirs = scale_by_adam_stored_as("float32", 0.9, 0.95, 1e-8), optax.scale_by_adam(0.9, 0.95, 1e-8)
    u, _ = jax.jit(ours.update)(grads[0], ours.init(params), params)
    v, _ = jax.jit(theirs.update)(grads[0], theirs.init(params))
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="moment_dtype"):
        OptimConfig(moment_dtype="float16")


def test_lr_schedule_warmup_then_cosine():
    s = lr_schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(9)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-2)
    assert float(s(110)) == pytest.approx(0.1, abs=1e-6)


def test_loss_weights(tiny_cfg, tiny_params):
    tok = tokens(2, 17, tiny_cfg.vocab_size, seed=3)
    aux = jax.jit(lambda p, t: dsjax.DeepSeekV3(tiny_cfg).apply({"params": p}, t, mtp=True).aux)(
        tiny_params, tok[:, :-1]
    )
    mask = jnp.ones(tok[:, 1:].shape)
    head = head_weight(tiny_params, tiny_cfg)
    base, m0 = lm_loss(aux["hidden"], head, tok[:, 1:], mask, aux)
    full, m = lm_loss(aux["hidden"], head, tok[:, 1:], mask, aux, mtp_lambda=0.3, balance_alpha=0.01)
    assert float(base) == pytest.approx(float(m["loss/main"]))
    want = m["loss/main"] + 0.3 * m["loss/mtp_1"] + 0.01 * jnp.sum(aux["balance_loss"])
    assert float(full) == pytest.approx(float(want), rel=1e-6)


def test_bias_update_uses_whole_step_counts(corpus, tmp_path):
    """With grad accumulation the bias moves once per optimizer step, by the counts of all micro-batches."""
    from dsjax.train.loop import model_config
    from dsjax.train.step import make_step_fns

    c = small_config(corpus, grad_accum=2, bias_gamma=0.5, mtp_lambda=0.0)
    c.model.num_nextn_predict_layers = 0  # a smaller program to compile; MTP routers are covered elsewhere
    cfg = model_config(c)
    c.train.steps = 10  # the schedule's length
    step_fn, _, _, tx = make_step_fns(cfg, c)
    params = randomize_params(param_shapes(cfg), seed=5, std=0.1)
    b = {
        "inputs": tokens(4, 32, 259, seed=6),
        "positions": jnp.broadcast_to(jnp.arange(32), (4, 32)),
        "segment_ids": jnp.ones((4, 32), jnp.int32),
        "loss_mask": jnp.ones((4, 32)),
    }
    b["targets"] = jnp.roll(b["inputs"], -1, axis=1)
    aux = jax.jit(
        lambda p, b: dsjax.DeepSeekV3(cfg).apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"]).aux
    )(params, b)
    counts = np.asarray(aux["expert_counts"], np.float64)
    want = np.sign(counts.mean(-1, keepdims=True) - counts) * 0.5
    before = np.asarray(params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"])
    accumulated = jax.tree.map(lambda x: x.reshape((2, 2) + x.shape[1:]), b)  # [grad_accum, rows, ...]
    new, _, _ = step_fn(params, tx.init(params), jnp.int32(0), accumulated)
    after = np.asarray(new["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"])
    np.testing.assert_allclose(after - before, want, atol=1e-6)


def test_console_line_shows_expert_load(tmp_path, capsys):
    """The progress line names the worst layer's expert load, so a collapsed router is visible while training."""
    logger = MetricsLogger(str(tmp_path), 100, tensorboard=False)
    logger.log(
        10, {"loss": 2.5, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_sec": 5e3, "expert_load/max_over_mean": 10.66}
    )
    logger.log(20, {"loss": 2.4, "grad_norm": 0.5, "lr": 1e-3, "tokens_per_sec": 5e3})
    logger.close()
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "| expert max/mean 10.7 | 5.0k tok/s" in first
    assert "expert max/mean" not in second and "| 5.0k tok/s" in second
