"""ModelConfig: every field DeepSeek-V2, V2-Lite, V3 and R1 need, named as in HF config.json.

Runtime knobs that HF does not have (dtype, MoE backend, remat) live in the same dataclass so one object
describes a run, but they never reach `to_hf()`. Each field's checks are in config_checks.py (run when a config is
built), the config.json mapping in config_hf.py; presets are data at the end of this file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from dsjax import config_checks, config_hf
from dsjax.errors import ConfigError


def _runtime(default):
    """A runtime knob: not an HF config.json field, and not part of the architecture (RUNTIME_FIELDS)."""
    return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling (HF `rope_scaling` / `rope_parameters` with type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # None: derived from mscale / mscale_all_dim as transformers does
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = YarnScaling(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    # ---- runtime knobs (not HF fields; declared with runtime(): never in to_hf(), free to change on resume) ----
    dtype: str = _runtime("float32")  # compute dtype of activations and matmuls
    param_dtype: str = _runtime("float32")  # storage dtype of parameters (master weights)
    # The platform the run targets: "auto" is resolved with every other "auto" below from the run's devices
    # (dsjax/runtime.py); the Pallas kernels are built for it.
    platform: str = _runtime("auto")
    moe_backend: str = _runtime("auto")  # "gmm" (Pallas), "ragged_dot", "dense" (reference); auto per platform
    remat: str = _runtime("none")  # rematerialisation policy for each transformer block
    # full (training / prefill) attention: "cudnn" (GPU), "splash" (TPU Pallas), "xla" (einsums; any platform)
    attention_impl: str = _runtime("auto")
    # generation's decode attention: a paged latent cache read by the MLA decode kernel with this backend ("auto":
    # the platform's kernel where the shape allows, else the XLA reference), or "contiguous": the [L, B, S, W]
    # cache and einsums (the old path)
    decode_attention_impl: str = _runtime("auto")
    # expert parallelism (only under a mesh whose expert axis is > 1; see dsjax/layers/moe_parallel.py)
    moe_capacity_factor: float = _runtime(0.0)  # 0: dropless; c > 0: each device sends at most ceil(c*pairs/E)
    moe_device_limit: int = _runtime(0)  # M > 0: a token's experts lie on at most M devices (node-limited)
    moe_dispatch: str = _runtime("auto")  # all-to-all: "ragged" (ragged_all_to_all), "padded"; auto per platform
    # Full attention within each packed document (True), or causal across a packed row's documents (False), as
    # DeepSeek-V3 pretrained ("no cross-sample attention masking"); False also lets cuDNN skip its packed layout.
    document_mask: bool = _runtime(True)
    # False: each segment's layers run as one nn.scan body (compile time flat in depth). True: unrolled (the params
    # stay stacked): no stacked scan residuals, zero-filled and copied per layer, in the backward pass.
    unroll_layers: bool = _runtime(False)
    # "e4m3": the linear layers and routed experts train in FP8 with DeepSeek-V3's fine-grained scaling
    # (dsjax/layers/fp8.py); "none": every GEMM in `dtype`
    fp8: str = _runtime("none")
    # The FP8 GEMMs' and quantizers' kernels (pallas_kernels.fp8_gemm): "gpu" (Mosaic GPU GEMMs on Hopper, Pallas
    # Triton quantizers) or "xla" (the dequantize reference); "auto" per platform (dsjax.runtime)
    fp8_backend: str = _runtime("auto")
    # With fp8 "e4m3", whose weight gradients run in e4m3 too: "all" (DeepSeek-V3's recipe), "experts" (the routed and
    # shared experts; the MLA projections' and dense MLPs' in `dtype`) or "none". In `dtype` a weight gradient reads the
    # unquantized activations and output gradients, skipping two transposing quantization passes per layer: on the H200
    # FP8 GEMMs need layers wider than small's (K N / (K + N) > ~560) to repay them. The experts' FP8 operands come from
    # fused passes over the tokens, so they may pay where the projections' do not (fp8_wgrad_linear / fp8_wgrad_experts
    # read this).
    fp8_wgrad: str = _runtime("all")
    # With fp8 "e4m3", which layers run in FP8: "all" (DeepSeek-V3's recipe: the MLA projections, dense MLPs, shared
    # and routed experts) or "experts" (the routed and shared experts; the projections and dense MLPs in `dtype`). At
    # small's widths the projections' FP8 GEMMs run slower than bf16 (0.71x at q_a+kv_a's shape on the H100), while
    # the experts' run 1.25-1.77x faster (fp8_linear / fp8_experts read this).
    fp8_layers: str = _runtime("all")

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.fp8_wgrad, bool):  # configs saved when it was a switch: True = "all", False = "none"
            object.__setattr__(self, "fp8_wgrad", "all" if self.fp8_wgrad else "none")
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the field for any inconsistent value (dsjax.config_checks)."""
        config_checks.validate(self)

    # ------------------------------------------------------------------ derived
    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def fp8_linear(self) -> bool:
        """Whether the MLA projections and dense MLPs run in FP8."""
        return self.fp8 == "e4m3" and self.fp8_layers == "all"

    @property
    def fp8_experts(self) -> bool:
        """Whether the routed and shared experts run in FP8."""
        return self.fp8 == "e4m3"

    @property
    def fp8_wgrad_linear(self) -> bool:
        """Whether the FP8 linear layers (MLA projections, dense MLPs) take e4m3 weight gradients."""
        return self.fp8_wgrad == "all"

    @property
    def fp8_wgrad_experts(self) -> bool:
        """Whether the FP8 routed and shared experts take e4m3 weight gradients."""
        return self.fp8_wgrad != "none"

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_group_limit(self) -> bool:
        return self.topk_method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def cache_width(self) -> int:
        """Values per token per layer in the latent KV cache: normalised c_kv plus roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.cache_width * self.num_hidden_layers * dtype_bytes

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def param_counts(self) -> dict[str, int]:
        """Total and per-token-active parameter counts (analytic, no arrays built)."""
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        attn = (
            q
            + d * self.cache_width
            + self.kv_lora_rank
            + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            + h * self.v_head_dim * d
            + 2 * d
        )
        expert = 3 * d * self.moe_intermediate_size
        moe = (self.n_routed_experts + self.n_shared_experts) * expert + (d + 1) * self.n_routed_experts
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + d * self.n_routed_experts
        dense = 3 * d * self.intermediate_size
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else embed
        mtp_block = 2 * d + 2 * d * d + d + attn + moe  # enorm, hnorm, eh_proj, final norm, block
        mtp_active = 2 * d + 2 * d * d + d + attn + moe_active
        main = (
            embed + head + d + self.num_hidden_layers * attn + self.num_dense_layers * dense + self.num_moe_layers * moe
        )
        active = (
            (head or embed)
            + self.num_hidden_layers * attn
            + self.num_dense_layers * dense
            + self.num_moe_layers * moe_active
        )
        n = self.num_nextn_predict_layers
        return {
            "total": main + n * mtp_block,
            "total_without_mtp": main,
            "active_per_token": active,
            "active_per_token_with_mtp": active + n * mtp_active,
            "embedding": embed,
        }

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown ModelConfig preset {name!r} (--config.model.preset); known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, source: Any, **runtime) -> ModelConfig:
        """From an HF model dir, a config.json path, a dict, or a transformers config object (dsjax.config_hf)."""
        where = source if isinstance(source, (str, os.PathLike)) else "the HF config"
        names = [f.name for f in dataclasses.fields(cls) if f.name not in RUNTIME_FIELDS]
        kw = config_hf.fields_from_hf(config_hf.read_hf_dict(source), names, where)
        if kw["rope_scaling"] is not None:
            kw["rope_scaling"] = YarnScaling(**kw["rope_scaling"])
        return cls(**{**kw, **runtime})

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict; V3-style routing -> deepseek_v3, V2-style (softmax) -> deepseek_v2."""
        skip = (*RUNTIME_FIELDS, "rope_scaling")
        arch = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        yarn = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        return config_hf.hf_from_fields(arch, yarn, self.param_dtype)


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("runtime"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_V3 = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "deepseek-v3-671b": _V3,
    "deepseek-r1": _V3,
    # A single-GPU research model: DeepSeek-V3's head dims and routing at 1/7 width. The same shapes as the
    # transformers baselines in BASELINES.md (1.475B params without MTP, 339M active per token incl. lm_head).
    "small": ModelConfig(
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=384,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        max_position_embeddings=4096,
        rope_scaling=None,
    ),
    # About 4B parameters (3.94B with MTP, ~0.6B active per token) with DeepSeek-V3's ratios at 2/7 of its width:
    # head dims 128/64/128, kv_lora 512, q_lora 3/14 of hidden, routed-expert width 2/7 and dense width 18/7 of
    # hidden, top-6 of 64 experts in 8 groups keeping 4, one shared expert, MTP depth 1. Trains on one H200.
    "medium": ModelConfig(
        hidden_size=2048,
        intermediate_size=5376,
        moe_intermediate_size=576,
        num_hidden_layers=14,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=448,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        max_position_embeddings=4096,
        rope_scaling=None,
    ),
    # Compiles in seconds on a laptop CPU; exercises every code path (q_lora, YaRN, groups, dense + MoE, MTP).
    "tiny": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        max_position_embeddings=1024,
        rope_scaling=YarnScaling(4.0, 256, 32.0, 1.0, 1.0, 1.0),
    ),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_scaling=YarnScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707),
        num_nextn_predict_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-v2": ModelConfig(
        vocab_size=102400,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        first_k_dense_replace=1,
        num_attention_heads=128,
        q_lora_rank=1536,
        n_routed_experts=160,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=3,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        rope_scaling=YarnScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707),
        num_nextn_predict_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
}
