"""Pretraining throughput on one accelerator: tokens/s and MFU of the real train step, plus where step time goes.

  python experiments/bench_pretrain.py                       # `small` preset, bf16, batch 8 x 2048
  python experiments/bench_pretrain.py --moe_backends=ragged_dot,dense --steps=20 --out=/tmp/bench.json

For each MoE backend: the full jitted train step (forward, backward, AdamW, router-bias update, MTP) timed over
--steps steps after warm-up, then a component breakdown timed in isolation with the same shapes: one dense block,
one MoE block (router + experts + shared expert + attention), attention alone, the routed experts alone, and the
output head + cross-entropy, each forward+backward. MFU counts 6 x active params + causal attention FLOPs
(dsjax.train.metrics.train_flops_per_token) against the device's dense bf16 peak.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("preset", "small", "ModelConfig preset to train.")
flags.DEFINE_string("moe_backends", "gmm", "Comma-separated MoE expert backends to compare (gmm, ragged_dot, "
                    "dense).")
flags.DEFINE_string("attention_impls", "xla", "Comma-separated full-attention implementations (xla, cudnn).")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_integer("steps", 20, "Timed train steps per backend (after 2 warm-up steps).")
flags.DEFINE_string("remat", "none", "Rematerialisation policy (none, full, dots, dots_no_batch).")
flags.DEFINE_float("mtp_lambda", 0.3, "MTP loss weight (0 disables the MTP module in the step).")
flags.DEFINE_string("out", "", "Optional JSON output path.")
flags.DEFINE_bool("components", True, "Also time the component breakdown.")
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


def bench_step(cfg, batch_size, seq_len, steps, mtp_lambda):
    import jax
    import jax.numpy as jnp
    from dsjax.train.optim import OptimConfig
    from dsjax.train.trainer import _step_fns, init_params
    from experiments.bench_util import synthetic_batch, time_steps
    step_fn, _, use_mtp, tx = _step_fns(cfg, OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000), mtp_lambda,
                                        1e-4, 1e-3)
    params = init_params(cfg, 0)
    opt = jax.jit(tx.init)(params)
    batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch_size, seq_len))
    dt, compile_s, m, params = time_steps(step_fn, params, opt, batch, steps)
    return dt, compile_s, float(m["loss"]), use_mtp, params


def components(cfg, params, batch_size, seq_len):
    """Forward+backward time of each piece, in isolation, at the training shapes."""
    import jax
    import jax.numpy as jnp
    from dsjax.layers.block import Block
    from dsjax.layers.moe import MoE
    from dsjax.layers.mla import MLA
    from dsjax.layers.rope import rope_cos_sin
    from dsjax.train.losses import cross_entropy
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
    out["dense_block"] = fb(lambda p, x: Block(cfg, False).apply({"params": p}, (x, None), cos, sin, None, pos)[0][0],
                            dense_p)
    out["moe_block"] = fb(lambda p, x: Block(cfg, True).apply({"params": p}, (x, None), cos, sin, None, pos)[0][0],
                          moe_p)
    out["attention"] = fb(lambda p, x: MLA(cfg).apply({"params": p}, x, cos, sin, None, pos)[0], moe_p["self_attn"])
    out["moe_ffn"] = fb(lambda p, x: MoE(cfg).apply({"params": p}, x)[0], moe_p["mlp"])
    head = {"w": params["lm_head"], "n": params["norm"]["weight"]}
    tgt = jax.random.randint(jax.random.key(2), (b, t), 0, cfg.vocab_size)

    def head_ce(p, x):
        logits = jnp.dot(x, p["w"].astype(dt), preferred_element_type=jnp.float32)
        return cross_entropy(logits, tgt)[0]
    out["head_ce"] = fb(head_ce, head)
    return out


def main(argv):
    del argv
    import jax
    from dsjax.config import ModelConfig
    from dsjax.train.metrics import peak_flops, train_flops_per_token
    peak = peak_flops()
    results = {"device": jax.devices()[0].device_kind, "batch": FLAGS.batch, "seq_len": FLAGS.seq_len, "runs": []}
    print(f"device: {jax.devices()[0].device_kind}, peak {peak and peak / 1e12} TFLOP/s", flush=True)
    combos = [(b, a) for b in FLAGS.moe_backends.split(",") for a in FLAGS.attention_impls.split(",")]
    for backend, attn in combos:
        cfg = ModelConfig.preset(FLAGS.preset, dtype="bfloat16", moe_backend=backend, remat=FLAGS.remat,
                                 attention_impl=attn)
        backend = f"{backend}+{attn}"
        try:
            step_s, compile_s, loss, use_mtp, params = bench_step(cfg, FLAGS.batch, FLAGS.seq_len, FLAGS.steps,
                                                                  FLAGS.mtp_lambda)
        except Exception as e:  # e.g. out of memory for one backend: report and go on
            print(f"{backend}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            results["runs"].append({"moe_backend": backend, "error": str(e)[:1000]})
            continue
        tok_s = FLAGS.batch * FLAGS.seq_len / step_s
        flops = train_flops_per_token(cfg, FLAGS.seq_len, use_mtp)
        run = {"moe_backend": backend, "step_ms": 1e3 * step_s, "tokens_per_s": tok_s, "compile_s": compile_s,
               "loss": loss, "model_tflops": tok_s * flops / 1e12, "mfu": peak and tok_s * flops / peak,
               "flops_per_token": flops, "mtp": use_mtp}
        print(f"{backend}: step {1e3 * step_s:.1f} ms, {tok_s / 1e3:.1f}k tok/s, {run['model_tflops']:.1f} TFLOP/s "
              f"model, MFU {100 * (run['mfu'] or 0):.1f}%, compile {compile_s:.0f}s", flush=True)
        if FLAGS.components:
            comp = components(cfg, params, FLAGS.batch, FLAGS.seq_len)
            run["components_ms"] = {k: 1e3 * v for k, v in comp.items()}
            est = (cfg.num_dense_layers * comp["dense_block"] + cfg.num_moe_layers * comp["moe_block"] +
                   comp["head_ce"] + (comp["moe_block"] + comp["head_ce"] if use_mtp else 0))
            print("  fwd+bwd ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in comp.items()) +
                  f"; layers x blocks + head(s) = {1e3 * est:.1f} ms of the {1e3 * step_s:.1f} ms step", flush=True)
        results["runs"].append(run)
        del params
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
