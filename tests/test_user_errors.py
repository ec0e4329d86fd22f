"""A user's mistake is one line naming the flag or field, exit status 2, before anything compiles; a diverging run
stops with a clear message and keeps only finite checkpoints; library INFO logs stay out of a run's output."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import dsjax
from dsjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "first step done" not in r.stdout and "warm start" not in r.stdout  # refused before compiling


@pytest.mark.parametrize(
    "override, flag",
    [
        ("train.save_every=0", "--config.train.save_every"),
        ("train.log_every=0", "--config.train.log_every"),
        ("train.grad_accum=0", "--config.train.grad_accum"),
        ("train.keep=0", "--config.train.keep"),
        ("optim.warmup_steps=-1", "--config.optim.warmup_steps"),
        ("model.num_experts_per_tok=99", "--config.model.num_experts_per_tok"),
        ("train.bogus=1", "--config.train.bogus"),
        ("train.steps=abc", "--config.train.steps"),
    ],
)
def test_pretrain_refuses_bad_config_in_one_line(tmp_path, override, flag):
    workdir = tmp_path / "run"
    assert_one_line_error(script("pretrain.py", f"--workdir={workdir}", f"--config.{override}"), flag)
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.parametrize(
    "override, flag",
    [
        ("grpo.loss_type=nope", "--config.grpo.loss_type"),
        ("rewards.bogus=1.0", "--config.rewards.bogus"),
        ("grpo.mu=0", "--config.grpo.mu"),
    ],
)
def test_grpo_refuses_bad_config_before_the_warm_start(tmp_path, override, flag):
    assert_one_line_error(script("grpo.py", f"--workdir={tmp_path / 'run'}", f"--config.{override}"), flag)


def test_hf_config_missing_fields_is_an_error():
    d = dsjax.ModelConfig.preset("tiny").to_hf()
    for field in ("hidden_size", "num_experts_per_tok"):
        with pytest.raises(ConfigError, match=field):
            dsjax.ModelConfig.from_hf({k: v for k, v in d.items() if k != field})


def test_generating_past_max_position_embeddings_is_refused(tiny_cfg, tiny_params):
    prompt = [[5] * (tiny_cfg.max_position_embeddings - 10)]
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        dsjax.generate(tiny_cfg, tiny_params, prompt, dsjax.SamplingConfig(max_new_tokens=64))


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_finite_checkpoints(tmp_path):
    """Resuming with a learning rate that blows the model up (the issue's --config.optim.lr=1e30): the non-finite
    steps are not applied, the run stops with exit 2 after max_skipped_steps of them, and every kept checkpoint
    holds finite parameters."""
    from dsjax.train.checkpoint_io import load_for_inference

    workdir = str(tmp_path / "run")
    common = [
        f"--workdir={workdir}",
        "--config.model.num_hidden_layers=2",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
        "--config.train.eval_every=1000",
        "--config.train.eval_batches=1",
        "--config.train.save_every=1",
        "--config.train.log_every=1",
        "--config.train.tensorboard=False",
    ]
    assert script("pretrain.py", *common, "--config.train.steps=2").returncode == 0
    r = script(
        "pretrain.py",
        *common,
        "--config.train.steps=20",
        "--config.optim.lr=1e30",
    )
    assert r.returncode == 2 and "training diverged" in r.stderr, r.stderr[-2000:]
    assert "update skipped" in r.stdout
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps and max(steps) < 20
    for step in steps:
        _, params = load_for_inference(os.path.join(workdir, "checkpoints", str(step)))
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params)), step


def test_a_short_run_prints_no_library_logs(tmp_path):
    r = script(
        "pretrain.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.steps=2",
        "--config.train.log_every=1",
        "--config.model.num_hidden_layers=2",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
        "--config.train.eval_batches=1",
        "--config.train.tensorboard=False",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = (r.stdout + r.stderr).splitlines()
    assert not [line for line in out if line[:1] in "IW" and line[1:5].isdigit()], out  # absl / Orbax INFO lines
    assert len(out) <= 10, out
