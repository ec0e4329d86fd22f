"""The `medium` preset (3.94B params with MTP depth 1, 0.76B active per token; DeepSeek-V3's ratios at 2/7 of its
width) on one GPU, bf16 compute: `python experiments/pretrain.py --config=experiments/configs/medium.py`."""

import ml_collections

from dsjax.train.loop import model_config_section
from experiments.configs import small


def get_config() -> ml_collections.ConfigDict:
    c = small.get_config()
    # Measured on one H200 with these knobs (101.5 GiB); small.ONE_GPU's knobs are not yet measured at this size.
    c.model = model_config_section("medium", dtype="bfloat16")
    c.optim.moment_dtype = "float32"
    c.optim.lr = 2e-4
    return c
