"""Pretraining runs: resume exactness, crash safety, signals, corrupt checkpoints, config and data changes on
resume, workdir locks, input errors, metric plots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from tests.ckpt_damage import scribble
from tests.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        row = [r for r in map(json.loads, f) if r["split"] == "train"][-1]
    # the MoE layers' and the MTP module's routers each get their load spread logged (max / mean >= 1)
    assert row["expert_load/max_over_mean"] >= 1.0 and row["expert_load/mtp_0_max_over_mean"] >= 1.0

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
    scribble(os.path.join(ckpts, "4"))
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


def test_plot_metrics_compares_groups(tmp_path):
    """--group: each group's mean of its runs' end-of-run means, the spread within it and the gap to the first
    group; metrics files passed directly; --until drops the records past a step."""
    paths = []
    for name, scale in (("a1", 1.0), ("a2", 1.2), ("b1", 1.1), ("b2", 1.3)):
        rows = [{"step": s, "split": "train", "time": 0, "loss": scale * 10.0 / s} for s in range(1, 13)]
        rows.append({"step": 12, "split": "eval", "time": 0, "bits_per_byte": scale})
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        paths.append(str(tmp_path / f"{name}.jsonl"))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "plot_metrics.py"), f"--workdir={','.join(paths)}"]
    cmd += [f"--out={tmp_path / 'g.png'}", "--window=2", "--until=10", "--keys=loss,eval/bits_per_byte"]
    r = subprocess.run(cmd + ["--group=a,a,b,b"], check=True, timeout=120, capture_output=True, text=True)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| loss | ") and " | 2 | " in line]
    # a: (1.0 + 1.2) / 2 x (10/9 + 10/10) / 2 = 1.161, runs 18.18% apart; b: 1.2 x 1.056 = 1.267, 16.67%, +9.09%;
    # each group's standard deviation 0.2 x 1.056 / sqrt(2) = 0.1493, so the gap's standard error 0.1493 / 1.161
    assert rows == [
        "| loss | a | 2 | 1.161 | 18.18% | +0.00% |  |",
        "| loss | b | 2 | 1.267 | 16.67% | +9.09% | 12.86% |",
    ]
    assert not any(line.startswith("| eval/bits_per_byte |") for line in r.stdout.splitlines())  # past --until
    r = subprocess.run(cmd + ["--group=a,a,b,c"], check=True, timeout=120, capture_output=True, text=True)
    assert "| loss | c | 1 | 1.372 | n/a | +18.18% | n/a |" in r.stdout  # one run: no spread, no standard error
    bad = subprocess.run(cmd + ["--group=a,b"], timeout=120, capture_output=True, text=True)
    assert bad.returncode != 0 and "--group names 2 groups for 4 --workdir entries" in bad.stderr
    twice = [sys.executable, os.path.join(ROOT, "experiments", "plot_metrics.py"), f"--workdir={paths[0]},{paths[0]}"]
    bad = subprocess.run(twice, timeout=120, capture_output=True, text=True)
    assert bad.returncode != 0 and "--workdir names a run twice" in bad.stderr
