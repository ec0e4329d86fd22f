"""Row gathers at the MoE layer's shapes: XLA's element-wise gather against dsjax.layers.rows.gather_rows (rows moved
as 32-bit words), for e4m3 and bf16 rows, plus the two fused patterns the experts use: a gather scaled per row (the
output gradient of expert-sorted rows, weight * g[token]) and the combine (k rows per token gathered back, weighted
and summed). Prints one table: ms per call and the bandwidth of the bytes each call must move.

  python3 experiments/bench_row_gather.py                       # small's layer: 32768 tokens, k = 7, D = 1024
  python3 experiments/bench_row_gather.py --tokens=1024 --iters=3  # a CPU smoke run
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.bench_util import median_seconds, write_results  # noqa: E402

flags.DEFINE_integer("tokens", 32768, "Tokens per layer (batch x sequence)")
flags.DEFINE_integer("k", 7, "Rows per token (routed choices plus shared experts)")
flags.DEFINE_integer("dim", 1024, "Row length (the model width)")
flags.DEFINE_integer("iters", 20, "Timed calls per round")
flags.DEFINE_integer("rounds", 5, "Rounds (median reported)")
flags.DEFINE_string("out", "", "JSON results path")
FLAGS = flags.FLAGS


def cases(tokens, k, dim):
    """name -> (fn, args, bytes moved): each gather in its plain and its word-wise form."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsjax.layers.rows import gather_rows

    rng = np.random.default_rng(0)
    rows = tokens * k
    order = jnp.asarray(rng.permutation(rows), jnp.int32)  # the expert sort: a permutation of the pairs
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(rows, dtype=jnp.int32))
    token = order // k
    w_row = jnp.asarray(rng.random(rows), jnp.float32)
    weights = w_row.reshape(tokens, k)
    x = jnp.asarray(rng.standard_normal((tokens, dim)), jnp.bfloat16)
    q = x.astype(jnp.float8_e4m3fn)
    y = jnp.asarray(rng.standard_normal((rows, dim)), jnp.bfloat16)
    plain = lambda a, i: a.at[i].get(mode="fill", fill_value=0)  # noqa: E731

    def scaled(gather):
        return lambda g, i, w: (gather(g, i).astype(jnp.float32) * w[:, None]).astype(g.dtype)

    def combine(gather):
        def f(y, inv, w):
            picked = gather(y, inv).reshape(tokens, k, dim).astype(jnp.float32)
            return jnp.einsum("nkd,nk->nd", picked, w).astype(y.dtype)

        return f

    moved = lambda n_out, itemsize: 2 * n_out * dim * itemsize  # noqa: E731 - each output row read once, written once
    out = {}
    for name, gather in (("xla", plain), ("words", gather_rows)):
        out[f"e4m3 rows, {name}"] = (jax.jit(gather), (q, token), moved(rows, 1))
        out[f"bf16 rows, {name}"] = (jax.jit(gather), (x, token), moved(rows, 2))
        out[f"bf16 rows x weight, {name}"] = (jax.jit(scaled(gather)), (x, token, w_row), moved(rows, 2))
        out[f"combine, {name}"] = (jax.jit(combine(gather)), (y, inverse, weights), rows * dim * 2 + tokens * dim * 2)
    return out


def main(argv):
    del argv
    import jax

    table = cases(FLAGS.tokens, FLAGS.k, FLAGS.dim)
    times = {name: [] for name in table}
    for fn, args, _ in table.values():
        median_seconds(fn, *args, warmup=2, iters=1)  # compile
    for _ in range(FLAGS.rounds):  # interleaved rounds: clocks and neighbours affect every case alike
        for name, (fn, args, _) in table.items():
            times[name].append(median_seconds(fn, *args, warmup=0, iters=FLAGS.iters, repeats=1))
    print(f"{jax.devices()[0].device_kind}: {FLAGS.tokens} tokens x k {FLAGS.k}, D {FLAGS.dim}")
    print("| gather | ms | GB/s |\n|---|---:|---:|")
    results = []
    for name, (_, _, nbytes) in table.items():
        sec = statistics.median(times[name])
        print(f"| {name} | {sec * 1e3:.3f} | {nbytes / sec / 1e9:.0f} |")
        results.append({"case": name, "ms": sec * 1e3, "gb_s": nbytes / sec / 1e9})
    write_results(FLAGS.out, FLAGS.flags_into_string(), results)


if __name__ == "__main__":
    app.run(main)
