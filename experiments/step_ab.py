"""Paired step timing: is one train-step variant faster than another beyond the run-to-run noise?

  python experiments/step_ab.py --variants="one_gpu,fp8x:<one_gpu's knobs>+fp8=e4m3+fp8_layers=experts" \\
      --mtp_lambda=0.3 --rounds=8 --steps=5

bench_pretrain.py times its variants one after another, each once: a ~1% drift of the GPU's clocks or of the
host between two timings is as large as the difference FP8 makes to `small`'s step. Here every variant is compiled
first and kept resident (each holds its own parameters and optimizer state: the GPU must hold all of them), then
timed in `--rounds` rounds of `--steps` steps, the order reversed every other round (A B, B A, ...) so a drift
falls on both alike. Reported: each variant's median step over the rounds, and against the first variant the
per-round ratios (the pair timed back to back): their median, min and max and in how many rounds it was faster.
Flags shared with bench_pretrain.py (--preset, --batch, --seq_len, --variants, --steps, --mtp_lambda: its first
value, --out); the MoE and attention implementations are "auto". --fp8_gemm="NAME:field=value,...;...": variant NAME
is traced with those Fp8GpuConfig fields set on fp8_gmm's default config (gpu_config.default_config, at every K),
e.g. --variants="one_gpu,fp8:<knobs>,fp8_noring:<same knobs>" --fp8_gemm="fp8_noring:ring_loads=false" (the load
ring is the default at K <= 1024 only; ring_loads=true puts it at every K).
"""

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments.bench_util import paired_ratios, parse_overrides  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """bench_pretrain.py's flags (defined by importing it) and --rounds; only when run as a script, so importing
    this module (tests) defines no flags that other experiments' modules define too."""
    from experiments import bench_pretrain  # noqa: F401

    flags.DEFINE_integer("rounds", 8, "Rounds of --steps steps per variant, interleaved.")
    flags.DEFINE_string(
        "fp8_gemm", "", "NAME:field=value,...;...: Fp8GpuConfig overrides of fp8_gmm's default per variant."
    )


def gemm_overrides(spec: str, names) -> dict:
    """--fp8_gemm's "NAME:a=1,b=true;..." -> {NAME: {"a": 1, "b": True}}, each NAME one of `names`."""
    out = {}
    for item in filter(None, spec.split(";")):
        name, _, sets = item.partition(":")
        if name not in names:
            raise ValueError(f"--fp8_gemm: {name!r} is not a variant of {list(names)}")
        out[name] = parse_overrides(sets)
    return out


@contextlib.contextmanager
def default_gemm(overrides):
    """fp8_gmm's default config with `overrides` while a variant is traced (and JAX's caches cleared on both sides:
    ops.py jits each kernel call, and a cached trace would carry the other variant's config)."""
    if not overrides:
        yield
        return
    import jax

    from pallas_kernels.fp8_gemm import gpu_config

    original = gpu_config.default_config
    gpu_config.default_config = lambda k: dataclasses.replace(original(k), **overrides)
    jax.clear_caches()
    try:
        yield
    finally:
        gpu_config.default_config = original
        jax.clear_caches()


def build(spec, mtp_lambda):
    """One variant compiled, with its state warmed up by two steps: (name, run(n) -> seconds per step, info)."""
    import jax
    import numpy as np

    from dsjax.config import ModelConfig
    from dsjax.runtime import resolve
    from experiments import bench_pretrain

    name, model_sets, optim_sets = bench_pretrain.parse_variant(spec)
    cfg = resolve(ModelConfig.preset(FLAGS.preset, **{"dtype": "bfloat16"} | model_sets))
    compiled, params, opt, batch, _, compile_s, mem = bench_pretrain.compile_step(
        cfg, FLAGS.batch, FLAGS.seq_len, mtp_lambda, optim_sets
    )
    state = {"p": params, "o": opt, "i": 0}

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            state["p"], state["o"], m = compiled(state["p"], state["o"], np.int32(state["i"]), batch)
            state["i"] += 1
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / n

    run(2)
    return name, run, {"compile_s": compile_s, "step_mem_gib": mem}


def summarize(names, times, tokens):
    """Markdown table: each variant's median / min / max step over the rounds, and its per-round ratio to the
    first variant (> 1: faster than it)."""
    rows = ["| variant | median step | min / max | tokens/s | vs first, per round: median (min .. max) | faster |"]
    rows.append("|---|---|---|---|---|---|")
    base = times[names[0]]
    for name in names:
        t = times[name]
        median, low, high, faster = paired_ratios(base, t)
        rows.append(
            f"| {name} | {1e3 * statistics.median(t):.1f} ms | {1e3 * min(t):.1f} / {1e3 * max(t):.1f} | "
            f"{tokens / statistics.median(t) / 1e3:.1f}k | {median:.4f}x ({low:.4f} .. {high:.4f}) | "
            f"{faster} / {len(t)} |"
        )
    return "\n".join(rows)


def main(argv):
    del argv
    import jax

    if len(FLAGS.variants) < 2:
        raise app.UsageError(f"--variants: name at least two to compare, got {FLAGS.variants}")
    mtp_lambda = float(FLAGS.mtp_lambda[0])
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    try:
        gemm = gemm_overrides(FLAGS.fp8_gemm, [spec.partition(":")[0] for spec in FLAGS.variants])
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    built = []
    for spec in FLAGS.variants:
        with default_gemm(gemm.get(spec.partition(":")[0])):
            built.append(build(spec, mtp_lambda))
    names = [b[0] for b in built]
    if len(set(names)) != len(names):
        raise app.UsageError(f"--variants: names must differ, got {names}")
    times = {name: [] for name in names}
    for r in range(FLAGS.rounds):
        order = built if r % 2 == 0 else built[::-1]
        for name, run, _ in order:
            times[name].append(run(FLAGS.steps))
        print(f"round {r}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.1f} ms" for n in names), flush=True)
    table = summarize(names, times, FLAGS.batch * FLAGS.seq_len)
    print(table, flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            info = {name: meta for name, _, meta in built}
            json.dump({"device": jax.devices()[0].device_kind, "times_s": times, "info": info}, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
