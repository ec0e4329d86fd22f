"""dsjax: DeepSeek-V3/R1 in JAX/Flax."""

from dsjax.cache import KVCache, PagedKVCache, init_cache, init_paged_cache
from dsjax.config import ModelConfig, YarnScaling
from dsjax.model import DeepSeekV3

__all__ = ["ModelConfig", "YarnScaling", "DeepSeekV3", "KVCache", "PagedKVCache", "init_cache", "init_paged_cache"]

from dsjax.convert.hf import load_hf, save_hf  # noqa: E402

__all__ += ["load_hf", "save_hf"]

from dsjax.generate import GenerationResult, SamplingConfig, generate  # noqa: E402

__all__ += ["generate", "SamplingConfig", "GenerationResult"]
