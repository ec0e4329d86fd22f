"""`convert.py --verify`: the same prompts through transformers (PyTorch, CPU, float32) and dsjax; the logit gap.

The PyTorch side reads the HF directory (the conversion's input or output) through our safetensors reader, so
FP8 checkpoints are dequantized the same documented way (transformers' own FP8 path wants a GPU or accelerate);
a plain bf16/float32 export is loaded with `from_pretrained`, which is also the test that transformers takes it.
The dsjax side restores the Orbax checkpoint with `load_for_inference`. Both run in float32, so the gap measures
the conversion (and, for FP8 -> bf16, the bf16 rounding of the stored weights), not bf16 arithmetic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

PROMPTS = ("The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein published")


def available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def fits(cfg, copies: int = 3) -> tuple[bool, int]:
    """Whether `copies` float32 copies of the model (torch model, its state dict, dsjax params) fit in memory."""
    need = cfg.param_counts()["total"] * 4 * copies
    return need < 0.8 * available_bytes(), need


def torch_model(hf_dir: str, allow_pickle: bool = False):
    """transformers' DeepseekV3/V2ForCausalLM (float32, eager attention) with the directory's weights."""
    import torch
    import transformers

    from dsjax.convert.fp8 import scale_name
    from dsjax.convert.source import HFSource

    with open(os.path.join(hf_dir, "config.json")) as f:
        d = json.load(f)
    safetensors = any(f.endswith(".safetensors") for f in os.listdir(hf_dir))
    if "quantization_config" not in d and safetensors:
        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load report lists the MTP layer, which it ignores by design
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        finally:
            transformers.logging.set_verbosity(level)
    d.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    own = model.state_dict()
    mtp = f"model.layers.{config.num_hidden_layers}."
    sd = {}
    with HFSource(hf_dir, allow_pickle) as src:
        scales = {scale_name(n) for n in src.names()}
        for name in src.names():
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            if name in scales or (layer is not None and int(layer) >= config.num_hidden_layers) or name.startswith(mtp):
                continue  # FP8 scales are applied by src.read; the MTP layers are not part of the causal LM
            sd[name] = torch.from_numpy(src.read(name, np.float32))
    sd = _fuse_experts(sd, own)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(
            f"{hf_dir}: transformers state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def _fuse_experts(sd: dict, own: dict) -> dict:
    """Per-expert HF keys -> transformers 5's fused `experts.gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]."""
    import torch

    fused = [k for k in own if k.endswith("mlp.experts.gate_up_proj")]
    for key in fused:
        p = key[: -len("gate_up_proj")]
        e = own[key].shape[0]
        sd[key] = torch.stack(
            [torch.cat([sd.pop(f"{p}{j}.gate_proj.weight"), sd.pop(f"{p}{j}.up_proj.weight")]) for j in range(e)]
        )
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{j}.down_proj.weight") for j in range(e)])
    return sd


def prompt_tokens(cfg, hf_dir: str | None, n: int = 3, length: int = 16) -> list[np.ndarray]:
    """Text prompts through the directory's tokenizer.json when it has one, else fixed random token ids."""
    path = hf_dir and os.path.join(hf_dir, "tokenizer.json")
    if path and os.path.isfile(path):
        from dsjax.tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        out = [np.asarray(tok.encode(t), np.int32) for t in PROMPTS[:n]]
        if all(len(t) and t.max() < cfg.vocab_size for t in out):
            return out
    rng = np.random.RandomState(0)
    return [rng.randint(0, cfg.vocab_size, length).astype(np.int32) for _ in range(n)]


def logit_gap(cfg, params, model, prompts, log: Callable[[str], None] = print) -> dict:
    """max |logit_dsjax - logit_transformers| per prompt and overall, with the logit scale and top-1 agreement."""
    import jax
    import jax.numpy as jnp
    import torch

    import dsjax

    cfg32 = cfg.replace(dtype="float32", param_dtype="float32")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    apply = jax.jit(lambda p, t: dsjax.DeepSeekV3(cfg32).apply({"params": p}, t).logits)
    gaps, scale, agree, total = [], 0.0, 0, 0
    for toks in prompts:
        ours = np.asarray(apply(params, jnp.asarray(toks[None])))[0]
        with torch.no_grad():
            ref = model(torch.tensor(toks[None].astype(np.int64))).logits[0].float().numpy()
        gaps.append(float(np.abs(ours - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(toks)
        log(f"verify: prompt of {len(toks)} tokens: max |dlogit| = {gaps[-1]:.3e}")
    out = {"max_abs_gap": max(gaps), "logit_scale": scale, "top1_agreement": agree / total}
    log(
        f"verify: max |dlogit| = {out['max_abs_gap']:.3e} over {len(prompts)} prompts (max |logit| "
        f"{scale:.2f}, relative {out['max_abs_gap'] / max(scale, 1e-30):.2e}); top-1 agreement "
        f"{100 * out['top1_agreement']:.1f}%"
    )
    return out


def verify(
    hf_dir: str, checkpoint: str, allow_pickle: bool = False, n: int = 3, log: Callable[[str], None] = print
) -> dict | None:
    """Logit gap between the HF directory (transformers) and the Orbax checkpoint (dsjax); None if too big."""
    import jax.numpy as jnp

    from dsjax.train.checkpoint_io import load_for_inference

    cfg, params = load_for_inference(checkpoint, dtype=jnp.float32)
    ok, need = fits(cfg)
    if not ok:
        log(
            f"verify: skipped; the model needs about {need / 1e9:.0f} GB of host memory in float32 on both sides "
            f"and {available_bytes() / 1e9:.0f} GB are free"
        )
        return None
    model = torch_model(hf_dir, allow_pickle)
    return logit_gap(cfg, params, model, prompt_tokens(cfg, hf_dir, n), log)
