"""GRPO on one GPU with the `small` preset (1.48B params, 339M active; bf16 compute, float32 master weights).

Sized to finish in a few minutes on one H200, compiles included: a short supervised warm start on 1-3 digit
addition, then 30 GRPO steps of 128 prompts x 16 samples. Prints held-out pass@1 and, at the end, rollout and
train tokens/s (means over the steps after the first, which compiles):

  python experiments/grpo.py --config=experiments/configs/grpo_small.py --workdir=/tmp/grpo_small
"""

import ml_collections

from dsjax.train.loop import model_config_section
from experiments.configs import grpo


def get_config() -> ml_collections.ConfigDict:
    c = grpo.get_config()
    c.model = model_config_section("small", dtype="bfloat16", num_nextn_predict_layers=0)
    c.task.max_digits = 3
    c.sft.update(
        steps=200, batch_size=256, lr=5e-4, warmup_steps=30, log_every=50, target_pass_at_1=0.4, check_every=50
    )
    c.rollout.update(num_prompts=128, num_samples=16)
    c.grpo.update(steps=30, mu=2)
    c.optim.update(lr=3e-5, warmup_steps=10)
    # No checkpoints: params + Adam state are ~18 GB, and this config is a throughput benchmark. For a real run
    # set --config.train.save_every.
    c.train.update(log_every=5, save_every=0)
    return c
