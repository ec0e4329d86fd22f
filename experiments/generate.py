"""Generate text with a dsjax model: a pretraining checkpoint, a Hugging Face directory, or random weights.

  python experiments/generate.py --checkpoint=runs/pretrain --prompt="def parse(" --max_new_tokens=64
  python experiments/generate.py --hf_dir=/models/DeepSeek-V2-Lite --prompt="The capital of France is" --temperature=0
  python experiments/generate.py --checkpoint=runs/small --prompts_file=prompts.txt --top_p=0.95 --speculative
  python experiments/generate.py --preset=tiny --prompt=hello   # random weights: a smoke test

Prints each completion, then tokens/s (end to end and decode only), the prefill time, the latent-cache bytes per
token and, with --speculative, the draft acceptance rate. The first call of a shape compiles; --warmup runs
the batch once before the timed run so tokens/s excludes compilation.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from dsjax.errors import report_user_errors  # noqa: E402


def define_flags():
    """Defined on demand, so bench_generate.py can import this module's helpers without flag clashes."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Pretraining checkpoint: a pretraining --workdir (its latest step) or one "
        "step's directory. Exclusive with --hf_dir and --preset.",
    )
    flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + safetensors, bf16 or FP8).")
    flags.DEFINE_string("preset", None, "No checkpoint: this ModelConfig preset with random weights (smoke tests).")
    flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch.")
    flags.DEFINE_string(
        "prompts_file",
        None,
        "A text file with one prompt per line (literal \\n in a line becomes a newline); added after --prompt.",
    )
    flags.DEFINE_integer("max_new_tokens", 128, "Completion length bound per sequence.")
    flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (applied after temperature); 0 = off.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (applied after temperature and top-k); 1 = off.")
    flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling (and for --preset's random weights).")
    flags.DEFINE_bool(
        "speculative",
        False,
        "MTP self-speculative decoding (needs an MTP module); the output "
        "distribution is unchanged, the acceptance rate is printed.",
    )
    flags.DEFINE_string(
        "tokenizer",
        None,
        "'byte', a tokenizer.json, or a directory holding one. Default: "
        "tokenizer.json in the --checkpoint/--hf_dir directory (or its parent), else the pretraining "
        "run's data.tokenizer, else the byte tokenizer.",
    )
    flags.DEFINE_bool("add_bos", True, "Start each prompt with the tokenizer's bos token (pretraining documents do).")
    flags.DEFINE_bool("stop_at_eos", True, "End a sequence at the tokenizer's eos token.")
    flags.DEFINE_list("stop_tokens", [], "More stop token ids, comma separated.")
    flags.DEFINE_enum(
        "dtype",
        "auto",
        ["auto", "bfloat16", "float32"],
        "Compute and parameter dtype (router "
        "weights stay float32); auto = bfloat16 on accelerators, float32 on CPU (XLA:CPU lacks the "
        "bf16 x bf16 -> f32 batched dot the absorbed decode uses).",
    )
    flags.DEFINE_enum("cache_dtype", "auto", ["auto", "bfloat16", "float32"], "Latent KV cache dtype; auto = --dtype.")
    flags.DEFINE_integer("max_len", 0, "Cache slots per sequence; 0 = padded prompt length + max_new_tokens.")
    flags.DEFINE_enum(
        "attention_impl",
        "auto",
        ["auto", "xla", "cudnn", "splash"],
        "Prefill attention: auto "
        "(cuDNN on GPU, splash on TPU, XLA on CPU), XLA einsums, cuDNN or splash flash attention.",
    )
    flags.DEFINE_enum(
        "decode_attention_impl",
        "auto",
        ["auto", "xla", "gpu", "tpu", "contiguous"],
        "Decode "
        "attention: a paged latent cache read by the MLA decode kernel (auto: Pallas on GPU/TPU, XLA "
        "reference on CPU; xla/gpu/tpu: that backend) or contiguous (the unpaged cache and einsums).",
    )
    flags.DEFINE_bool("warmup", False, "Generate once before the timed run, so tokens/s excludes compilation.")


FLAGS = flags.FLAGS

_ROUTER_F32 = ("gate/kernel", "e_score_correction_bias")  # router math is float32 (DESIGN.md section 3)


def cast_params(params, dtype):
    """Every leaf to `dtype` except the router's kernel and correction bias, which stay float32."""
    import jax
    import jax.numpy as jnp

    def cast(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return x.astype(jnp.float32 if name.endswith(_ROUTER_F32) else dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def resolve_dtype(name: str) -> str:
    import jax

    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def random_params(cfg, seed: int = 0, std: float | None = None):
    """Random weights in cfg.param_dtype, made on the default device: normal(std) weights, unit norms, zero bias."""
    import jax
    import jax.numpy as jnp

    import dsjax

    std = cfg.initializer_range if std is None else std
    shapes = jax.eval_shape(
        lambda k: dsjax.DeepSeekV3(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.key(0)
    )
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)

    @jax.jit  # one program: each normal draw fuses with its scaling, so no float32 copy of an expert tensor
    def make(key):
        out = []
        for (path, s), k in zip(leaves, jax.random.split(key, len(leaves))):
            name = jax.tree_util.keystr(path)
            if "norm" in name:
                out.append(jnp.ones(s.shape, s.dtype))
            elif "e_score_correction_bias" in name:
                out.append(jnp.zeros(s.shape, s.dtype))
            else:
                out.append((jax.random.normal(k, s.shape, s.dtype) * std).astype(s.dtype))
        return jax.tree_util.tree_unflatten(tree, out)

    return make(jax.random.key(seed))


def run_metadata(checkpoint: str) -> dict:
    """The pretraining run's saved config (model + experiment), or {} when it cannot be read."""
    try:
        from dsjax.train.checkpoint_io import step_dir

        with open(os.path.join(step_dir(checkpoint), "config", "metadata")) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - only used for defaults; the checkpoint loader reports real errors
        return {}


def default_tokenizer(source_dir: str | None, run_meta: dict | None = None) -> str:
    for d in filter(None, [source_dir, source_dir and os.path.dirname(os.path.abspath(source_dir))]):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return os.path.join(d, "tokenizer.json")
    spec = ((run_meta or {}).get("experiment", {}).get("data", {}) or {}).get("tokenizer")
    return spec if spec and (spec == "byte" or os.path.exists(spec)) else "byte"


def load_model(checkpoint=None, hf_dir=None, preset=None, dtype="bfloat16", seed=0, **runtime):
    """(cfg, params, source_dir) from exactly one of a pretraining checkpoint, an HF directory or a preset."""
    import jax.numpy as jnp

    import dsjax

    if sum(x is not None for x in (checkpoint, hf_dir, preset)) != 1:
        raise app.UsageError("give exactly one of --checkpoint, --hf_dir, --preset")
    runtime = {"dtype": dtype, "param_dtype": dtype, **runtime}
    if preset is not None:
        cfg = dsjax.ModelConfig.preset(preset, **runtime)
        return cfg, random_params(cfg, seed), None
    if checkpoint is not None:
        from dsjax.train.checkpoint_io import load_for_inference

        cfg, params = load_for_inference(checkpoint)
        source = checkpoint
    else:
        cfg, params = dsjax.load_hf(hf_dir, dtype=jnp.dtype(dtype))
        source = hf_dir
    cfg = cfg.replace(**runtime)
    return cfg, cast_params(params, jnp.dtype(dtype)), source


def read_prompts(prompts, prompts_file) -> list[str]:
    texts = list(prompts)
    if prompts_file:
        with open(prompts_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not texts:
        raise app.UsageError("no prompts: give --prompt and/or --prompts_file")
    return texts


def main(argv):
    with report_user_errors():  # a missing, unreadable or corrupt checkpoint: one line, exit status 2
        generate_main(argv)


def generate_main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp

    from dsjax.cache import bytes_per_token
    from dsjax.generate import SamplingConfig, generate
    from dsjax.tokenizer import load_tokenizer

    dtype = resolve_dtype(FLAGS.dtype)
    cache_dtype = jnp.dtype(dtype if FLAGS.cache_dtype == "auto" else FLAGS.cache_dtype)
    cfg, params, source = load_model(
        FLAGS.checkpoint,
        FLAGS.hf_dir,
        FLAGS.preset,
        dtype,
        FLAGS.seed,
        attention_impl=FLAGS.attention_impl,
        decode_attention_impl=FLAGS.decode_attention_impl,
    )
    meta = run_metadata(FLAGS.checkpoint) if FLAGS.checkpoint else {}
    tok = load_tokenizer(FLAGS.tokenizer or default_tokenizer(source, meta))
    if tok.vocab_size > cfg.vocab_size:
        raise app.UsageError(
            f"tokenizer {tok!r} has {tok.vocab_size} ids, more than the model's vocab_size "
            f"{cfg.vocab_size}; pass the model's --tokenizer"
        )
    texts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
    prompts = [([tok.bos_id] if FLAGS.add_bos else []) + tok.encode(t) for t in texts]
    stops = [int(s) for s in FLAGS.stop_tokens] + ([tok.eos_id] if FLAGS.stop_at_eos else [])
    sampling = SamplingConfig(
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        max_new_tokens=FLAGS.max_new_tokens,
        stop_tokens=tuple(stops),
        pad_token=tok.pad_id,
    )
    kw = dict(
        num_samples=FLAGS.num_samples,
        max_len=FLAGS.max_len or None,
        speculative=FLAGS.speculative,
        cache_dtype=cache_dtype,
    )
    key = jax.random.key(FLAGS.seed)
    if FLAGS.warmup:
        generate(cfg, params, prompts, sampling, key, **kw)
    result = generate(cfg, params, prompts, sampling, key, **kw)

    for i, completion in enumerate(result.completions()):
        p = i // FLAGS.num_samples
        head = f"--- prompt {p}" + (f", sample {i % FLAGS.num_samples}" if FLAGS.num_samples > 1 else "")
        end = "stop token" if bool(result.finished[i]) else "length limit"
        print(f"{head} ({len(prompts[p])} prompt tokens, {len(completion)} new, ended by {end}) ---")
        print(texts[p] + tok.decode(completion), flush=True)
    s = result.stats
    print(
        f"\n{s['new_tokens']} new tokens in {s['prefill_s'] + s['decode_s']:.2f}s: {s['tokens_per_s']:.1f} tok/s "
        f"end to end, {s['decode_tokens_per_s']:.1f} tok/s decode; prefill {s['prefill_s'] * 1e3:.0f} ms for "
        f"{s['batch']} x {s['prompt_bucket']} tokens"
        + ("" if FLAGS.warmup else " (timings include compilation; --warmup excludes it)")
    )
    print(
        f"latent KV cache: {bytes_per_token(cfg, cache_dtype):,} bytes/token "
        f"((kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x "
        f"{cache_dtype.itemsize} B); {s['cache_bytes'] / 2**20:.1f} MiB allocated "
        f"({s['batch']} x {s['max_len']} slots)"
    )
    if FLAGS.speculative:
        print(
            f"MTP speculative: acceptance {s['acceptance_rate']:.3f} ({s['accepted_drafts']}/{s['drafts']}), "
            f"{s['tokens_per_step']:.2f} tokens per step"
        )


if __name__ == "__main__":
    from experiments import cli

    define_flags()
    cli.run(main)  # quiet library logs, so an error is the one line report_user_errors prints
