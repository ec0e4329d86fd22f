"""Training throughput of transformers' DeepseekV3ForCausalLM on one of our model shapes: the same-run baseline.

`experiments/bench_pretrain.py` calls `train_throughput(cfg.to_hf(), ...)` so the transformers number is measured
on the same machine, model shape, batch and sequence length as dsjax's step, in the same invocation. The model is
randomly initialised with `dtype` weights (bf16 by default: "transformers eager + grouped_mm, bf16 weights"), SDPA
attention, the fastest available experts implementation, and trained with AdamW + grad clipping on random tokens.
It is the model without MTP: transformers' causal LM has no MTP training path.
"""

from __future__ import annotations

import functools
import itertools
import re
import time


def _import():
    try:
        import torch
    except ImportError:
        raise ImportError("torch_baseline needs torch (pip install torch)") from None
    try:
        import transformers
    except ImportError:
        raise ImportError("torch_baseline needs transformers (pip install 'transformers>=5.17')") from None
    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        raise ImportError(f"transformers {transformers.__version__} has no DeepseekV3ForCausalLM; need >= 5.17")
    return torch, transformers


def make_config(hf_config: dict):
    """A DeepseekV3Config from a config.json dict without MTP; returns (config, keys it rejected)."""
    _, transformers = _import()
    kw = dict(hf_config)
    kw.pop("torch_dtype", None)  # deprecated in transformers 5; the dtype is chosen explicitly below
    # No MTP module: the causal LM builds num_hidden_layers layers either way, but 0 keeps a version that appends
    # MTP layers from this field from training them, so the baseline stays the plain model in every version.
    kw["num_nextn_predict_layers"] = 0
    kw["use_cache"] = False  # training: no KV cache is built alongside the activations
    dropped = []
    while True:  # drop what this transformers version refuses (none in 5.17-5.24), one key at a time
        try:
            return transformers.DeepseekV3Config(**kw), dropped
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not m or m.group(1) not in kw:
                raise
            dropped.append(m.group(1))
            kw.pop(m.group(1))


def build_model(
    hf_config: dict, *, experts_implementation: str = "auto", dtype: str = "bfloat16", device: str | None = None
):
    """Randomly initialised DeepseekV3ForCausalLM on `device`; returns (model, dropped config keys)."""
    torch, transformers = _import()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config, dropped = make_config(hf_config)
    cls = transformers.DeepseekV3ForCausalLM
    # grouped_mm is the fastest on CUDA (one kernel for all experts); "auto" tries it everywhere and, off CUDA,
    # train_throughput falls back to eager if its first step fails. None = the library's default.
    impls = ["grouped_mm", None] if experts_implementation == "auto" else [experts_implementation]
    errors = []
    for attn, impl in itertools.product(("sdpa", "eager"), impls):  # sdpa where this version supports it
        kw = {"attn_implementation": attn} | ({"experts_implementation": impl} if impl else {})
        try:
            with torch.device(device):  # build straight on the device: no host copy of a large model
                model = cls._from_config(config, dtype=getattr(torch, dtype), **kw)
            break
        except (TypeError, ValueError) as e:  # a kwarg or an implementation this version does not know
            errors.append(f"{kw}: {e}")
    else:
        raise RuntimeError("cannot build DeepseekV3ForCausalLM: " + " | ".join(errors))
    # from_pretrained upcasts these to fp32 under bf16/fp16 (_keep_in_fp32_modules_strict: the router bias and,
    # in newer versions, the router weight); _from_config does not, so do it here to match the loaded model.
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) | {"e_score_correction_bias"}
    if dtype in ("bfloat16", "float16"):
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if any(k in name for k in keep):
                t.data = t.data.float()
    return model.train(), dropped


def _train_step(model, opt, ids):
    import torch

    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss  # labels = ids: the model shifts them itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def train_throughput(
    hf_config: dict,
    batch: int,
    seq_len: int,
    steps: int,
    *,
    warmup: int = 3,
    experts_implementation: str = "auto",
    dtype: str = "bfloat16",
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Tokens/s of `steps` timed AdamW train steps after `warmup` (at least 1: the first checks the kernels run)."""
    torch, transformers = _import()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(seed)
    model, dropped = build_model(hf_config, experts_implementation=experts_implementation, dtype=dtype, device=device)
    impl = model.config._experts_implementation or "eager"
    params = model.num_parameters()
    # fused: one kernel for the whole update on CUDA (bf16 and fp32 params alike); None = torch's CPU default
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True if cuda else None
    )
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    step = functools.partial(_train_step, model, opt, ids)

    try:
        loss = step()
    except (RuntimeError, NotImplementedError) as e:
        # A kernel without a CPU (or this GPU's) implementation: "auto" retries with the eager experts loop.
        if experts_implementation != "auto" or impl == "eager" or isinstance(e, torch.OutOfMemoryError):
            raise
        model.set_experts_implementation("eager")
        impl = "eager"
        loss = step()
    for _ in range(warmup - 1):
        loss = step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    out = {
        "tokens_per_s": batch * seq_len * steps / elapsed,
        "step_ms": 1e3 * elapsed / steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "experts_implementation": impl,
        "attn_implementation": model.config._attn_implementation,
        "dtype": dtype,
        "loss": float(loss.item()),
        "params": params,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dropped_config_keys": dropped,
    }
    del model, opt, ids, loss, step
    if cuda:
        torch.cuda.empty_cache()
    return out
