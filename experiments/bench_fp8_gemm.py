"""FP8 GEMMs (pallas_kernels/fp8_gemm) against our BF16 grouped matmul and XLA's bf16 dot, same process.

For each grouped shape G,M,K,N (routed experts; group sizes a seeded Dirichlet split of M) it times the expert
layer's three GEMMs: forward [M,K] x [G,K,N], dgrad [M,N] x [G,N,K]^T and wgrad (per-group x^T dy), in BF16
through our gmm / tgmm and in FP8 through fp8_gmm / fp8_tgmm on operands quantized beforehand; plus the
quantization itself, and "fp8 body": our BF16 gmm kernel fed e4m3 operands with a K-major rhs and block_k=128
(no scales: the ceiling a scaled kernel can approach). For each dense shape M,K,N (DeepSeek-V3's projections) it
times forward, dgrad and wgrad with jnp.dot in bf16 and fp8_gemm. On a GPU every FP8 product runs a Mosaic GPU
kernel (--fp8_backend); the grouped FP8 wgrad (fp8_tgmm) takes rows laid out group by group on 128-row steps
(align_groups, as FP8 training does; that re-layout is timed with the quantization); --wgrad_sweep adds its kernel's
other configs (warp-specialized) beside the default.

  python experiments/bench_fp8_gemm.py                  # BASELINES shapes + V3 dense projections, table + --out
  python experiments/bench_fp8_gemm.py --sweep="one_wg:;ws:warp_specialized=true,block_m=128" --dense=
                                                        # the FP8 kernel's forward under each Fp8GpuConfig, first
  python experiments/bench_fp8_gemm.py --grouped=32,16384,7168,4096 --dense= --wgrad_sweep= --fwd_pairs=8
                                                        # + the forward pair timed 8 times: medians, per-pair ratio
  ... --fwd_pairs=8 --sustain=5                         # + each forward run 5 s under nvidia-smi: held clock?
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import gpu_clocks  # noqa: E402
from experiments.bench_util import median_seconds, paired_ratios, parse_overrides, write_results  # noqa: E402
from pallas_kernels import fp8_gemm as f8  # noqa: E402
from pallas_kernels.grouped_matmul import GpuConfig, gmm, gpu, tgmm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("grouped", "32,16384,7168,4096;32,16384,2048,7168;8,8192,7168,4096", "G,M,K,N shapes (;)")
flags.DEFINE_string(
    "dense",
    "16384,7168,1536;16384,1536,24576;16384,7168,576;16384,512,32768;16384,16384,7168;16384,7168,18432",
    "M,K,N shapes (;): V3's q_a, q_b, kv_a, kv_b, o_proj and dense gate/up projections at 16k tokens",
)
flags.DEFINE_integer("iters", 10, "Calls per timing (median).")
flags.DEFINE_float("alpha", 4.0, "Dirichlet concentration of the group sizes.")
flags.DEFINE_string("fp8_backend", "", "fp8_gmm / fp8_gemm backend (gpu, xla); empty: gpu on a GPU, else xla.")
flags.DEFINE_string(
    "sweep",
    "",
    "NAME:FIELD=VALUE,...;... Fp8GpuConfig variants: time each one's grouped forward on the first --grouped "
    "shape (and check it against the first variant's output); the fastest runs the table's FP8 GEMMs.",
)
flags.DEFINE_string(
    "wgrad_sweep",
    "ws:warp_specialized=true,block_m=128;ws3:warp_specialized=true,block_m=192,compute_wgs=3",
    "NAME:FIELD=VALUE,...;... Fp8GpuConfig variants of the grouped FP8 wgrad (fp8_tgmm) timed beside its default "
    "(the one-warpgroup kernel) on every --grouped shape.",
)
flags.DEFINE_integer(
    "fwd_pairs",
    0,
    "After each grouped shape's row, time bf16's and fp8's forward this many times more, alternating, and report "
    "medians and per-pair ratios (the acceptance numbers: one timing of a kernel spreads ~9% on the H200).",
)
flags.DEFINE_float(
    "sustain",
    0.0,
    "After each grouped shape's row, run bf16's and fp8's forward back to back for this many seconds each while "
    "nvidia-smi samples the SM clock and power (experiments/gpu_clocks.py): whether the card held its clock.",
)
flags.DEFINE_string("out", "", "Optional JSON output path.")


def _sizes(g, m, seed=0):
    p = np.random.default_rng(seed).dirichlet([FLAGS.alpha] * g)
    s = np.floor(p * m).astype(np.int32)
    s[-1] += m - s.sum()
    return jnp.asarray(s)


def _backend():
    return FLAGS.fp8_backend or ("gpu" if jax.default_backend() == "gpu" else "xla")


def _median(jitted, *args):
    # calls back to back (median of 5 runs of --iters calls): a per-call host sync added ~0.1-0.15 ms to each call
    # on the H200 (bench_fp8_quantize.py --floor, 2026-12-04), 7% of a 1.35 ms GEMM
    return median_seconds(jitted, *args, warmup=2, iters=FLAGS.iters, repeats=5)


def _time(f, *args):
    return _median(jax.jit(f), *args)


CONFIG = {"fp8": None}  # the Fp8GpuConfig of the table's FP8 GEMMs (None: the kernel's default; --sweep's best)


def _fp8(f, *a, **kw):
    return f(*a, backend=_backend(), config=CONFIG["fp8"], **kw)


def _forward_operands(g, m, k, n):
    """The grouped shape's bf16 operands (x [M, K], w [G, K, N], dy [M, N]), group sizes, and x's and w's e4m3."""
    key = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(key[1], (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    dy = jax.random.normal(key[2], (m, n), jnp.bfloat16)
    return x, w, dy, _sizes(g, m), f8.quantize_tiles(x), f8.quantize_blocks(w)


def forward_pairs(g, m, k, n, pairs):
    """bf16's gmm and fp8_gmm forward timed `pairs` times each, alternating (jitted once): their TFLOP/s medians
    (min, max) and the per-pair fp8 / bf16 speed-up's median (min, max)."""
    x, w, _, gs, (xq, xs), (wq, ws) = _forward_operands(g, m, k, n)
    bf16 = jax.jit(lambda x, w: gmm(x, w, gs))
    fp8 = jax.jit(lambda *a: _fp8(f8.fp8_gmm, *a, gs))
    times = {"bf16": [], "fp8": []}
    for _ in range(pairs):
        times["bf16"].append(_median(bf16, x, w))
        times["fp8"].append(_median(fp8, xq, xs, wq, ws))
    tflops = {name: sorted(2 * m * k * n / t / 1e12 for t in ts) for name, ts in times.items()}
    ratio = paired_ratios(times["bf16"], times["fp8"])[:3]
    return {"tflops": tflops, "fp8_over_bf16": ratio, "seconds": times}


def sustained(g, m, k, n, seconds):
    """bf16's gmm and fp8_gmm forward, each run back to back for about `seconds` under gpu_clocks.sampled(): the
    rate over the whole run and the clock / power summary, per kernel."""
    x, w, _, gs, (xq, xs), (wq, ws) = _forward_operands(g, m, k, n)
    runs = {
        "bf16": (jax.jit(lambda x, w: gmm(x, w, gs)), (x, w)),
        "fp8": (jax.jit(lambda *a: _fp8(f8.fp8_gmm, *a, gs)), (xq, xs, wq, ws)),
    }
    out = {}
    for name, (f, args) in runs.items():
        jax.block_until_ready(f(*args))  # compiled outside the sampled window
        calls, t0 = 0, time.perf_counter()
        with gpu_clocks.sampled() as samples:
            while time.perf_counter() - t0 < seconds:
                for _ in range(50):
                    res = f(*args)
                jax.block_until_ready(res)
                calls += 50
        elapsed = time.perf_counter() - t0
        out[name] = {"tflops": 2 * m * k * n * calls / elapsed / 1e12, "calls": calls, **gpu_clocks.summary(samples)}
        print(
            f"  sustained {name} fwd {elapsed:.1f} s: {out[name]['tflops']:.0f} TFLOP/s; {gpu_clocks.line(out[name])}",
            flush=True,
        )
    return out


def _pairs_line(p):
    med = {name: statistics.median(v) for name, v in p["tflops"].items()}
    spread = {name: f"{v[0]:.0f}-{v[-1]:.0f}" for name, v in p["tflops"].items()}
    r = p["fp8_over_bf16"]
    return (
        f"  fwd, {len(p['tflops']['fp8'])} alternating pairs: fp8 median {med['fp8']:.0f} TFLOP/s ({spread['fp8']}), "
        f"bf16 {med['bf16']:.0f} ({spread['bf16']}), fp8/bf16 per pair {r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f}x)"
    )


def bench_grouped(g, m, k, n):
    x, w, dy, gs, (xq, xs), (wq, ws) = _forward_operands(g, m, k, n)
    flops = 2 * m * k * n
    wtq, wts = f8.quantize_blocks(jnp.swapaxes(w, 1, 2))
    dq, ds = f8.quantize_tiles(dy)
    index, aligned = f8.align_groups(gs, m)  # the FP8 wgrad's layout: each group on 128-row steps
    aq, a_s = f8.quantize_tiles(f8.take_aligned(x, index).T)
    bq, bs = f8.quantize_tiles(f8.take_aligned(dy, index).T)
    t = {
        "bf16 fwd": _time(lambda x, w: gmm(x, w, gs), x, w),
        # gmm's own dlhs (its VJP; the unused forward is dead code under jit)
        "bf16 dgrad": _time(lambda x, w, d: jax.vjp(lambda x: gmm(x, w, gs), x)[1](d)[0], x, w, dy),
        "bf16 wgrad": _time(lambda x, d: tgmm(x, d, gs), x, dy),
        "fp8 fwd": _time(lambda *a: _fp8(f8.fp8_gmm, *a, gs), xq, xs, wq, ws),
        "fp8 dgrad": _time(lambda *a: _fp8(f8.fp8_gmm, *a, gs), dq, ds, wtq, wts),
        "fp8 wgrad": _time(lambda *a: f8.fp8_tgmm(*a, aligned, backend=_backend()), aq, a_s, bq, bs),
        # what writing float32 costs against bf16's tgmm, which writes bf16 (V3's shape: 3.8 GB of float32)
        "fp8 wgrad bf16 out": _time(
            lambda *a: f8.fp8_tgmm(*a, aligned, backend=_backend(), out_dtype=jnp.bfloat16), aq, a_s, bq, bs
        ),
    }
    for name, cfg in _configs(FLAGS.wgrad_sweep) if _backend() == "gpu" else ():
        t[f"fp8 wgrad {name}"] = _time(
            lambda *a, c=cfg: f8.fp8_tgmm(*a, aligned, backend="gpu", config=c), aq, a_s, bq, bs
        )
    if jax.default_backend() == "gpu":  # the unscaled ceiling: our bf16 kernel body on e4m3, K-major rhs
        cfg = GpuConfig(block_k=128, grid_tile_n=8)
        t["fp8 body (no scales) fwd"] = _time(
            lambda a, b: gpu.gmm(a, b, gs, transpose_rhs=True, config=cfg, out_dtype=jnp.bfloat16), xq, wq
        )
    quant = {
        "quantize x (tiles), XLA": _time(f8.quantize_tiles, x),
        "quantize x, fused": _time(lambda x: f8.quantize_tiles(x, backend=_backend()), x),
        "align + transpose + quantize x (wgrad operand), XLA": _time(
            lambda x: f8.quantize_tiles(f8.take_aligned(x, index).T), x
        ),
        "the same, fused (quantize_tiles_t)": _time(lambda x: f8.quantize_tiles_t(x, index, backend=_backend()), x),
        "quantize w (blocks, transposing), XLA": _time(f8.quantize_blocks, w),
        "quantize w, fused": _time(lambda w: f8.quantize_blocks(w, backend=_backend()), w),
    }
    return {k: (v, flops / v / 1e12) for k, v in t.items()}, quant


def bench_dense(m, k, n):
    key = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(key[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(key[1], (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    dy = jax.random.normal(key[2], (m, n), jnp.bfloat16)
    flops = 2 * m * k * n
    xq, xs = f8.quantize_tiles(x)
    wq, ws = f8.quantize_blocks(w)
    wtq, wts = f8.quantize_blocks(w.T)
    dq, ds = f8.quantize_tiles(dy)
    aq, a_s = f8.quantize_tiles(x.T)
    bq, bs = f8.quantize_tiles(dy.T)
    t = {
        "bf16 fwd": _time(lambda x, w: jnp.dot(x, w), x, w),
        "bf16 dgrad": _time(lambda d, w: jnp.dot(d, w.T), dy, w),
        "bf16 wgrad": _time(lambda x, d: jnp.dot(x.T, d), x, dy),
        "fp8 fwd": _time(lambda *a: _fp8(f8.fp8_gemm, *a), xq, xs, wq, ws),
        "fp8 dgrad": _time(lambda *a: _fp8(f8.fp8_gemm, *a), dq, ds, wtq, wts),
        "fp8 wgrad": _time(lambda *a: _fp8(f8.fp8_gemm, *a, rhs_tiles=True), aq, a_s, bq, bs),
        # what FP8 training runs: fp8_tgmm's kernel on the contraction cut into chunks (split-K), summed
        "fp8 wgrad split": _time(lambda *a: f8.fp8_wgrad(*a, backend=_backend()), aq, a_s, bq, bs),
    }
    quant = {
        "quantize x (tiles), XLA": _time(f8.quantize_tiles, x),
        "quantize x, fused": _time(lambda x: f8.quantize_tiles(x, backend=_backend()), x),
        "transpose + quantize x (wgrad operand), XLA": _time(lambda x: f8.quantize_tiles(x.T), x),
        "the same, fused (quantize_tiles_t)": _time(lambda x: f8.quantize_tiles_t(x, backend=_backend()), x),
    }
    return {k: (v, flops / v / 1e12) for k, v in t.items()}, quant


def _configs(spec):
    """'NAME:FIELD=VALUE,...;...' -> [(name, Fp8GpuConfig)]."""
    out = []
    for item in filter(None, spec.split(";")):
        name, _, sets = item.partition(":")
        out.append((name, f8.Fp8GpuConfig(**parse_overrides(sets))))
    return out


def sweep(g, m, k, n):
    """Forward time of fp8_gmm's GPU kernel under each --sweep config; the largest difference from the first
    config's output (the configs compute the same sums: any difference is a bug) relative to its largest entry."""
    key = jax.random.split(jax.random.key(0), 2)
    xq, xs = f8.quantize_tiles(jax.random.normal(key[0], (m, k), jnp.bfloat16))
    wq, ws = f8.quantize_blocks((jax.random.normal(key[1], (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16))
    gs, rows, first, best = _sizes(g, m), [], None, None
    for name, cfg in _configs(FLAGS.sweep):
        f = jax.jit(lambda *a, c=cfg: f8.fp8_gmm(*a, gs, backend="gpu", config=c))
        try:
            t0 = time.perf_counter()  # the first call compiles: the kernel's share of a train step's compile time
            out = np.asarray(f(xq, xs, wq, ws), np.float32)
            compile_s = time.perf_counter() - t0
            t = _time(f, xq, xs, wq, ws)
        except Exception as e:  # noqa: BLE001 - one config failing to compile must not hide the others
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        first = out if first is None else first
        diff = float(np.abs(out - first).max() / max(np.abs(first).max(), 1e-30))
        tflops = 2 * m * k * n / t / 1e12
        print(
            f"  fp8 fwd {name}: {1e3 * t:.2f} ms, {tflops:.0f} TFLOP/s, diff {diff:.1e}, first call {compile_s:.1f} s",
            flush=True,
        )
        rows.append(
            {"config": name, "fields": str(cfg), "seconds": t, "rel_diff_vs_first": diff, "first_call_s": compile_s}
        )
        if diff < 1e-2 and (best is None or t < best[0]):
            best = (t, name, cfg)
    if best:
        print(f"  fastest: {best[1]} (runs the table's FP8 GEMMs but the grouped wgrad)", flush=True)
        CONFIG["fp8"] = best[2]
    return rows


def _row(name, t):
    cells = " | ".join(f"{k}: {1e3 * s:.2f} ms, {tf:.0f} TFLOP/s" for k, (s, tf) in t.items())
    ratios = [f"{op} fp8/bf16 {t[f'bf16 {op}'][0] / t[f'fp8 {op}'][0]:.2f}x" for op in ("fwd", "dgrad", "wgrad")]
    return f"| {name} | {cells} | {', '.join(ratios)} |"


def main(argv):
    del argv
    print(f"device {jax.devices()[0].device_kind}; fp8 backend '{_backend()}' (xla = the dequantize reference); the")
    print("grouped fp8 wgrad writes float32 (bf16's tgmm: bf16), on group-aligned rows")
    results = []
    shapes = [tuple(map(int, spec.split(","))) for spec in filter(None, FLAGS.grouped.split(";"))]
    if FLAGS.sweep and shapes:
        print("sweep G={} M={} K={} N={}".format(*shapes[0]), flush=True)
        results.append({"shape": list(shapes[0]), "sweep": sweep(*shapes[0])})
    for g, m, k, n in shapes:
        t, quant = bench_grouped(g, m, k, n)
        print(_row(f"gmm G={g} M={m} K={k} N={n}", t), flush=True)
        print("  " + ", ".join(f"{k}: {1e3 * v:.2f} ms" for k, v in quant.items()), flush=True)
        results.append({"shape": [g, m, k, n], "grouped": True, "times": t, "quantize": quant})
        if FLAGS.fwd_pairs:
            results[-1]["fwd_pairs"] = forward_pairs(g, m, k, n, FLAGS.fwd_pairs)
            print(_pairs_line(results[-1]["fwd_pairs"]), flush=True)
        if FLAGS.sustain:
            results[-1]["sustained"] = sustained(g, m, k, n, FLAGS.sustain)
    for spec in filter(None, FLAGS.dense.split(";")):
        m, k, n = map(int, spec.split(","))
        t, quant = bench_dense(m, k, n)
        print(_row(f"dense M={m} K={k} N={n}", t), flush=True)
        print("  " + ", ".join(f"{k}: {1e3 * v:.2f} ms" for k, v in quant.items()), flush=True)
        results.append({"shape": [m, k, n], "grouped": False, "times": t, "quantize": quant})
    write_results(FLAGS.out, " ".join(sys.argv[1:]), results)


if __name__ == "__main__":
    app.run(main)
