"""ModelConfig's validation: every field checked for range and consistency when a config is built, so a bad value
fails at the flag that set it, not as a shape error deep in a traced model. Kept apart from config.py, which holds
the fields, presets and HF mapping; the allowed values of the string knobs live here, once."""

from __future__ import annotations

from dsjax.errors import ConfigError

SCORING = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
DTYPES = ("float32", "bfloat16", "float16")
MOE_BACKENDS = ("auto", "gmm", "ragged_dot", "dense")
DECODE_ATTENTION_IMPLS = ("auto", "xla", "gpu", "tpu", "contiguous")  # all but "contiguous": mla_decode backends
REMAT = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


def _bad(field: str, msg: str):
    raise ConfigError(f"ModelConfig.{field}: {msg} (--config.model.{field})")


def validate(cfg) -> None:
    """Raises ConfigError naming the field (`ModelConfig.<field>: ... (--config.model.<field>)`) for any
    inconsistent value of a ModelConfig."""
    _validate_dims(cfg)
    if cfg.num_moe_layers > 0 or cfg.num_nextn_predict_layers > 0:
        _validate_moe(cfg)
    _validate_runtime(cfg)


def _validate_dims(cfg) -> None:
    for f in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "max_position_embeddings",
    ):
        if int(getattr(cfg, f)) <= 0:
            _bad(f, f"must be positive, got {getattr(cfg, f)}")
    if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
        _bad("q_lora_rank", f"must be positive or None (plain q_proj), got {cfg.q_lora_rank}")
    if cfg.qk_rope_head_dim % 2:
        _bad("qk_rope_head_dim", f"rope rotates pairs, so it must be even, got {cfg.qk_rope_head_dim}")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        _bad(
            "first_k_dense_replace",
            f"{cfg.first_k_dense_replace} is outside [0, num_hidden_layers={cfg.num_hidden_layers}]",
        )
    if cfg.first_k_dense_replace > 0 and cfg.intermediate_size <= 0:
        _bad("intermediate_size", "must be positive when there are dense layers")
    if cfg.scoring_func not in SCORING:
        _bad("scoring_func", f"{cfg.scoring_func!r} is not one of {SCORING}")
    if cfg.topk_method not in TOPK_METHODS:
        _bad("topk_method", f"{cfg.topk_method!r} is not one of {TOPK_METHODS}")
    if cfg.num_nextn_predict_layers < 0:
        _bad("num_nextn_predict_layers", f"must be >= 0, got {cfg.num_nextn_predict_layers}")
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        if rs.factor <= 0 or rs.original_max_position_embeddings <= 0:
            _bad("rope_scaling", f"factor and original_max_position_embeddings must be positive: {rs}")


def _validate_moe(cfg) -> None:
    if cfg.n_routed_experts <= 0 or cfg.moe_intermediate_size <= 0:
        _bad("n_routed_experts", "MoE layers need n_routed_experts > 0 and moe_intermediate_size > 0")
    if cfg.n_shared_experts < 0:
        _bad("n_shared_experts", f"must be >= 0, got {cfg.n_shared_experts}")
    if not 1 <= cfg.num_experts_per_tok <= cfg.n_routed_experts:
        _bad(
            "num_experts_per_tok",
            f"{cfg.num_experts_per_tok} is outside [1, n_routed_experts={cfg.n_routed_experts}]",
        )
    if cfg.n_group < 1:
        _bad("n_group", f"must be >= 1, got {cfg.n_group}")
    if cfg.n_routed_experts % cfg.n_group:
        _bad("n_group", f"n_routed_experts={cfg.n_routed_experts} is not divisible by n_group={cfg.n_group}")
    if not 1 <= cfg.topk_group <= cfg.n_group:
        _bad("topk_group", f"{cfg.topk_group} is outside [1, n_group={cfg.n_group}]")
    if cfg.uses_group_limit:
        kept = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
        if cfg.num_experts_per_tok > kept:
            _bad(
                "num_experts_per_tok",
                f"{cfg.num_experts_per_tok} experts per token but the "
                f"topk_group={cfg.topk_group} kept groups hold only {kept} experts",
            )
        if cfg.topk_method == "noaux_tc" and cfg.n_routed_experts // cfg.n_group < 2:
            _bad("n_group", "noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts")


def _validate_runtime(cfg) -> None:
    for f, allowed in (
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
        ("moe_backend", MOE_BACKENDS),
        ("remat", REMAT),
        ("attention_impl", ATTENTION_IMPLS),
        ("platform", PLATFORMS),
        ("decode_attention_impl", DECODE_ATTENTION_IMPLS),
        ("moe_dispatch", ("auto", "ragged", "padded")),
        ("fp8", ("none", "e4m3")),
        ("fp8_backend", ("auto", "gpu", "xla")),
        ("fp8_wgrad", ("all", "experts", "none")),
        ("fp8_layers", ("all", "experts")),
    ):
        if getattr(cfg, f) not in allowed:
            _bad(f, f"{getattr(cfg, f)!r} is not one of {allowed}")
    for f in ("document_mask", "unroll_layers"):
        if not isinstance(getattr(cfg, f), bool):
            _bad(f, f"must be True or False, got {getattr(cfg, f)!r}")
    if cfg.moe_capacity_factor < 0 or cfg.moe_device_limit < 0:
        _bad(
            "moe_capacity_factor",
            f"moe_capacity_factor ({cfg.moe_capacity_factor}) and moe_device_limit "
            f"({cfg.moe_device_limit}) must be >= 0 (0 = off)",
        )
