"""Shared pieces of the benchmarks: synthetic training batches and step timers (bench_pretrain.py,
bench_scaling.py), a kernel-call timer, config-override parsing and JSON results (bench_grouped_matmul.py,
bench_mla_decode.py). Defines no flags."""

import datetime
import json
import statistics
import time


def synthetic_batch(vocab: int, batch: int, seq_len: int):
    """Random tokens shaped like one train-step batch (grad accumulation 1): host numpy arrays [1, B, T]."""
    import numpy as np

    toks = np.random.RandomState(0).randint(0, vocab, (1, batch, seq_len + 1)).astype(np.int32)
    return {
        "inputs": toks[..., :-1],
        "targets": toks[..., 1:],
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)),
        "segment_ids": np.ones((1, batch, seq_len), np.int32),
        "loss_mask": np.ones((1, batch, seq_len), np.float32),
    }


def time_steps(step_fn, params, opt, batch, steps):
    """(seconds per step, compile seconds, last metrics, (params, opt)): one compiling step, one warm-up, `steps`
    timed."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    params, opt, m = step_fn(params, opt, np.int32(0), batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    params, opt, m = step_fn(params, opt, np.int32(1), batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt, m = step_fn(params, opt, np.int32(2 + i), batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps, compile_s, m, (params, opt)


def paired_ratios(base, other) -> tuple[float, float, float, int]:
    """Timings taken in pairs (base[i] next to other[i]): the per-pair speed-ups base[i] / other[i] as (median,
    min, max, how many > 1). A pair shares the GPU's clocks and the host's state, so its ratio is steadier than
    a ratio of two medians taken apart (one kernel timed 8 times spreads 9% on the H200)."""
    ratios = [b / o for b, o in zip(base, other, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios), sum(r > 1 for r in ratios)


def parse_overrides(spec: str) -> dict:
    """'a=1,b=true,c=name' -> {"a": 1, "b": True, "c": "name"} (kernel config overrides on the command line)."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, val = (x.strip() for x in item.split("="))
        low = val.lower()
        out[key] = low == "true" if low in ("true", "false") else (int(val) if val.lstrip("-").isdigit() else val)
    return out


def median_seconds(f, *args, warmup: int, iters: int, repeats: int = 0) -> float:
    """Median seconds per call of f(*args) after `warmup` calls. repeats=0: each of `iters` calls synchronised
    on its own; repeats > 0: the median over `repeats` runs of `iters` calls back to back (per call), which hides
    the launch gap between calls that are microseconds long."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    if repeats == 0:
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def write_results(path: str, flags_string: str, results) -> None:
    """The results list as JSON with the date, jax version and device (nothing when path is empty)."""
    if not path:
        return
    import jax

    with open(path, "w") as f:
        json.dump(
            {
                "date": datetime.datetime.now().isoformat(),
                "jax": jax.__version__,
                "device": str(jax.devices()[0].device_kind),
                "flags": flags_string,
                "results": results,
            },
            f,
            indent=1,
        )
