"""Generation throughput: dsjax `generate` against transformers' `generate`, same device, same weights.

For each --preset entry (random weights in bf16): write the weights with `dsjax.save_hf`, time transformers
(`AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16, experts_implementation=...)`, greedy,
min_new_tokens = max_new_tokens) in a subprocess, then time dsjax in this process. Prompts are random ids of
--prompt_len tokens. Both sides report end-to-end tokens/s (prefill + decode) and decode-only tokens/s
(transformers: from a max_new_tokens=1 run subtracted from the full run). With --checkpoint it also measures MTP
self-speculative decoding (greedy) against plain decoding on text prompts: acceptance rate and speedup.

  python experiments/bench_generate.py --out=bench_generate.json     # small at 1/32/128, V2-Lite at 32 x 128 new
  python experiments/bench_generate.py --preset=small --out=small.json               # each model alone is safer
  python experiments/bench_generate.py --preset=deepseek-v2-lite:32:128 --out=lite.json     # within one call
  python experiments/bench_generate.py --preset= --checkpoint=runs/small --out=spec.json   # MTP speculative only
  python experiments/bench_generate.py --smoke                          # tiny preset on CPU, under a minute
  python experiments/bench_generate.py --preset=deepseek-v2-lite:32/128:256 --transformers=false \
      --decode_attention=contiguous,auto --out=decode_kernel.json   # decode before (einsums) / after (kernel)

Timings are one run after a warm-up (compilation excluded), best of --repeats. The transformers run is a
subprocess (experiments/torch_generate_baseline.py) so the two frameworks never share a CUDA context; it runs
while this process holds only the weights (JAX does not preallocate here), before dsjax's own runs grow its
memory pool. Results are written to --out after every measurement, so a run cut short still leaves what it
measured.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.torch_generate_baseline import add_transformers, fmt, prompt_ids, run_transformers  # noqa: E402

flags.DEFINE_list(
    "preset",
    ["small", "deepseek-v2-lite:32:128"],
    "Models to time: PRESET[:BATCHES[:NEW_TOKENS]], "
    "BATCHES separated by '/', e.g. deepseek-v2-lite:32:128; omitted parts come from --batches and "
    "--max_new_tokens. Empty: no random-weight models (e.g. with --checkpoint).",
)
flags.DEFINE_list("batches", ["1", "32", "128"], "Default batch sizes.")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per sequence (random ids).")
flags.DEFINE_integer("max_new_tokens", 512, "Default new tokens per sequence.")
flags.DEFINE_bool("transformers", True, "Also time transformers' generate on the same weights.")
flags.DEFINE_string(
    "experts_implementation",
    "grouped_mm",
    "transformers experts implementation, if the "
    "installed version accepts the kwarg (falls back to its default otherwise).",
)
flags.DEFINE_enum(
    "attention_impl",
    "auto",
    ["auto", "xla", "cudnn", "splash"],
    "dsjax prefill attention (auto: cuDNN on GPU; cudnn falls back to xla if it fails to compile).",
)
flags.DEFINE_list(
    "decode_attention",
    ["auto"],
    "dsjax decode attention(s) to time, each a "
    "ModelConfig.decode_attention_impl: contiguous (the [L, B, S, W] cache and einsums, the old path), "
    "auto (paged cache + MLA decode kernel on GPU/TPU, its XLA reference on CPU), xla (paged cache + "
    "the XLA reference), gpu / tpu (paged cache + that kernel, an error if it cannot run). Several: "
    "one row each, same weights and prompts.",
)
flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "bfloat16", "float32"],
    "dsjax params, compute and cache dtype; auto = "
    "bfloat16 on accelerators, float32 on CPU. transformers always runs bfloat16.",
)
flags.DEFINE_integer("repeats", 1, "Timed runs per configuration after the warm-up (best is reported).")
flags.DEFINE_integer("sync_every", 8, "dsjax decode steps between all-finished checks.")
flags.DEFINE_string("checkpoint", None, "A pretraining workdir or step dir: also time MTP speculative decoding.")
flags.DEFINE_list("spec_batches", ["1", "32"], "Batch sizes for the speculative comparison.")
flags.DEFINE_integer("spec_max_new_tokens", 256, "New tokens per sequence for the speculative comparison.")
flags.DEFINE_float("spec_temperature", 0.0, "Temperature for the speculative comparison (0 = greedy).")
flags.DEFINE_string(
    "spec_prompts_file",
    None,
    "Prompts (one per line) for the speculative comparison; default: "
    "built-in Python-source openings (the default pretraining corpus is the Python stdlib).",
)
flags.DEFINE_string("tokenizer", None, "Tokenizer for --checkpoint prompts (default as in generate.py).")
flags.DEFINE_float(
    "time_budget_s",
    420.0,
    "Skip measurements that would start after this many seconds (the "
    "transformers worker is also stopped there), so one call stays under about 8 minutes.",
)
flags.DEFINE_bool(
    "ours_first",
    False,
    "Time dsjax before transformers (default after): when the time budget is "
    "tight, a transformers run cut short then costs only its own rows.",
)
flags.DEFINE_string("tmp_dir", None, "Where the HF weights are written (default: the system temp dir).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.DEFINE_bool(
    "smoke",
    False,
    "Tiny preset, batch 2, 16-token prompts, 8 new tokens: a CPU check of the "
    "whole pipeline (both frameworks) in under a minute.",
)
flags.DEFINE_integer("seed", 0, "Seed for weights and prompts.")
FLAGS = flags.FLAGS

SPEC_PROMPTS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Path:\n    def __init__(self, ",
    '"""Utilities for ',
    "    for i in range(len(",
    "    def __repr__(self):\n        return ",
    "if __name__ == '__main__':\n",
    "try:\n    import ",
    "# Copyright (C) ",
]


def time_transformers(cfg, params, runs, deadline):
    """transformers' result dict for `runs` ([batch, new_tokens] pairs), under this benchmark's flags."""
    return run_transformers(
        cfg,
        params,
        runs,
        deadline,
        prompt_len=FLAGS.prompt_len,
        seed=FLAGS.seed,
        repeats=FLAGS.repeats,
        experts_implementation=FLAGS.experts_implementation,
        tmp_dir=FLAGS.tmp_dir,
    )


def time_ours(cfg, params, prompts, new_tokens, speculative=False, temperature=0.0):
    """(stats of the best timed run, first-call seconds) for dsjax generate."""
    import jax

    from dsjax.generate import SamplingConfig, generate

    sampling = SamplingConfig(temperature=temperature, max_new_tokens=new_tokens)
    kw = dict(speculative=speculative, cache_dtype=cfg.dtype, sync_every=FLAGS.sync_every)
    t0 = time.perf_counter()
    generate(cfg, params, prompts, sampling, jax.random.key(0), **kw)
    first = time.perf_counter() - t0
    runs = [generate(cfg, params, prompts, sampling, jax.random.key(0), **kw).stats for _ in range(FLAGS.repeats)]
    return max(runs, key=lambda s: s["tokens_per_s"]), first


def decode_backend(cfg) -> str:
    """What cfg.decode_attention_impl runs as: "einsum" (contiguous) or mla_decode's resolved backend (auto
    falls back to the XLA reference when the kernel cannot take the shapes/dtype, which a row must show)."""
    import jax
    import jax.numpy as jnp

    from dsjax.cache import PAGE_SIZE
    from pallas_kernels.mla_decode import V_DIM, resolve_backend

    if cfg.decode_attention_impl == "contiguous":
        return "einsum"
    if cfg.kv_lora_rank != V_DIM:
        return "xla"
    q = jax.ShapeDtypeStruct((1, 1, cfg.num_attention_heads, cfg.cache_width), jnp.dtype(cfg.dtype))
    kv = jax.ShapeDtypeStruct((1, PAGE_SIZE, cfg.cache_width), jnp.dtype(cfg.dtype))  # cache dtype = cfg.dtype
    return resolve_backend(cfg.decode_attention_impl, q, kv)


def time_row(name, cfg, params, batch, new_tokens):
    """(the dsjax result row for one model, batch size and decode attention, cfg). If a cuDNN prefill fails to
    compile, the run is retried with attention_impl="xla" and that cfg is returned for the caller to keep."""
    from dsjax.cache import bytes_per_token
    from dsjax.runtime import resolved

    prompts = prompt_ids(FLAGS.seed, batch, FLAGS.prompt_len, cfg.vocab_size)
    try:
        stats, first = time_ours(cfg, params, prompts, new_tokens)
    except Exception as e:  # noqa: BLE001 - a cuDNN prefill that fails to compile: retry on XLA
        if resolved(cfg).attention_impl != "cudnn":
            raise
        print(f"cudnn prefill failed ({str(e)[:300]}); falling back to attention_impl=xla", flush=True)
        cfg = cfg.replace(attention_impl="xla")
        stats, first = time_ours(cfg, params, prompts, new_tokens)
    row = {
        "model": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "prefill_attention": resolved(cfg).attention_impl,
        "decode_attention": cfg.decode_attention_impl,
        "decode_backend": decode_backend(cfg),
        "ours_e2e_tok_s": stats["tokens_per_s"],
        "ours_decode_tok_s": stats["decode_tokens_per_s"],
        "ours_prefill_s": stats["prefill_s"],
        "ours_decode_s": stats["decode_s"],
        "ours_first_call_s": first,
        "cache_bytes_per_token": bytes_per_token(cfg, cfg.dtype),
    }
    return row, cfg


def parse_entry(entry: str):
    parts = entry.split(":")
    batches = [int(b) for b in (parts[1].split("/") if len(parts) > 1 and parts[1] else FLAGS.batches)]
    return parts[0], batches, int(parts[2]) if len(parts) > 2 and parts[2] else FLAGS.max_new_tokens


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dsjax.config_checks import DECODE_ATTENTION_IMPLS

    bad = [x for x in FLAGS.decode_attention if x not in DECODE_ATTENTION_IMPLS]
    if bad or not FLAGS.decode_attention:
        raise app.UsageError(f"--decode_attention: {bad} not in {DECODE_ATTENTION_IMPLS}")
    if FLAGS.smoke:
        FLAGS.preset, FLAGS.prompt_len, FLAGS.spec_max_new_tokens = ["tiny:2:8"], 16, 8
        # tiny programs: LLVM optimisation costs more compile time than it saves (as in tests/conftest.py)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    import jax

    import dsjax
    from dsjax.engine import engine
    from experiments.generate import random_params, resolve_dtype

    start = time.perf_counter()
    deadline = start + FLAGS.time_budget_s
    dtype = resolve_dtype(FLAGS.dtype)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "dtype": dtype,
        "prompt_len": FLAGS.prompt_len,
        "rows": [],
        "speculative": [],
        "skipped": [],
    }

    def save():
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(report, f, indent=2)

    for entry in FLAGS.preset:
        name, batches, new_tokens = parse_entry(entry)
        if time.perf_counter() > deadline:
            report["skipped"].append(f"{entry}: time budget")
            continue
        cfg = dsjax.ModelConfig.preset(name, dtype=dtype, param_dtype=dtype, attention_impl=FLAGS.attention_impl)
        params = random_params(cfg, FLAGS.seed)
        hf = {"runs": []}
        if FLAGS.transformers and not FLAGS.ours_first:
            hf = time_transformers(cfg, params, [[b, new_tokens] for b in batches], deadline)
            report.setdefault("transformers", {})[name] = {k: v for k, v in hf.items() if k != "runs"}
        rows = []
        for b, impl in [(b, impl) for b in batches for impl in FLAGS.decode_attention]:
            if time.perf_counter() > deadline:
                report["skipped"].append(f"{name} batch {b} {impl}: time budget")
                continue
            # the returned cfg keeps a cuDNN -> XLA prefill fallback for the later batches
            row, cfg = time_row(name, cfg.replace(decode_attention_impl=impl), params, b, new_tokens)
            rows.append(row)
            report["rows"].append(row)
            add_transformers(row, hf)
            save()
        if FLAGS.transformers and FLAGS.ours_first and time.perf_counter() < deadline:
            hf = time_transformers(cfg, params, [[b, new_tokens] for b in batches], deadline)
            report.setdefault("transformers", {})[name] = {k: v for k, v in hf.items() if k != "runs"}
            for row in rows:
                add_transformers(row, hf, echo=False)
            save()
        del params
        engine.cache_clear()  # with jax.clear_caches(): free this model's compiled programs
        jax.clear_caches()

    if FLAGS.checkpoint:
        bench_speculative(report, deadline, dtype)
        save()
    print_tables(report)
    save()


def bench_speculative(report, deadline, dtype):
    from dsjax.tokenizer import load_tokenizer
    from experiments.generate import default_tokenizer, load_model, read_prompts, run_metadata

    cfg, params, source = load_model(checkpoint=FLAGS.checkpoint, dtype=dtype, attention_impl=FLAGS.attention_impl)
    tok = load_tokenizer(FLAGS.tokenizer or default_tokenizer(source, run_metadata(FLAGS.checkpoint)))
    texts = read_prompts([], FLAGS.spec_prompts_file) if FLAGS.spec_prompts_file else SPEC_PROMPTS
    encoded = [[tok.bos_id] + tok.encode(t) for t in texts]
    for b, impl in [(int(b), impl) for b in FLAGS.spec_batches for impl in FLAGS.decode_attention]:
        if time.perf_counter() > deadline:
            report["skipped"].append(f"speculative batch {b} {impl}: time budget")
            continue
        prompts = [encoded[i % len(encoded)] for i in range(b)]
        cfg = cfg.replace(decode_attention_impl=impl)
        plain, _ = time_ours(cfg, params, prompts, FLAGS.spec_max_new_tokens, temperature=FLAGS.spec_temperature)
        spec, _ = time_ours(
            cfg, params, prompts, FLAGS.spec_max_new_tokens, speculative=True, temperature=FLAGS.spec_temperature
        )
        report["speculative"].append(
            {
                "batch": b,
                "decode_attention": impl,
                "decode_backend": decode_backend(cfg),
                "new_tokens": FLAGS.spec_max_new_tokens,
                "temperature": FLAGS.spec_temperature,
                "acceptance_rate": spec["acceptance_rate"],
                "tokens_per_step": spec["tokens_per_step"],
                "plain_e2e_tok_s": plain["tokens_per_s"],
                "spec_e2e_tok_s": spec["tokens_per_s"],
                "plain_decode_tok_s": plain["decode_tokens_per_s"],
                "spec_decode_tok_s": spec["decode_tokens_per_s"],
                "speedup_e2e": spec["tokens_per_s"] / plain["tokens_per_s"],
                "speedup_decode": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
            }
        )


def _attn(row) -> str:
    impl, backend = row.get("decode_attention", "-"), row.get("decode_backend")
    return impl if backend in (None, impl, "einsum") else f"{impl}:{backend}"


def print_tables(report):
    print(
        f"\n{report['device']} ({report['backend']}, jax {report['jax']}, {report['dtype']}); greedy; tok/s = new "
        "tokens per second summed over the batch; e2e = prefill + decode"
    )
    if report["rows"]:
        print(f"random weights, random {report['prompt_len']}-token prompts; x = ours / transformers")
        head = (
            "model",
            "batch",
            "new",
            "decode attn",
            "ours e2e",
            "ours decode",
            "HF e2e",
            "HF decode",
            "x e2e",
            "x decode",
            "prefill ms",
            "cache B/tok",
        )
        print(("{:<18}{:>6}{:>6}" + "{:>12}" * 9).format(*head))
        for r in report["rows"]:
            print(
                ("{:<18}{:>6}{:>6}" + "{:>12}" * 9).format(
                    r["model"],
                    r["batch"],
                    r["new_tokens"],
                    _attn(r),
                    fmt(r["ours_e2e_tok_s"]),
                    fmt(r["ours_decode_tok_s"]),
                    fmt(r["hf_e2e_tok_s"]),
                    fmt(r["hf_decode_tok_s"]),
                    fmt(r["ratio_e2e"], "{:.2f}"),
                    fmt(r["ratio_decode"], "{:.2f}"),
                    fmt(r["ours_prefill_s"] * 1e3, "{:.0f}"),
                    f"{r['cache_bytes_per_token']:,}",
                )
            )
    for name, t in report.get("transformers", {}).items():
        print(
            f"transformers {name}: experts_implementation={t.get('experts_implementation')}, "
            f"save_hf {t.get('save_hf_s', 0):.0f}s, load {t.get('load_s', 0):.0f}s"
        )
    if report["speculative"]:
        print("\nMTP self-speculative decoding (depth 1) vs plain, same prompts")
        head = ("batch", "new", "decode attn", "accept", "tok/step", "plain dec", "spec dec", "x decode", "x e2e")
        print(("{:>6}{:>6}" + "{:>12}" * 7).format(*head))
        for r in report["speculative"]:
            print(
                ("{:>6}{:>6}" + "{:>12}" * 7).format(
                    r["batch"],
                    r["new_tokens"],
                    _attn(r),
                    f"{r['acceptance_rate']:.3f}",
                    f"{r['tokens_per_step']:.2f}",
                    fmt(r["plain_decode_tok_s"]),
                    fmt(r["spec_decode_tok_s"]),
                    f"{r['speedup_decode']:.2f}",
                    f"{r['speedup_e2e']:.2f}",
                )
            )
    for s in report["skipped"]:
        print("skipped:", s)


if __name__ == "__main__":
    app.run(main)
