"""ModelConfig: presets, HF config.json round trip, validation errors that name the field."""

import json

import pytest

import dsjax
from dsjax.cache import bytes_per_token
from dsjax.config import PRESETS, ModelConfig
from dsjax.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_hf_roundtrip(name):
    cfg = ModelConfig.preset(name)
    d = json.loads(json.dumps(cfg.to_hf()))  # must be JSON-serialisable
    assert ModelConfig.from_hf(d) == cfg


def test_reads_legacy_rope_scaling_and_rope_parameters():
    base = ModelConfig.preset("deepseek-v3-671b").to_hf()
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    legacy["rope_theta"] = 10000
    modern = {k: v for k, v in base.items() if k != "rope_scaling"}
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(modern) == ModelConfig.preset("deepseek-v3-671b")


def test_v3_facts():
    cfg = ModelConfig.preset("deepseek-v3-671b")
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)
    assert bytes_per_token(cfg) == 70_272
    counts = cfg.param_counts()
    assert 670e9 < counts["total_without_mtp"] < 672e9
    assert 36e9 < counts["active_per_token"] < 38e9


def test_small_preset_matches_baseline_model():
    cfg = ModelConfig.preset("small")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_attention_heads) == (
        1024,
        12,
        1,
        16,
    )
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.n_routed_experts, cfg.num_experts_per_tok) == (384, 512, 64, 6)
    assert (cfg.n_group, cfg.topk_group, cfg.vocab_size, cfg.num_nextn_predict_layers) == (8, 4, 129280, 1)
    counts = cfg.param_counts()
    assert counts["total_without_mtp"] == 1_475_055_808  # BASELINES.md: 1.48B
    assert counts["active_per_token"] == 339_184_128  # BASELINES.md: 339M (incl. lm_head)


def test_transformers_config_object():
    from transformers import DeepseekV3Config

    hc = DeepseekV3Config.from_dict(ModelConfig.preset("tiny").to_hf())
    assert ModelConfig.from_hf(hc) == ModelConfig.preset("tiny")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_routed_experts=10, n_group=4), "n_group"),
        (dict(topk_group=5, n_group=4), "topk_group"),
        (dict(num_experts_per_tok=5, n_group=4, topk_group=2), "num_experts_per_tok"),
        (dict(first_k_dense_replace=4), "first_k_dense_replace"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(moe_backend="magic"), "moe_backend"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    ],
)
def test_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}:"):
        ModelConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown ModelConfig preset 'nope'"):
        ModelConfig.preset("nope")


def test_unsupported_hf_fields():
    d = ModelConfig.preset("tiny").to_hf()
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**d, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        ModelConfig.from_hf({**d, "rope_parameters": {"rope_type": "longrope"}, "rope_scaling": None})


def test_public_api_names():
    for name in ("ModelConfig", "DeepSeekV3", "load_hf", "save_hf"):
        assert hasattr(dsjax, name)


def test_runtime_fields_declared_once():
    """Runtime knobs are declared on ModelConfig itself: never in config.json, free to change across a resume
    (decode_attention_impl was once treated as architecture and blocked resuming with a different decode path)."""
    from dsjax.config import RUNTIME_FIELDS
    from dsjax.train.checkpoint_io import config_mismatch, model_config_dict, model_config_from_dict

    cfg = dsjax.ModelConfig.preset("tiny")
    assert {"dtype", "platform", "attention_impl", "decode_attention_impl", "moe_dispatch"} <= set(RUNTIME_FIELDS)
    assert not set(RUNTIME_FIELDS) & set(cfg.to_hf())
    other = cfg.replace(
        **{
            "decode_attention_impl": "contiguous",
            "dtype": "bfloat16",
            "platform": "cpu",
            "attention_impl": "xla",
            "moe_capacity_factor": 1.5,
        }
    )
    assert config_mismatch(cfg, other) == []
    assert config_mismatch(cfg, cfg.replace(hidden_size=32)) != []
    assert model_config_from_dict(model_config_dict(other)) == other
    # a checkpoint saved with a runtime knob removed since (fp8_fused, 2026-12-04) still loads: the knob is dropped
    saved = model_config_dict(other)
    saved["dsjax_runtime"]["fp8_fused"] = True
    assert model_config_from_dict(saved) == other
    # fp8_wgrad was a switch until 2026-12-05: a saved True / False reads as "all" / "none"
    for old, new in ((True, "all"), (False, "none")):
        saved["dsjax_runtime"]["fp8_wgrad"] = old
        assert model_config_from_dict(saved) == other.replace(fp8_wgrad=new)


@pytest.mark.parametrize(
    "wgrad, linear, experts", [("all", True, True), ("experts", False, True), ("none", False, False)]
)
def test_fp8_wgrad_says_which_layers_take_e4m3_weight_gradients(wgrad, linear, experts):
    cfg = dsjax.ModelConfig.preset("tiny", fp8="e4m3", fp8_wgrad=wgrad)
    assert (cfg.fp8_wgrad_linear, cfg.fp8_wgrad_experts) == (linear, experts)


@pytest.mark.parametrize(
    "fp8, layers, linear, experts",
    [("e4m3", "all", True, True), ("e4m3", "experts", False, True), ("none", "all", False, False)],
)
def test_fp8_layers_says_which_layers_run_in_fp8(fp8, layers, linear, experts):
    cfg = dsjax.ModelConfig.preset("tiny", fp8=fp8, fp8_layers=layers)
    assert (cfg.fp8_linear, cfg.fp8_experts) == (linear, experts)


@pytest.mark.parametrize(
    "field, value",
    [
        ("fp8", "e5m2"),
        ("fp8_backend", "cuda"),
        ("moe_dispatch", "dense"),
        ("fp8_wgrad", "false"),
        ("fp8_layers", "mla"),
    ],
)
def test_bad_runtime_choice_names_the_flag(field, value):
    with pytest.raises(
        ConfigError, match=rf"ModelConfig\.{field}: '{value}' is not one of .*--config\.model\.{field}\)"
    ):
        dsjax.ModelConfig.preset("tiny", **{field: value})
