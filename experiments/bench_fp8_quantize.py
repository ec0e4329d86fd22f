"""The fused FP8 quantization kernels (pallas_kernels/fp8_gemm/quantize_gpu.py) against quantize.py's XLA ops:
bit-equality of values and scales (every input holds an all-zero 128 x 128 tile and a NaN) and time per call.

  python experiments/bench_fp8_quantize.py      # small's shapes: experts' rows, tokens, weights; a table
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench_util import median_seconds  # noqa: E402
from pallas_kernels.fp8_gemm import align_groups, quantize, quantize_both, quantize_gpu, take_aligned  # noqa: E402

flags.DEFINE_string(
    "activations",
    "300,200;196608,1024;196608,512;32768,1024;32768,576;1000,130",
    "R,C activation shapes (;): quantize_tiles and quantize_tiles_t; with more than 20,000 rows also the gathering "
    "quantize_tiles_t on align_groups' layout of --groups groups.",
)
flags.DEFINE_string("weights", "64,1024,1024;64,512,1024;1024,3072;1024,576;3,200,300", "weight shapes (;), f32")
flags.DEFINE_integer("groups", 64, "Groups (experts) of the gathered layout.")
flags.DEFINE_integer("iters", 20, "Calls per timing (median).")
FLAGS = flags.FLAGS


def _bits_equal(got, want) -> bool:
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    return all(
        g.shape == w.shape
        and np.array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), equal_nan=True)
        for g, w in zip(got, want)
    )


def _ms(f, *args):
    return 1e3 * median_seconds(jax.jit(f), *args, warmup=2, iters=FLAGS.iters)


def _row(op, shape, kernel, ref, *args):
    print(
        f"| {op} | {shape} | {_bits_equal(kernel(*args), ref(*args))} | {_ms(kernel, *args):.3f} | "
        f"{_ms(ref, *args):.3f} |",
        flush=True,
    )


def main(argv):
    del argv
    print(f"device {jax.devices()[0].device_kind}")
    print("| op | shape | bit-equal to XLA (zero tile, NaN tile) | fused ms | XLA ms |\n|---|---|---|---|---|")
    for spec in filter(None, FLAGS.activations.split(";")):
        r, c = map(int, spec.split(","))
        kx, ks = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (r, c)) * jnp.exp(3.0 * jax.random.normal(ks, (r, 1)))
        x = x.at[:128, :128].set(0.0).at[r // 2, c // 3].set(jnp.nan).astype(jnp.bfloat16)
        _row("quantize_tiles", [r, c], quantize_gpu.quantize_tiles, quantize.quantize_tiles, x)
        _row("quantize_tiles_t", [r, c], quantize_gpu.quantize_tiles_t, lambda x: quantize.quantize_tiles(x.T), x)
        both_ref = lambda x: (quantize.quantize_tiles(x), quantize.quantize_tiles(x.T))  # noqa: E731
        _row("quantize_both (tiles + transposed, one read)", [r, c], quantize_gpu.quantize_both, both_ref, x)
        if r > 20_000:
            alpha = jnp.full((FLAGS.groups,), 4.0)
            sizes = (jax.random.dirichlet(jax.random.key(2), alpha) * r * 0.97).astype(jnp.int32).at[1].set(0)
            index, _ = align_groups(sizes, r)
            ref = lambda x, i: quantize.quantize_tiles(take_aligned(x, i).T)  # noqa: E731
            _row("quantize_tiles_t, gathered", [r, c, FLAGS.groups], quantize_gpu.quantize_tiles_t, ref, x, index)
            both = lambda x, i: quantize_both(x, i, backend="xla")  # noqa: E731 - the XLA path zeroes unused rows
            _row("quantize_both, gathered", [r, c, FLAGS.groups], quantize_gpu.quantize_both, both, x, index)
    for spec in filter(None, FLAGS.weights.split(";")):
        shape = tuple(map(int, spec.split(",")))
        w = (jax.random.normal(jax.random.key(3), shape) * 0.02).at[..., :128, :128].set(0.0)
        w = w.at[..., 130 % shape[-2], 7].set(jnp.nan)
        _row("quantize_blocks", list(shape), quantize_gpu.quantize_blocks, quantize.quantize_blocks, w)


if __name__ == "__main__":
    app.run(main)
