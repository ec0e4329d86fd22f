"""HF config.json <-> ModelConfig's architecture fields (the names are HF's, so most map one to one).

What needs care lives here: the fields a checkpoint's shapes depend on are required (a missing one would silently
take DeepSeek-V3-671B's value), V2-style configs get V2's routing defaults, YaRN comes from `rope_scaling` or
transformers' newer `rope_parameters`, and what DeepSeek never uses (other activations, attention bias, other rope
types) is refused by name. config.py builds the dataclass around these dicts; this module imports nothing of it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dsjax.errors import ConfigError

# config.json fields with no sensible default: without them a checkpoint's shapes would be guessed
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
REQUIRED_MOE = ("num_experts_per_tok", "moe_intermediate_size")


def read_hf_dict(source: Any) -> dict[str, Any]:
    """An HF model dir, a config.json path, a dict or a transformers config object -> the config.json dict."""
    if isinstance(source, dict):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config at {path}")
    with open(path) as f:
        return json.load(f)


def fields_from_hf(d: dict[str, Any], names: list[str], where: Any) -> dict[str, Any]:
    """config.json dict -> ModelConfig keyword arguments for the architecture fields `names`; `rope_scaling` is
    YarnScaling's fields as a dict, or None. `where` names the source in errors."""
    missing = [f for f in REQUIRED if d.get(f) is None]
    if d.get("n_routed_experts"):
        missing += [f for f in REQUIRED_MOE if d.get(f) is None]
    if missing:
        raise ConfigError(f"{where}: config.json lacks {', '.join(missing)}, which the model needs")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act: {d['hidden_act']!r} is not supported (DeepSeek uses silu)")
    if d.get("attention_bias"):
        raise ValueError("config.json attention_bias: true is not supported (DeepSeek has no attention bias)")
    is_v3 = d.get("model_type", "deepseek_v3") == "deepseek_v3"
    kw: dict[str, Any] = {}
    for name in names:
        if name in ("rope_scaling", "rope_theta"):
            continue
        if name in d and (d[name] is not None or name == "q_lora_rank"):  # q_lora_rank null = plain q_proj
            kw[name] = d[name]
    if "num_nextn_predict_layers" not in d:
        kw["num_nextn_predict_layers"] = d.get("num_mtp_layers", 0)
    kw.setdefault("scoring_func", "sigmoid" if is_v3 else "softmax")
    kw.setdefault("topk_method", "noaux_tc" if is_v3 else "greedy")
    kw.setdefault("norm_topk_prob", bool(is_v3))
    kw.setdefault("routed_scaling_factor", 2.5 if is_v3 else 1.0)
    kw.setdefault("first_k_dense_replace", 3 if is_v3 else 0)
    for f in ("n_group", "topk_group"):
        if kw.get(f) is None:
            kw[f] = 1
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kw["rope_scaling"] = _yarn_from_hf(rope)
    return kw


def _yarn_from_hf(rope: dict[str, Any]) -> dict[str, Any] | None:
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype in ("default", None):
        return None
    if rtype != "yarn":
        raise ValueError(f"config.json rope_scaling: rope type {rtype!r} is not supported (only yarn/default)")
    return {
        "factor": float(rope["factor"]),
        "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
        "beta_fast": float(rope.get("beta_fast") or 32.0),
        "beta_slow": float(rope.get("beta_slow") or 1.0),
        "mscale": float(rope.get("mscale") or 0.0),
        "mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
        "attention_factor": rope.get("attention_factor"),
        "truncate": bool(rope.get("truncate", True)),
    }


def hf_from_fields(arch: dict[str, Any], yarn: dict[str, Any] | None, param_dtype: str) -> dict[str, Any]:
    """ModelConfig's architecture fields (without rope_scaling), its YaRN fields (or None) and the storage dtype ->
    an HF config.json dict; V3-style routing -> deepseek_v3, V2-style (softmax) -> deepseek_v2."""
    is_v3 = arch["scoring_func"] == "sigmoid" and arch["topk_method"] == "noaux_tc"
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if is_v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if is_v3 else "deepseek_v2",
    }
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()})
    d["num_key_value_heads"] = arch["num_attention_heads"]
    d["hidden_act"] = "silu"
    d["attention_bias"] = False
    d["rope_interleave"] = True
    d["moe_layer_freq"] = 1
    d["torch_dtype"] = "bfloat16" if param_dtype == "bfloat16" else "float32"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": arch["rope_theta"]}
    if yarn is not None:
        rope = {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": arch["rope_theta"],
            **{k: v for k, v in yarn.items() if v is not None},
        }
    d["rope_scaling"] = rope
    d["rope_parameters"] = rope  # transformers >= 4.57 reads this name
    return d
