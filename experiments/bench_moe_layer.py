"""One DeepSeek-V3 MoE layer (router + sort/dispatch + routed experts + combine + shared expert), forward and
backward, under several configurations: our Pallas grouped matmul ("gmm") against XLA's `lax.ragged_dot`, and FP8.

Shapes are --preset's (DeepSeek-V3's by default: hidden 7168, 256 routed experts of width 2048, top-8 of 8 groups
keeping 4, one shared expert), bf16 compute, --tokens tokens in one sequence batch. Times the median of --iters
calls of jit(value_and_grad) with respect to the input and every parameter, after one compiling call. A variant
that fails (XLA's ragged_dot expands to a masked dense product and can run out of memory) is reported, not fatal.

  python experiments/bench_moe_layer.py --tokens=4096 --out=moe_layer.json
  # small's MoE layer at its step's 32768 tokens, float32 master weights as in training: BF16, FP8 (BF16 weight
  # gradients), and FP8 with the shared expert as a separate MLP (shared_apart: the layout before 2026-12-05)
  python experiments/bench_moe_layer.py --preset=small --tokens=32768 --param_dtype=float32 --variants=gmm,\
      fp8:moe_backend=gmm+fp8=e4m3+fp8_wgrad=none,fp8_apart:moe_backend=gmm+fp8=e4m3+fp8_wgrad=none+shared_apart=true
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unittest import mock  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

import dsjax  # noqa: E402
from dsjax.layers import moe as moe_module  # noqa: E402
from dsjax.layers.moe import MoE  # noqa: E402
from experiments.bench_util import parse_overrides  # noqa: E402

flags.DEFINE_list("tokens", ["4096"], "Tokens per call (batch 1 x this many positions).")
flags.DEFINE_list(
    "variants",
    ["gmm", "ragged_dot"],
    "Layers to time: a moe_backend name, or NAME:FIELD=VALUE+FIELD=VALUE over ModelConfig fields, plus "
    "shared_apart=true (in FP8: the shared experts as a separate MLP, not inside the routed experts' GEMMs).",
)
flags.DEFINE_string("preset", "deepseek-v3-671b", "Model preset whose MoE layer shapes are used.")
flags.DEFINE_string("param_dtype", "bfloat16", "Parameter dtype (training keeps float32 master weights).")
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


def parse_variant(spec: str):
    """'gmm' -> ('gmm', {"moe_backend": "gmm"}, False); 'NAME:a=1+b=x' -> (NAME, overrides, shared_apart)."""
    name, _, sets = spec.partition(":")
    fields = parse_overrides(sets.replace("+", ",")) if sets else {"moe_backend": name}
    apart = bool(fields.pop("shared_apart", False))
    known = set(dsjax.ModelConfig.__dataclass_fields__)
    for key in fields:
        if key not in known:
            raise app.UsageError(f"--variants: {key!r} is not a ModelConfig field (in {spec!r})")
    return name, fields, apart


def main(argv):
    del argv
    rows = []
    variants = [parse_variant(v) for v in FLAGS.variants]
    for n in map(int, FLAGS.tokens):
        for name, fields, apart in variants:
            cfg = dsjax.ModelConfig.preset(FLAGS.preset, dtype="bfloat16", param_dtype=FLAGS.param_dtype, **fields)
            try:
                with (
                    mock.patch.object(moe_module, "shared_in_routed", lambda c: False)
                    if apart
                    else contextlib.nullcontext()
                ):
                    s = bench(cfg, n)
                row = {"tokens": n, "backend": name, "ms": s * 1e3, "tflops": layer_flops(cfg, n) / s / 1e12}
            except Exception as e:  # noqa: BLE001 - an OOM of one variant is a result, not a crash
                row = {"tokens": n, "backend": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if FLAGS.out:
                with open(FLAGS.out, "w") as f:
                    json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)
    print(f"{'tokens':>7} {'variant':>11} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
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
