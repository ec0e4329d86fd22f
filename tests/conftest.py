"""Shared fixtures: tiny random HF checkpoints (transformers), randomised dsjax params, a small pretraining corpus
and config."""

from __future__ import annotations

import os

from experiments.libtpu_env import set_compile_only_defaults

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: LLVM optimisation buys nothing at run time and doubles XLA's CPU compile time.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
if os.environ.get("FP8_TEST_REAL_GPU") == "1":
    # The FP8 layer tests compare two XLA paths that round the same values to bf16 before quantizing them. On GPUs
    # XLA drops a bf16 round trip inside a fusion (its excess-precision rule), so a path that never writes its bf16
    # array quantizes the float32 value while the other quantizes the rounded one: codes one e4m3 step apart, 1.4%
    # in the output on an H100 (experiments/BENCHMARKS.md, nineteenth FP8 session). Keep the programs' roundings.
    os.environ["XLA_FLAGS"] += " --xla_allow_excess_precision=false"
    # The compiled kernels need the GPU backend. Left unset, the compile-only defaults below pick the CPU, whose
    # backend refuses every non-interpret Pallas call ("Only interpret mode is supported on CPU backend"): each
    # compiled-kernel test then fails without running (BENCHMARKS.md, twenty-eighth FP8 session)
    os.environ.setdefault("JAX_PLATFORMS", "cuda")
# Subprocess tests (kill / resume / SIGTERM) compile the same train step as in-process runs: share the work.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dsjax-test-jax-cache-{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests run on the CPU. With libtpu installed (for the AOT compiles of test_tpu_aot.py, which still work) JAX
# would otherwise try to start a TPU in every process, and print why it cannot; libtpu compiles only.
set_compile_only_defaults()

import jax  # noqa: E402 - after the environment above
import jax.numpy as jnp  # noqa: E402 - after the environment above
import numpy as np  # noqa: E402 - after the environment above
import pytest  # noqa: E402 - after the environment above

import dsjax  # noqa: E402 - after the environment above

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}


def hf_v3_config(**kw):
    from transformers import DeepseekV3Config

    args = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        max_position_embeddings=512,
        num_mtp_layers=0,
        rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    args.update(kw)
    return DeepseekV3Config(**args)


def hf_v2_config(**kw):
    from transformers import DeepseekV2Config

    args = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        norm_topk_prob=False,
        max_position_embeddings=512,
        rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    args.update(kw)
    return DeepseekV2Config(**args)


def randomize_torch(model, seed=0):
    """All weights random (norms around 1), router correction bias non-zero: nothing is left at its init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def randomize_params(params, seed=0, std=0.3):
    """Every leaf random (NumPy, fast; only shapes/dtypes of `params` are used); norms ~ 1 + noise."""
    rng = np.random.RandomState(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "norm" in name:
            val = 1.0 + 0.2 * noise
        elif "e_score_correction_bias" in name:
            val = 0.1 * noise
        else:
            val = std * noise
        out.append(jnp.asarray(val, x.dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def param_shapes(cfg):
    model = dsjax.DeepSeekV3(cfg)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0))


def build_hf(tmp_path_factory, cfg, cls_name, seed, name):
    import transformers

    cls = getattr(transformers, cls_name)
    cfg._attn_implementation = "eager"
    model = randomize_torch(cls(cfg).eval(), seed)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def hf_v3(tmp_path_factory):
    return build_hf(tmp_path_factory, hf_v3_config(), "DeepseekV3ForCausalLM", 0, "hf_v3")


@pytest.fixture(scope="session")
def hf_v2(tmp_path_factory):
    return build_hf(tmp_path_factory, hf_v2_config(), "DeepseekV2ForCausalLM", 1, "hf_v2")


@pytest.fixture(scope="session")
def tiny_cfg():
    return dsjax.ModelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return randomize_params(param_shapes(tiny_cfg), seed=1, std=0.15)


def tokens(batch, length, vocab, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A glob of 40 small random-word text files: a pretraining corpus that loads in no time."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = ["def", "return", "class", "import", "self", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(40):
        (d / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, rng.randint(20, 200))))
    return str(d / "*.txt")


def small_config(corpus, **train):
    """The default pretraining config shrunk to a few seconds' run on `corpus`; `train` overrides config.train."""
    from experiments.configs import tiny

    c = tiny.get_config()
    c.model.num_hidden_layers = 2
    c.data.spec = corpus
    c.data.seq_len, c.data.batch_size = 32, 4
    c.optim.schedule, c.optim.warmup_steps = "constant", 0  # per-step math independent of total steps
    c.train.update(dict(steps=6, log_every=1, eval_every=1000, eval_batches=2, save_every=3, tensorboard=False))
    c.train.update(train)
    return c
