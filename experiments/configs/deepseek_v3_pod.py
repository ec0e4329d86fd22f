"""DeepSeek-V3-671B pretraining on a TPU v5p-512 slice (512 chips): 512 sequences x 4096 tokens per step, MTP on,
dropless expert parallelism. Plan it from any host first:

  python experiments/compile.py --config=experiments/configs/deepseek_v3_pod.py --topology=v5p:8x8x8 \\
      --mesh=fsdp:64,expert:8

Choices (measured with that compile; experiments/BENCHMARKS.md "TPU compile"):
- bf16 compute, float32 master weights and AdamW moments (the V3 recipe keeps float32 masters; its BF16 moments are
  a further saving this config does not need).
- remat "full": each block's activations are recomputed in the backward pass, so a layer keeps only its input
  (4096 tokens x 7168 per chip) instead of its attention and MoE intermediates.
- MoE: the Pallas grouped matmul per expert shard, ragged all-to-all dispatch, dropless (capacity factor 0);
  experts over the `expert` axis (8), everything else over `fsdp` (64), the batch over both.
- MTP depth 1 with lambda 0.3, as the V3 report trains.
"""

import ml_collections

from dsjax.train.loop import model_config_section
from experiments.configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.model = model_config_section("deepseek-v3-671b", dtype="bfloat16", remat="full", moe_capacity_factor=0.0)
    c.data.tokenizer = ""  # set --config.data.tokenizer=/path/to/tokenizer.json for a real run (129,280 ids)
    c.data.seq_len = 4096
    c.data.batch_size = 512
    c.optim.lr = 2.2e-4  # the V3 report's peak learning rate
    c.optim.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.mtp_lambda = 0.3
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.save_every = 1000
    return c
