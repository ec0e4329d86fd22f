"""Shared pieces of the training benchmarks (bench_pretrain.py, bench_scaling.py); defines no flags."""
import time


def synthetic_batch(vocab: int, batch: int, seq_len: int):
    """Random tokens shaped like one train-step batch (grad accumulation 1): host numpy arrays [1, B, T]."""
    import numpy as np
    toks = np.random.RandomState(0).randint(0, vocab, (1, batch, seq_len + 1)).astype(np.int32)
    return {"inputs": toks[..., :-1], "targets": toks[..., 1:],
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)),
            "segment_ids": np.ones((1, batch, seq_len), np.int32),
            "loss_mask": np.ones((1, batch, seq_len), np.float32)}


def time_steps(step_fn, params, opt, batch, steps):
    """(seconds per step, compile seconds, last metrics, params): one compiling step, one warm-up, `steps` timed."""
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
    return (time.perf_counter() - t0) / steps, compile_s, m, params
