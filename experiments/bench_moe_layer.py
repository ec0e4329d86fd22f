"""One DeepSeek-V3 MoE layer (router + sort/dispatch + routed experts + combine + shared expert), forward and
backward, with each expert backend: our Pallas grouped matmul ("gmm") against XLA's `lax.ragged_dot`.

Shapes are DeepSeek-V3's (hidden 7168, 256 routed experts of width 2048, top-8 of 8 groups keeping 4, one shared
expert), bf16 weights and compute, --tokens tokens in one sequence batch. Times the median of --iters calls of
jit(value_and_grad) with respect to the input and every parameter, after one compiling call. A backend that
fails (XLA's ragged_dot expands to a masked dense product and can run out of memory) is reported, not fatal.

  python experiments/bench_moe_layer.py --tokens=4096 --out=moe_layer.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

import dsjax  # noqa: E402
from dsjax.layers.moe import MoE  # noqa: E402

flags.DEFINE_list("tokens", ["4096"], "Tokens per call (batch 1 x this many positions).")
flags.DEFINE_list("backends", ["gmm", "ragged_dot"], "moe_backend values to time.")
flags.DEFINE_string("preset", "deepseek-v3-671b", "Model preset whose MoE layer shapes are used.")
flags.DEFINE_integer("iters", 10, "Timed calls; the median is reported.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS


def layer_flops(cfg, n: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward): routed (top-k) + shared experts + router."""
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    per_token = 2 * 3 * d * i * (cfg.num_experts_per_tok + cfg.n_shared_experts) + 2 * d * cfg.n_routed_experts
    return 3.0 * per_token * n


def bench(cfg, n: int) -> float:
    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(1), (1, n, cfg.hidden_size), jnp.bfloat16)
    params = jax.jit(layer.init)(jax.random.key(0), x)["params"]

    @jax.jit
    def step(p, x):
        def loss(p, x):
            y, aux = layer.apply({"params": p}, x)
            return jnp.mean(jnp.square(y.astype(jnp.float32))) + 0 * aux["balance_loss"]

        return jax.value_and_grad(loss, argnums=(0, 1))(p, x)

    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(FLAGS.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    rows = []
    for n in map(int, FLAGS.tokens):
        for backend in FLAGS.backends:
            cfg = dsjax.ModelConfig.preset(FLAGS.preset, dtype="bfloat16", param_dtype="bfloat16", moe_backend=backend)
            try:
                s = bench(cfg, n)
                row = {"tokens": n, "backend": backend, "ms": s * 1e3, "tflops": layer_flops(cfg, n) / s / 1e12}
            except Exception as e:  # noqa: BLE001 - an OOM of one backend is a result, not a crash
                row = {"tokens": n, "backend": backend, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if FLAGS.out:
                with open(FLAGS.out, "w") as f:
                    json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)
    print(f"{'tokens':>7} {'backend':>11} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
    for r in rows:
        if "ms" in r:
            print(f"{r['tokens']:>7} {r['backend']:>11} {r['ms']:>11.2f} {r['tflops']:>8.1f}")
        else:
            print(f"{r['tokens']:>7} {r['backend']:>11}  failed: {r['error'][:100]}")
    for n in map(int, FLAGS.tokens):
        ms = {r["backend"]: r["ms"] for r in rows if r["tokens"] == n and "ms" in r}
        if "gmm" in ms and "ragged_dot" in ms:
            print(f"tokens {n}: gmm is {ms['ragged_dot'] / ms['gmm']:.1f}x faster than ragged_dot")


if __name__ == "__main__":
    app.run(main)
