"""Pretraining throughput on one accelerator: tokens/s and MFU of the real train step against transformers.

  python experiments/bench_pretrain.py                       # `small` as small.py trains it: batch 16, MTP off and on
  python experiments/bench_pretrain.py --preset=medium --transformers=false --mtp_lambda=0.3
  XLA_FLAGS=--xla_gpu_enable_command_buffer= python experiments/bench_pretrain.py --profile --mtp_lambda=0

First transformers' DeepseekV3ForCausalLM on the same shape and batch (experiments/torch_baseline.py: bf16 weights,
its fastest experts implementation, AdamW; no MTP), in this process before JAX takes the GPU; then for each MoE
backend x attention implementation ("auto": resolved for this device) x MTP weight, the full jitted train step
(forward, backward, AdamW, router-bias update, MTP) timed over --steps steps after warm-up. Prints a table of
tokens/s, MFU, the step's device memory and the ratio to transformers. --profile attributes the step's device time
to components (experiments/step_profile.py; with command buffers off every kernel names its HLO op);
--components times blocks, attention, experts and head + CE in isolation. MFU counts 6 x active params + causal
attention FLOPs (dsjax.train.metrics.train_flops_per_token) against the device's dense bf16 peak.
"""

import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

ONE_GPU = "one_gpu"  # the variant named after experiments/configs/small.py's training knobs

flags.DEFINE_string("preset", "small", "ModelConfig preset to train.")
flags.DEFINE_list(
    "moe_backends", ["auto"], "Comma-separated MoE expert backends to compare (auto, gmm, ragged_dot, dense)."
)
flags.DEFINE_list(
    "attention_impls", ["auto"], "Comma-separated full-attention implementations (auto, xla, cudnn, splash)."
)
flags.DEFINE_string("hlo_out", "", "Write each compiled step's optimized HLO text into this directory.")
flags.DEFINE_integer("batch", 16, "Sequences per step (16: experiments/configs/small.py's).")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_integer("steps", 20, "Timed train steps per backend (after 2 warm-up steps).")
flags.DEFINE_string("remat", "none", "Rematerialisation policy (none, full, dots, dots_no_batch).")
flags.DEFINE_list("mtp_lambda", ["0", "0.3"], "MTP loss weights to time (0: the MTP module is off).")
flags.DEFINE_bool(
    "transformers",
    True,
    "First time transformers' DeepseekV3ForCausalLM on the same shape and batch "
    "(bf16 weights, its fastest experts implementation, AdamW; no MTP) in this process.",
)
flags.DEFINE_list(
    "variants",
    [ONE_GPU],
    "Step variants to time, each NAME or NAME:FIELD=VALUE+FIELD=VALUE over ModelConfig / OptimConfig fields, e.g. "
    f"xdoc:document_mask=false+unroll_layers=true (empty: the preset as it is; {ONE_GPU!r}: small.py's knobs).",
)
flags.DEFINE_string("out", "", "Optional JSON output path.")
flags.DEFINE_bool("components", False, "Also time blocks, attention, experts and head+CE in isolation.")
flags.DEFINE_list("ce_chunks", ["2048", "4096", "8192"], "Chunk sizes of the fused head + CE timed by --components.")
flags.DEFINE_bool(
    "profile",
    False,
    "Profile the step and attribute its device time to model components (experiments/step_profile.py).",
)
flags.DEFINE_integer("profile_top", 5, "Kernels of each component kept in --out's profile_top (--profile).")
FLAGS = flags.FLAGS


def timeit(fn, *args, reps=10):
    import jax

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """ "name:field=value+field=value" -> (name, ModelConfig overrides, OptimConfig overrides), values typed by
    each field's default."""
    import dataclasses

    from dsjax.config import ModelConfig
    from dsjax.train.optim import OptimConfig

    name, sep, sets = spec.partition(":")
    if name == ONE_GPU and not sep:
        from experiments.configs import small

        return name, dict(small.ONE_GPU), {"moment_dtype": small.get_config().optim.moment_dtype}
    model, optim = {}, {}
    for item in filter(None, sets.split("+")):
        key, _, value = item.partition("=")
        for cls, out in ((ModelConfig, model), (OptimConfig, optim)):
            field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
            if field is not None:
                default = field.default
                if isinstance(default, bool):
                    out[key] = value.lower() in ("1", "true", "yes")
                else:
                    out[key] = type(default)(value) if default is not None else value
                break
        else:
            raise app.UsageError(f"--variants: {key!r} is not a ModelConfig or OptimConfig field")
    return name, model, optim


def compile_step(cfg, batch_size, seq_len, mtp_lambda, optim=None):
    """The full train step compiled for one synthetic batch: (compiled, params, opt, batch, use_mtp, compile
    seconds, step memory GiB). Shared with experiments/step_ab.py."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.train.loop import init_params
    from dsjax.train.optim import OptimConfig
    from dsjax.train.step import step_fns
    from experiments.bench_util import synthetic_batch

    step_fn, _, use_mtp, tx = step_fns(
        cfg,
        OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000, **(optim or {})),
        mtp_lambda=mtp_lambda,
        balance_alpha=1e-4,
        bias_gamma=1e-3,
    )
    params = init_params(cfg, 0)
    opt = jax.jit(tx.init)(params)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch_size, seq_len))
    t0 = time.perf_counter()
    traced = step_fn.trace(params, opt, np.int32(0), batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    compile_s = t3 - t0
    # Python's share (tracing; lowering, which runs each Pallas kernel's own lowering) against XLA's and the
    # kernels' compilers: what an FP8 step with ~40 distinct Mosaic GPU kernels spends its compile time on
    print(f"  compile {compile_s:.1f}s: trace {t1 - t0:.1f}s, lower {t2 - t1:.1f}s, compile {t3 - t2:.1f}s")
    ma = compiled.memory_analysis()
    mem_gib = (
        ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    ) / 2**30
    return compiled, params, opt, batch, use_mtp, compile_s, mem_gib


def bench_step(cfg, batch_size, seq_len, steps, mtp_lambda, profile, optim=None):
    import numpy as np

    from experiments.bench_util import time_steps
    from experiments.step_profile import profile_components

    compiled, params, opt, batch, use_mtp, compile_s, mem_gib = compile_step(
        cfg, batch_size, seq_len, mtp_lambda, optim
    )
    if FLAGS.hlo_out:
        os.makedirs(FLAGS.hlo_out, exist_ok=True)
        name = f"{cfg.moe_backend}_{cfg.attention_impl}_mtp{mtp_lambda}.hlo.txt"
        with open(os.path.join(FLAGS.hlo_out, name), "w") as f:
            f.write(compiled.as_text())
    dt, _, m, (params, opt) = time_steps(compiled, params, opt, batch, steps)
    prof = None
    if profile:
        state = {"p": params, "o": opt}

        def call():
            state["p"], state["o"], out = compiled(state["p"], state["o"], np.int32(5), batch)
            return out

        prof = profile_components(compiled, call, top=FLAGS.profile_top)
        params = state["p"]
    return dt, compile_s, float(m["loss"]), use_mtp, params, prof, mem_gib


def components(cfg, params, batch_size, seq_len):
    """Forward+backward time of each piece, in isolation, at the training shapes."""
    import jax
    import jax.numpy as jnp

    from dsjax.layers.block import Block
    from dsjax.layers.mla import MLA
    from dsjax.layers.moe import MoE
    from dsjax.layers.rope import rope_cos_sin
    from dsjax.train import losses
    from dsjax.train.losses import CE_CHUNK, cross_entropy, fused_cross_entropy

    dt = jnp.dtype(cfg.dtype)
    b, t, d = batch_size, seq_len, cfg.hidden_size
    x = jax.random.normal(jax.random.key(1), (b, t, d), dt)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    cos, sin = rope_cos_sin(pos, cfg)
    layer = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    dense_p, moe_p = layer(params["dense_layers"]), layer(params["moe_layers"])

    def fb(f, p):
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32)), argnums=(0, 1)))
        return timeit(g, p, x)

    out = {}
    out["dense_block"] = fb(
        lambda p, x: Block(cfg, False).apply({"params": p}, (x, None), cos, sin, None, pos)[0][0], dense_p
    )
    out["moe_block"] = fb(
        lambda p, x: Block(cfg, True).apply({"params": p}, (x, None), cos, sin, None, pos)[0][0], moe_p
    )
    out["attention"] = fb(lambda p, x: MLA(cfg).apply({"params": p}, x, cos, sin, None, pos)[0], moe_p["self_attn"])
    out["moe_ffn"] = fb(lambda p, x: MoE(cfg).apply({"params": p}, x)[0], moe_p["mlp"])
    head = {"w": params["lm_head"], "n": params["norm"]["weight"]}
    tgt = jax.random.randint(jax.random.key(2), (b, t), 0, cfg.vocab_size)

    def head_ce(p, x):
        logits = jnp.dot(x, p["w"].astype(dt), preferred_element_type=jnp.float32)
        return cross_entropy(logits, tgt)[0]

    out["head_ce_logits"] = fb(head_ce, head)
    for chunk in FLAGS.ce_chunks:
        out[f"head_ce_fused_{chunk}"] = fb(
            lambda p, x, c=int(chunk): fused_cross_entropy(x, p["w"], tgt, chunk_size=c)[0], head
        )
    # the same-run baseline for losses.row_logsumexp (one pass over the logits): jax.nn.logsumexp (two passes)
    with mock.patch.object(losses, "row_logsumexp", lambda z: jax.nn.logsumexp(z, axis=-1)):
        out[f"head_ce_fused_{CE_CHUNK}_two_pass_lse"] = fb(
            lambda p, x: fused_cross_entropy(x, p["w"], tgt, chunk_size=CE_CHUNK)[0], head
        )
    return out


def transformers_baseline():
    """transformers' DeepseekV3ForCausalLM at the same shape and batch (no MTP), before JAX takes the GPU."""
    from dsjax.config import ModelConfig
    from experiments.torch_baseline import train_throughput

    hf = ModelConfig.preset(FLAGS.preset).to_hf()
    try:
        r = train_throughput(hf, FLAGS.batch, FLAGS.seq_len, FLAGS.steps, warmup=3)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, time ours anyway
        print(f"transformers baseline FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": str(e)[:1000]}
    print(
        f"transformers {r['transformers']} ({r['experts_implementation']} experts, {r['attn_implementation']}, "
        f"{r['dtype']} weights): step {r['step_ms']:.1f} ms, {r['tokens_per_s'] / 1e3:.1f}k tok/s, peak "
        f"{r['peak_mem_gib'] or '?'} GiB",
        flush=True,
    )
    return r


def run_one(cfg, mtp_lambda, peak, name="", optim=None):
    """Time (and optionally profile) one config's step; returns the result row."""
    from dsjax.train.metrics import train_flops_per_token

    step_s, compile_s, loss, use_mtp, params, prof, mem = bench_step(
        cfg, FLAGS.batch, FLAGS.seq_len, FLAGS.steps, mtp_lambda, FLAGS.profile, optim
    )
    tok_s = FLAGS.batch * FLAGS.seq_len / step_s
    flops = train_flops_per_token(cfg, FLAGS.seq_len, use_mtp)
    run = {
        "impl": f"{cfg.moe_backend}+{cfg.attention_impl}" + (f" {name}" if name else ""),
        "mtp_lambda": mtp_lambda,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tok_s,
        "compile_s": compile_s,
        "loss": loss,
        "model_tflops": tok_s * flops / 1e12,
        "mfu": peak and tok_s * flops / peak,
        "flops_per_token": flops,
        "mtp": use_mtp,
        "step_mem_gib": mem,
    }
    print(
        f"{run['impl']} mtp {mtp_lambda}: step {1e3 * step_s:.1f} ms, {tok_s / 1e3:.1f}k tok/s, "
        f"{run['model_tflops']:.1f} TFLOP/s model, MFU {100 * (run['mfu'] or 0):.1f}%, step memory {mem:.1f} GiB, "
        f"compile {compile_s:.0f}s",
        flush=True,
    )
    if prof is not None:
        from experiments.step_profile import format_families, format_table

        per, top, total, fams = prof
        run["profile_ms"], run["profile_top"], run["profile_kinds"] = per, top, fams
        print(format_table(per, total, 1e3 * step_s), flush=True)
        print(format_families(fams, per), flush=True)
    if FLAGS.components:
        comp = components(cfg, params, FLAGS.batch, FLAGS.seq_len)
        run["components_ms"] = {k: 1e3 * v for k, v in comp.items()}
        print("  fwd+bwd ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in comp.items()), flush=True)
    return run


def main(argv):
    del argv
    results = {"batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "preset": FLAGS.preset, "runs": []}
    base = transformers_baseline() if FLAGS.transformers else None
    results["transformers"] = base
    import jax

    from dsjax.config import ModelConfig
    from dsjax.runtime import resolve
    from dsjax.train.metrics import peak_flops

    peak = peak_flops()
    results["device"] = jax.devices()[0].device_kind
    print(f"device: {jax.devices()[0].device_kind}, peak {peak and peak / 1e12} TFLOP/s", flush=True)
    variants = [parse_variant(v) for v in FLAGS.variants]
    for backend in FLAGS.moe_backends:
        for attn in FLAGS.attention_impls:
            for name, model_sets, optim_sets in variants:
                cfg = resolve(
                    ModelConfig.preset(
                        FLAGS.preset,
                        **{"dtype": "bfloat16", "moe_backend": backend, "remat": FLAGS.remat, "attention_impl": attn}
                        | model_sets,
                    )
                )
                for mtp_lambda in map(float, FLAGS.mtp_lambda):
                    label = f"{backend}+{attn} {name}".strip()
                    try:
                        results["runs"].append(run_one(cfg, mtp_lambda, peak, name, optim_sets))
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory for one variant: report and go on
                        print(f"{label} mtp {mtp_lambda}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                        results["runs"].append({"impl": label, "mtp_lambda": mtp_lambda, "error": str(e)})
                    _write(results)  # after every run: a later one cut short by a timeout loses only itself
    print(summary_table(results), flush=True)


def _write(results):
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


def summary_table(results) -> str:
    base = results.get("transformers") or {}
    ref = base.get("tokens_per_s")
    rows = ["| run | MTP | tokens/s | MFU | step memory | vs transformers |", "|---|---|---|---|---|---|"]
    if ref:
        mem = f"{base['peak_mem_gib']:.1f} GiB peak" if base.get("peak_mem_gib") else ""
        rows.append(
            f"| transformers {base['transformers']} ({base['experts_implementation']}) | no | {ref / 1e3:.1f}k "
            f"| | {mem} | 1.00x |"
        )
    for r in results["runs"]:
        if "error" in r:
            rows.append(f"| {r['impl']} | {r['mtp_lambda']} | failed | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else ""
        rows.append(
            f"| dsjax {r['impl']} | {r['mtp_lambda'] or 'no'} | {r['tokens_per_s'] / 1e3:.1f}k | "
            f"{100 * (r['mfu'] or 0):.1f}% | {r['step_mem_gib']:.1f} GiB | {ratio} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    app.run(main)
