"""Logits parity with transformers (float32, eager attention) and the HF safetensors round trip."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsjax
from dsjax.convert import safetensors_io as st
from tests.conftest import tokens

SEQ = 40  # longer than original_max_position_embeddings=16, so YaRN's interpolated band is exercised


def _logits(cfg, params, tok):
    return np.asarray(jax.jit(lambda p, t: dsjax.DeepSeekV3(cfg).apply({"params": p}, t).logits)(params, tok))


def _torch_logits(model, tok):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tok))).logits.numpy()


@pytest.mark.parametrize("which", ["hf_v3", "hf_v2"])
def test_logits_match_transformers(which, request):
    model, path = request.getfixturevalue(which)
    cfg, params = dsjax.load_hf(path)
    if which == "hf_v3":
        assert cfg.scoring_func == "sigmoid" and cfg.n_group > 1 and cfg.q_lora_rank
        bias = params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
        assert float(jnp.abs(bias).min()) > 0
    else:
        assert cfg.scoring_func == "softmax" and cfg.q_lora_rank is None and not cfg.norm_topk_prob
        assert cfg.rope_scaling.mscale_all_dim == pytest.approx(0.707)
    tok = tokens(2, SEQ, cfg.vocab_size)
    ours, ref = _logits(cfg, params, tok), _torch_logits(model, tok)
    gap = np.abs(ours - ref).max()
    print(f"{which}: max |dlogit| = {gap:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert gap <= 1e-4


def test_save_hf_loads_in_transformers(hf_v3, tmp_path, tiny_cfg, tiny_params):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "ours")
    dsjax.save_hf(out, tiny_cfg, tiny_params)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tok = tokens(2, 24, tiny_cfg.vocab_size, seed=3)
    gap = np.abs(_logits(tiny_cfg, tiny_params, tok) - _torch_logits(hf, tok)).max()
    assert gap <= 1e-4, gap
    # MTP weights are written where the released checkpoint has them, with copies of embed/head.
    with st.SafetensorsFile(os.path.join(out, "model.safetensors")) as f:
        mtp = f"model.layers.{tiny_cfg.num_hidden_layers}"
        for suffix in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "mlp.gate.e_score_correction_bias",
        ):
            assert f"{mtp}.{suffix}" in f
        np.testing.assert_array_equal(f.get(f"{mtp}.shared_head.head.weight"), f.get("lm_head.weight"))
        assert f.shape(f"{mtp}.eh_proj.weight") == (tiny_cfg.hidden_size, 2 * tiny_cfg.hidden_size)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shard_bytes", [1 << 40, 40_000])
def test_load_save_roundtrip_identical(tmp_path, tiny_cfg, tiny_params, dtype, shard_bytes):
    params = tiny_params
    out = str(tmp_path / "rt")
    dsjax.save_hf(out, tiny_cfg, params, dtype=dtype, max_shard_bytes=shard_bytes)
    sharded = os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert sharded == (shard_bytes < 1 << 40)
    cfg2, loaded = dsjax.load_hf(out, dtype=dtype)
    assert cfg2 == tiny_cfg
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    assert len(flat_a) == len(flat_b)
    for path, a in flat_a:
        b = flat_b[path]
        keep32 = "gate'][" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith(
            ("['kernel']", "bias']")
        )
        want = a if keep32 or dtype == jnp.float32 else a.astype(dtype)
        assert b.dtype == want.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_config_json_roundtrip(tmp_path, tiny_cfg, tiny_params):
    out = str(tmp_path / "cfg")
    dsjax.save_hf(out, tiny_cfg, tiny_params)
    with open(os.path.join(out, "config.json")) as f:
        d = json.load(f)
    assert d["model_type"] == "deepseek_v3" and d["rope_parameters"]["rope_type"] == "yarn"
    assert dsjax.ModelConfig.from_hf(out) == tiny_cfg


def _corrupt(src, dst, fn):
    """Copy an HF dir with its single safetensors file rewritten by fn(dict name -> array)."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    with st.SafetensorsFile(path) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    fn(tensors)
    st.write(path, list(tensors.items()))
    return dst


def test_bad_checkpoints_name_the_tensor(hf_v3, tmp_path):
    _, path = hf_v3
    name = "model.layers.1.mlp.experts.5.up_proj.weight"
    missing = _corrupt(path, str(tmp_path / "missing"), lambda t: t.pop(name))
    with pytest.raises(KeyError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight'"):
        dsjax.load_hf(missing)
    extra = _corrupt(path, str(tmp_path / "extra"), lambda t: t.update({"model.layers.0.bogus.weight": t[name]}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.bogus\.weight"):
        dsjax.load_hf(extra)
    kv = "model.layers.0.self_attn.kv_b_proj.weight"
    shaped = _corrupt(path, str(tmp_path / "shape"), lambda t: t.update({kv: t[kv][:, :-1]}))
    with pytest.raises(ValueError, match=r"kv_b_proj\.weight' has shape \(128, 31\), but the config needs \(128, 32\)"):
        dsjax.load_hf(shaped)


def test_truncated_safetensors_file(hf_v3, tmp_path):
    import shutil

    _, path = hf_v3
    dst = str(tmp_path / "trunc")
    shutil.copytree(path, dst)
    f = os.path.join(dst, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .*\(truncated file\)"):
        dsjax.load_hf(dst)
