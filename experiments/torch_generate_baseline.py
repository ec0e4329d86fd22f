"""The transformers side of experiments/bench_generate.py: `generate` timed on the same weights and prompts.

`run_transformers` saves the dsjax weights with `dsjax.save_hf` and times `AutoModelForCausalLM.generate` on them
(greedy, min_new_tokens = max_new_tokens) in a subprocess running this file, so the two frameworks never share a
CUDA context; `add_transformers` joins its numbers to a dsjax result row. Unlike experiments/torch_baseline.py
(training throughput on a randomly initialised model, in the benchmark's own process), this loads the saved
weights, which also checks that transformers reads what save_hf writes. Defines no flags.

  python experiments/torch_generate_baseline.py SPEC.json   # the worker; run_transformers writes SPEC.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def prompt_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """The random prompts of one batch size; both frameworks draw them here, so they time the same ids."""
    return np.random.RandomState(seed + batch).randint(0, vocab, (batch, length)).astype(np.int32)


def torch_worker(spec_path: str) -> None:
    """The transformers side, in its own process: load once, then warm-up, 1-token and full runs per batch."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to the causal LM

    with open(spec_path) as f:
        spec = json.load(f)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    impl = spec["experts_implementation"]

    def load(**kw):
        try:  # straight onto the device; device_map needs `accelerate`, so fall back to a host load + copy
            return AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.bfloat16, device_map=dev, **kw)
        except ValueError as e:
            if "accelerate" not in str(e):
                raise
            return AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.bfloat16, **kw).to(dev)

    try:
        model = load(experts_implementation=impl)
    except (TypeError, ValueError) as e:  # older transformers: no such kwarg / implementation
        print(f"experts_implementation={impl!r} not accepted ({e}); using the default", flush=True)
        impl = "default"
        model = load()
    model.eval()
    out = {"load_s": time.perf_counter() - t0, "experts_implementation": impl, "device": dev, "runs": []}

    def timed(ids, n):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        seq = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=0,
        )
        if dev == "cuda":
            torch.cuda.synchronize()
        assert seq.shape[1] == ids.shape[1] + n, seq.shape
        return time.perf_counter() - t

    with torch.inference_mode():
        for batch, n in spec["runs"]:
            ids = torch.tensor(
                prompt_ids(spec["seed"], batch, spec["prompt_len"], spec["vocab"]), device=dev, dtype=torch.long
            )
            timed(ids, 4)  # warm-up
            t1 = min(timed(ids, 1) for _ in range(spec["repeats"]))
            tn = min(timed(ids, n) for _ in range(spec["repeats"]))
            out["runs"].append(
                {
                    "batch": batch,
                    "new_tokens": n,
                    "one_token_s": t1,
                    "total_s": tn,
                    "e2e_tok_s": batch * n / tn,
                    "decode_tok_s": batch * (n - 1) / max(tn - t1, 1e-9),
                }
            )
            print(f"transformers batch {batch}: {batch * n / tn:.1f} tok/s end to end", flush=True)
            with open(spec["result_path"], "w") as f:
                json.dump(out, f)


def run_transformers(cfg, params, runs, deadline, *, prompt_len, seed, repeats, experts_implementation, tmp_dir=None):
    """Save the weights, time transformers in a subprocess; returns its result dict (possibly partial).

    runs: [batch, new_tokens] pairs; the worker is stopped at `deadline` (a time.perf_counter() value)."""
    import jax.numpy as jnp

    import dsjax

    tmp = tempfile.mkdtemp(prefix="bench_generate_", dir=tmp_dir)
    try:
        t0 = time.perf_counter()
        dsjax.save_hf(os.path.join(tmp, "hf"), cfg, params, dtype=jnp.bfloat16)
        save_s = time.perf_counter() - t0
        spec = {
            "hf_dir": os.path.join(tmp, "hf"),
            "runs": runs,
            "prompt_len": prompt_len,
            "vocab": cfg.vocab_size,
            "seed": seed,
            "repeats": repeats,
            "experts_implementation": experts_implementation,
            "result_path": os.path.join(tmp, "out.json"),
        }
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the worker never needs jax; keep it off the GPU
        timeout = max(deadline - time.perf_counter(), 30.0)
        try:
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), os.path.join(tmp, "spec.json")],
                env=env,
                timeout=timeout,
                check=True,
            )
        except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
            print(f"transformers worker did not finish: {e}", flush=True)
        result = {"save_hf_s": save_s, "runs": []}
        if os.path.exists(spec["result_path"]):
            with open(spec["result_path"]) as f:
                result.update(json.load(f))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_transformers(row, hf, echo=True):
    """Fill a dsjax row's transformers columns (None where transformers has no run at that batch)."""
    h = {r["batch"]: r for r in hf.get("runs", [])}.get(row["batch"], {})
    row.update(
        hf_e2e_tok_s=h.get("e2e_tok_s"), hf_decode_tok_s=h.get("decode_tok_s"), hf_one_token_s=h.get("one_token_s")
    )
    row["ratio_e2e"] = row["ours_e2e_tok_s"] / h["e2e_tok_s"] if h else None
    row["ratio_decode"] = row["ours_decode_tok_s"] / h["decode_tok_s"] if h else None
    if echo:
        print(
            f"{row['model']} batch {row['batch']} decode_attention={row['decode_attention']} "
            f"({row['decode_backend']}): ours {row['ours_e2e_tok_s']:,.1f} tok/s e2e, "
            f"{row['ours_decode_tok_s']:,.1f} decode; transformers {fmt(row['hf_e2e_tok_s'])} e2e",
            flush=True,
        )


def fmt(x, spec="{:,.1f}"):
    """A number for the tables; "-" for a missing one (a transformers column where it has no run)."""
    return "-" if x is None else spec.format(x)


if __name__ == "__main__":
    torch_worker(sys.argv[1])
