"""Pretraining: resume exactness, crash safety, signals, packing isolation, bias update, loss weights, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsjax
from dsjax.errors import ConfigError
from dsjax.model import head_weight
from dsjax.train.losses import lm_loss
from dsjax.train.optim import (
    OptimConfig,
    lr_schedule,
    make_optimizer,
    param_labels,
    scale_by_adam_stored_as,
    update_router_bias,
)
from experiments.configs import tiny
from tests.conftest import param_shapes, randomize_params, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = ["def", "return", "class", "import", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, rng.randint(20, 200))))
    return str(d / "*.txt")


def small_config(corpus, **train):
    c = tiny.get_config()
    c.model.num_hidden_layers = 2
    c.data.spec = corpus
    c.data.seq_len, c.data.batch_size = 32, 4
    c.optim.schedule, c.optim.warmup_steps = "constant", 0  # per-step math independent of total steps
    c.train.update(dict(steps=6, log_every=1, eval_every=1000, eval_batches=2, save_every=3, tensorboard=False))
    c.train.update(train)
    return c


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def cli(config_overrides: dict, workdir: str) -> list[str]:
    args = [sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"), f"--workdir={workdir}"]
    for k, v in config_overrides.items():
        args.append(f"--config.{k}={v}")
    return args


def flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.slow
def test_resume_after_kill_is_exact(corpus, tmp_path):
    from dsjax.train.trainer import train

    straight = str(tmp_path / "straight")
    train(small_config(corpus), straight)
    want = read_losses(straight)
    assert sorted(want) == list(range(1, 7))

    # Same run in a subprocess, slowed by an eval every step, SIGKILLed once checkpoint 3 has committed.
    killed = str(tmp_path / "killed")
    c = small_config(corpus, eval_every=1, eval_batches=64)
    proc = subprocess.Popen(cli(flat(c), killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed, "checkpoints", "3", "commit_success.txt")
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(marker)
    got_before = read_losses(killed)
    assert max(got_before) < 6, "the process finished before it was killed; the test did not test a resume"

    summary = train(small_config(corpus), killed)
    assert summary["step"] == 6
    got = read_losses(killed)  # the resumed run appends steps after its restore point
    for step in range(4, 7):
        assert got[step] == want[step], (step, got[step], want[step])


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path):
    script = f"""
import os, jax.numpy as jnp
from dsjax.train.checkpoint import Checkpointer
ck = Checkpointer({str(tmp_path)!r}, keep=3, async_save=True)
small = {{"w": jnp.ones((4, 4))}}
ck.save(1, small, {{"m": jnp.zeros(3)}}, jnp.zeros(2, jnp.uint32), {{"it": 1}}, {{"model": {{}}}})
ck.wait()
big = {{"w": jnp.ones((64, 1024, 1024))}}  # 256 MB: still being written when the process dies
ck.save(2, big, {{"m": jnp.zeros(3)}}, jnp.zeros(2, jnp.uint32), {{"it": 2}}, {{"model": {{}}}})
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=300)
    from dsjax.train.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path), keep=3)
    assert ck.latest_step() == 1
    params, opt, meta, data = ck.restore(1, {"w": jnp.zeros((4, 4))}, {"m": jnp.zeros(3)})
    np.testing.assert_array_equal(params["w"], np.ones((4, 4)))
    assert meta["step"] == 1 and data == {"it": 1}
    ck.close()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    workdir = str(tmp_path / "term")
    c = small_config(corpus, steps=100000, save_every=100000)
    proc = subprocess.Popen(
        cli(flat(c), workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while (not os.path.exists(metrics) or not read_losses(workdir)) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert steps and max(steps) == max(read_losses(workdir))
    from dsjax.train.checkpoint_io import load_for_inference

    cfg, params = load_for_inference(workdir)
    assert cfg.num_hidden_layers == 2 and "moe_layers" in params


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


def test_bad_inputs_get_clear_errors(corpus, tmp_path):
    from dsjax.train.trainer import train

    c = small_config(corpus)
    c.data.spec = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        train(c, str(tmp_path / "w1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    c = small_config(corpus)
    c.data.spec = str(empty / "*.txt")
    with pytest.raises(ValueError, match="empty"):
        train(c, str(tmp_path / "w2"))
    c = small_config(corpus)
    c.data.seq_len = 5000
    with pytest.raises(ValueError, match="seq_len=5000 exceeds the model's max_position_embeddings=1024"):
        train(c, str(tmp_path / "w3"))


@pytest.mark.slow
def test_resume_with_incompatible_config_is_refused(corpus, tmp_path):
    from dsjax.train.trainer import train

    workdir = str(tmp_path / "w")
    train(small_config(corpus), workdir)
    before = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    c = small_config(corpus, steps=12)
    c.model.num_hidden_layers = 3
    with pytest.raises(ValueError, match=r"different model config.*num_hidden_layers: checkpoint 2 vs now 3"):
        train(c, workdir)
    after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs}
    assert before == after


def test_resume_may_change_runtime_knobs(corpus, tmp_path):
    """A runtime knob (dsjax.config.RUNTIME_FIELDS) is not the model: resuming with another value continues."""
    from dsjax.train.trainer import train

    workdir = str(tmp_path / "w")

    def config(steps):
        c = small_config(corpus, steps=steps, eval_batches=1)
        c.model.num_hidden_layers, c.model.num_nextn_predict_layers = 1, 0  # small programs: each run compiles
        return c

    assert train(config(2), workdir)["step"] == 2
    c = config(4)
    c.model.decode_attention_impl = "contiguous"  # used to be refused as "a different model config"
    summary = train(c, workdir)
    assert summary["step"] == 4 and sorted(summary["train_losses"]) == [3, 4]
    assert sorted(read_losses(workdir)) == [1, 2, 3, 4]


def _scribble(step_dir: str, seed: int = 0):
    """4 KiB of random bytes into the middle of the largest params data file of a checkpoint step."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.RandomState(seed).bytes(4096))


def test_corrupt_checkpoint_falls_back_and_generate_refuses_it(corpus, tmp_path):
    """Bit rot in the newest checkpoint: resume says so in one line, moves it aside (not deleted) and resumes from
    the newest intact step; sampling from the corrupt step refuses in one line (exit 2)."""
    from dsjax.train.trainer import train

    workdir = str(tmp_path / "w")

    def config(steps):
        c = small_config(corpus, steps=steps, eval_batches=1, save_every=2, async_save=False)
        c.model.num_hidden_layers, c.model.num_nextn_predict_layers = 1, 0
        return c

    assert train(config(4), workdir)["step"] == 4
    ckpts = os.path.join(workdir, "checkpoints")
    _scribble(os.path.join(ckpts, "4"))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "generate.py"),
            f"--checkpoint={ckpts}/4",
            "--prompt=def ",
            "--max_new_tokens=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "step" in err[0] and "corrupt" in err[0], r.stderr[-2000:]
    summary = train(config(6), workdir)
    assert summary["step"] == 6 and sorted(summary["train_losses"]) == [3, 4, 5, 6]  # resumed from step 2
    assert os.path.isdir(os.path.join(ckpts, "4.corrupt"))  # kept for inspection, never deleted


def test_resume_with_other_data_is_refused_unless_allowed(corpus, tmp_path):
    """The checkpoint's data position is only meaningful for its data settings: another data.spec is refused,
    naming the field, before anything runs; allow_data_change continues with the new data from its start."""
    from dsjax.errors import ConfigError
    from dsjax.train.trainer import train

    workdir = str(tmp_path / "w")

    def config(steps, spec):
        c = small_config(corpus, steps=steps, eval_batches=1)
        c.model.num_hidden_layers, c.model.num_nextn_predict_layers = 1, 0
        c.data.spec = spec
        return c

    assert train(config(2, corpus), workdir)["step"] == 2
    other = corpus.replace("*.txt", "doc0*.txt")
    with pytest.raises(ConfigError, match=r"--config\.data\.spec: checkpoint .* vs now"):
        train(config(4, other), workdir)
    c = config(4, other)
    c.train.allow_data_change = True
    assert train(c, workdir)["step"] == 4


def test_second_run_on_a_locked_workdir_is_refused(corpus, tmp_path):
    from dsjax.train.lock import WorkdirLock

    workdir = str(tmp_path / "w")
    with WorkdirLock(workdir):  # this process holds the workdir, as a running training job would
        r = subprocess.run(
            cli(flat(small_config(corpus)), workdir), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and f"pid {os.getpid()}" in err[0], r.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints")
    )


def test_plot_metrics_draws_png(tmp_path):
    rows = [{"step": s, "split": "train", "time": 0, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 6)]
    rows += [{"step": 5, "split": "eval", "time": 0, "bits_per_byte": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "m.png"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "plot_metrics.py"), f"--workdir={tmp_path}", f"--out={out}"],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_compares_runs(tmp_path):
    """Two runs: the table gives each one's last value and end-of-run mean, relative to the first run's."""
    for name, scale in (("a", 1.0), ("b", 1.1)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "split": "train", "time": 0, "loss": scale * 10.0 / s} for s in range(1, 11)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "plot_metrics.py"),
            f"--workdir={tmp_path / 'a'},{tmp_path / 'b'}",
            f"--out={tmp_path / 'c.png'}",
            "--window=2",
        ],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    rows = [line for line in r.stdout.splitlines() if line.startswith("| loss |")]
    assert len(rows) == 2 and "| 1 (10) | +0.00% | 1.056 | +0.00% |" in rows[0]  # (10/9 + 10/10) / 2
    assert "| 1.1 (10) | +10.00% | 1.161 | +10.00% |" in rows[1]
