"""The `small` preset (1.48B params, 339M active; BASELINES.md's model + MTP depth 1) on one GPU, bf16 compute."""

import ml_collections

from dsjax.train.loop import model_config_section
from experiments.configs import tiny

# The one-GPU training knobs (issue 14, experiments/BENCHMARKS.md "Training throughput"): bf16 compute; a packed row
# attends as one causal sequence, as DeepSeek-V3 pretrained (cuDNN's plain causal kernel instead of its packed
# layout); unrolled layers (no zero-filled stacked scan residuals). With bf16 AdamW moments: 1.41x -> 2.10x the
# transformers step.
ONE_GPU = {"dtype": "bfloat16", "document_mask": False, "unroll_layers": True}


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.model = model_config_section("small", **ONE_GPU)
    c.optim.moment_dtype = "bfloat16"  # as DeepSeek-V3: half the optimizer state and its traffic
    c.data.seq_len = 2048
    # 16 x 2048 tokens a step: the step's fixed costs (optimizer, weight casts) amortised over twice the tokens of
    # batch 8 (MFU with MTP 37.2% -> 40.3% on the H200, BENCHMARKS.md) at 49.8 GiB, so it still fits 80 GB GPUs
    c.data.batch_size = 16
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 100
    c.train.steps = 2000
    # Router bias speed 10x DeepSeek-V3's 1e-3: at initialisation every token of a layer goes to the same 6 experts
    # (the hidden states share one direction), and the sign rule moves the biases gamma a step. V3 ran ~230k steps;
    # small's runs are 1-2k, where 1e-3 left the routers collapsed for 500-850 steps on the H200. At small's routing
    # on the CPU, 1e-2 leaves the collapse 5-7x sooner, balances better (max/mean load 2.0-2.2 vs 2.8-3.5 at the end)
    # at the same loss (eval bits per byte -1.5% / +0.4% over two seeds); BENCHMARKS.md, ninth FP8 session
    c.train.bias_gamma = 1e-2
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.eval_batches = 4
    c.train.save_every = 1000
    return c
