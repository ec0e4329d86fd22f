"""GRPO trainer pieces: rewards, prompt limits, rollouts and log-probs, inner iterations and clipping, masking,
dynamic sampling, checkpoint resume. Small shapes throughout, so the whole file compiles a handful of programs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.rl import run as grpo_run
from dsjax.rl import trainer as grpo_trainer
from dsjax.rl import warm_start
from dsjax.rl.rewards import Sample, WeightedReward, digit_credit, digits_then_eos, exact_answer, score
from dsjax.rl.rollout import Rollout, completion_logprobs, encode_prompts, sample_rollouts, training_mask
from dsjax.rl.tasks import RL_STREAM, AdditionTask
from dsjax.sampling import SamplingConfig
from dsjax.tokenizer import ByteTokenizer
from dsjax.train.optim import OptimConfig
from experiments.configs import grpo as grpo_config

TOK = ByteTokenizer()
G, P, N = 4, 6, 4


@pytest.fixture(scope="module")
def cfg():
    return dsjax.ModelConfig.preset("tiny", vocab_size=259, num_nextn_predict_layers=0, num_hidden_layers=2)


@pytest.fixture(scope="module")
def params(cfg):
    return warm_start.init_fn(cfg)(jax.random.key(0))


@pytest.fixture(scope="module")
def rollout(cfg, params):
    prompts = encode_prompts(TOK, ["1+2=", "34+5="], P)
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=N, stop_tokens=(TOK.eos_id,), pad_token=TOK.pad_id)
    return sample_rollouts(cfg, params, prompts, sampling, jax.random.key(1), G, P)


def test_rewards_are_weighted_and_a_failing_reward_scores_zero_and_is_counted():
    samples = [
        Sample("1+2=", "3", "3", True),
        Sample("1+2=", "4", "3", True),
        Sample("1+2=", "3", "3", False),
        Sample("9+9=", "18x", "18", True),
    ]

    def picky(s):
        if s.completion == "4":
            raise RuntimeError("cannot parse")
        return float("nan") if "x" in s.completion else 1.0

    rewards = [
        WeightedReward("correct", exact_answer, 1.0),
        WeightedReward("picky", picky, 0.5),
        WeightedReward("format", digits_then_eos, 0.1),
    ]
    sc = score(rewards, samples)
    np.testing.assert_array_equal(sc.per_fn["correct"], [1, 0, 0, 0])
    np.testing.assert_array_equal(sc.per_fn["picky"], [1, 0, 1, 0])  # the raise and the NaN both score 0
    np.testing.assert_array_equal(sc.per_fn["format"], [1, 1, 0, 0])  # truncated, or not only digits
    np.testing.assert_allclose(sc.total, [1.6, 0.1, 0.5, 0.0], rtol=1e-6)
    assert sc.errors == {"correct": 0, "picky": 2, "format": 0}
    assert "cannot parse" in sc.first_error["picky"]
    m = sc.metrics()
    assert m["reward/picky/errors"] == 2 and m["reward/correct/mean"] == 0.25
    assert digit_credit(Sample("", "168", "178", True)) == pytest.approx(2 / 3)
    assert digit_credit(Sample("", "1680", "168", True)) == 0.0  # every place shifted
    with pytest.raises(ValueError, match="unique"):
        score(rewards + rewards[:1], samples)


def test_prompt_longer_than_the_limit_is_a_clear_error(cfg, params, tmp_path):
    with pytest.raises(ValueError, match=r"prompt 1 \('123\+456='\) is 9 tokens, longer than max_prompt_length=6"):
        encode_prompts(TOK, ["1+2=", "123+456="], 6)
    with pytest.raises(ValueError, match="max_prompt_length=4"):
        sample_rollouts(cfg, params, [[1, 2, 3, 4, 5]], SamplingConfig(max_new_tokens=2), jax.random.key(0), 2, 4)
    c = grpo_config.get_config()
    c.rollout.max_prompt_length = 4
    with pytest.raises(ValueError, match="max_prompt_length=4"):
        grpo_trainer.train(c, str(tmp_path))


def test_task_is_deterministic_and_never_trains_on_held_out_problems():
    task = AdditionTask(max_digits=1, num_eval=40, seed=3)  # 100 possible problems: collisions are certain
    held_out = {p.prompt for p in task.eval_problems()}
    assert len(held_out) == 40
    drawn = task.problems(RL_STREAM, 7, 500)
    assert drawn == task.problems(RL_STREAM, 7, 500) and not held_out & {p.prompt for p in drawn}
    assert all(int(p.answer) == sum(map(int, p.prompt[:-1].split("+"))) for p in drawn)


def test_trainer_logprobs_equal_sampler_logprobs_in_float32(cfg, params, rollout):
    lp, ent = jax.jit(completion_logprobs, static_argnums=(0, 4, 5))(
        dsjax.DeepSeekV3(cfg), params, rollout.sequences, rollout.prompt_lengths, N, 0.7
    )
    valid = rollout.valid
    assert valid.sum() > 0 and np.all(np.asarray(ent)[valid] > 0)
    assert np.max(np.abs(np.asarray(lp) - rollout.sampler_logprobs)[valid]) < 1e-4
    # each completion sits right after its own prompt
    for i in range(len(valid)):
        n, L = rollout.prompt_lengths[i], rollout.lengths[i]
        np.testing.assert_array_equal(rollout.sequences[i, n : n + L], rollout.completions[i, :L])
        assert not rollout.sequences[i, n + L :].any()


def test_second_inner_iteration_sees_ratio_not_one_and_clips(cfg, params, rollout):
    ocfg = OptimConfig(lr=0.05, warmup_steps=0, total_steps=2, schedule="constant", weight_decay=0.0)
    update, _, tx = grpo_run.grpo_step_fns(cfg, ocfg, N, 0.7, "grpo", 0.2, 0.2, 0.0)
    adv = np.tile([1.0, -1.0], len(rollout.lengths) // 2).astype(np.float32)
    batch = {
        "sequences": rollout.sequences,
        "prompt_lengths": rollout.prompt_lengths,
        "mask": training_mask(rollout, False),
        "advantages": adv,
        "valid": rollout.valid.astype(np.float32),
        "sampler_logprobs": rollout.sampler_logprobs,
        "old_logprobs": np.zeros_like(rollout.sampler_logprobs),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    p = jax.tree.map(jnp.copy, params)
    p, opt, m1, lp = update(p, tx.init(p), jnp.int32(0), batch, jnp.bool_(True))
    assert float(m1["ratio/min"]) == float(m1["ratio/max"]) == 1.0 and float(m1["clip_ratio/region"]) == 0.0
    np.testing.assert_allclose(np.asarray(lp)[rollout.valid], rollout.sampler_logprobs[rollout.valid], atol=1e-4)
    _, _, m2, _ = update(p, opt, jnp.int32(1), {**batch, "old_logprobs": lp}, jnp.bool_(False))
    assert float(m2["ratio/max"]) > 1.2 or float(m2["ratio/min"]) < 0.8
    assert float(m2["clip_ratio/region"]) > 0.0
    assert float(m2["clip_ratio/low"]) + float(m2["clip_ratio/high"]) == pytest.approx(float(m2["clip_ratio/region"]))


def test_truncated_completions_are_masked_out():
    ro = Rollout(
        np.zeros((3, 6), np.int32),
        np.full(3, 2, np.int32),
        np.zeros((3, 4), np.int32),
        np.array([2, 4, 4], np.int32),
        np.array([True, False, True]),
        np.zeros((3, 4), np.float32),
        {},
    )
    np.testing.assert_array_equal(training_mask(ro, False), [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(training_mask(ro, True), [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(
        training_mask(ro, True, np.array([False, True, True])), [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    )


def test_dynamic_sampling_keeps_only_groups_with_reward_spread():
    rewards = np.array([1, 0, 1, 0, 0, 0, 0.5, 0.5, 0.5, 0.2, 0.2, 0.3], np.float32)
    np.testing.assert_array_equal(grpo_trainer.groups_with_spread(rewards, 3), [True, False, False, True])


def test_init_checkpoint_keeps_the_configs_runtime_knobs(cfg, params, tmp_path):
    """GRPO from a pretraining checkpoint: the checkpoint's architecture and params, but the GRPO config's runtime
    knobs (dtype, remat, kernels, MoE dispatch, ...), not the values the checkpoint was trained with."""
    from dsjax.config import RUNTIME_FIELDS
    from dsjax.train.checkpoint import Checkpointer
    from dsjax.train.checkpoint_io import model_config_dict

    ck = Checkpointer(str(tmp_path / "pre"), keep=1, async_save=False)
    ck.save(
        1,
        params,
        {"unused": np.zeros((), np.int32)},
        np.zeros(2, np.uint32),
        {"position": 0},
        {"model": model_config_dict(cfg)},
        force=True,
    )
    ck.close()
    runtime = {
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "platform": "cpu",
        "moe_backend": "dense",
        "remat": "full",
        "attention_impl": "xla",
        "decode_attention_impl": "contiguous",
        "moe_capacity_factor": 1.25,
        "moe_device_limit": 1,
        "moe_dispatch": "ragged",
        "document_mask": False,
        "unroll_layers": True,
        "fp8": "e4m3",
        "fp8_backend": "gpu",
        "fp8_wgrad": "none",
        "fp8_layers": "experts",
    }
    assert set(runtime) == set(RUNTIME_FIELDS), "a new runtime knob: give it a non-default value here"
    assert all(getattr(cfg, k) != v for k, v in runtime.items())  # the checkpoint holds other values throughout
    c = grpo_config.get_config()
    c.init_checkpoint = str(tmp_path / "pre")
    c.model.update(runtime)
    c.model.num_hidden_layers = 3  # architecture: the checkpoint's wins
    got, init = grpo_run.initial_policy(c, jax.devices()[:1])
    assert {k: getattr(got, k) for k in RUNTIME_FIELDS} == runtime
    assert got.num_hidden_layers == cfg.num_hidden_layers == 2
    np.testing.assert_array_equal(init["lm_head"], params["lm_head"])


def small_config(steps: int, **grpo):
    c = grpo_config.get_config()
    c.model.num_hidden_layers = 2
    c.task.max_digits, c.task.num_eval = 1, 8
    c.sft.update(steps=30, batch_size=16, log_every=10)
    c.rollout.update(num_prompts=2, num_samples=G)
    c.grpo.update(steps=steps, **grpo)
    c.train.update(log_every=1, save_every=1, tensorboard=False, async_save=False)
    return c


def train_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def test_resume_continues_the_step_count_and_matches_a_straight_run(tmp_path, capsys):
    kw = dict(mu=2, beta=0.04, dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    straight = grpo_trainer.train(small_config(3, **kw), str(tmp_path / "straight"))
    assert straight["step"] == 3
    work = str(tmp_path / "resumed")
    assert grpo_trainer.train(small_config(2, **kw), work)["step"] == 2
    capsys.readouterr()
    resumed = grpo_trainer.train(small_config(3, **kw), work)
    out = capsys.readouterr().out
    assert "warm start: reusing" in out and "resumed GRPO from" in out and resumed["step"] == 3
    assert resumed["pass@1/before"] == straight["pass@1/before"]
    rows = train_rows(work)
    assert [r["step"] for r in rows] == [1, 2, 3]
    want = train_rows(str(tmp_path / "straight"))[-1]
    for k in ("reward/mean", "loss", "kl", "clip_ratio/region", "dynamic/kept_groups"):
        assert rows[-1][k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert rows[-1]["logprob_gap"] < 1e-4 and "reward/correct/errors" in rows[-1]
