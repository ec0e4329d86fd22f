"""Training metrics: FLOP accounting for MFU, a console progress line, JSONL and TensorBoard writers."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

import jax

from dsjax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (datasheet), by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v6": 918e12,
}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool) -> float:
    """Model FLOPs per trained token: 6 x active matmul params (incl. lm_head, excl. the embedding lookup)
    plus causal attention 6 x H x (T/2) x (qk + v head dims) per layer; MTP depths count as extra layers."""
    counts = cfg.param_counts()
    active = counts["active_per_token_with_mtp" if with_mtp else "active_per_token"]
    if with_mtp:
        active += cfg.num_nextn_predict_layers * counts["embedding"]  # each depth runs the shared head again
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    attn = 6 * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim) * layers
    return 6 * active + attn


def peak_flops(override_tflops: float | None = None) -> float | None:
    """Total peak FLOP/s of the local devices, or None where unknown (CPU): MFU is then not reported."""
    if override_tflops:
        return override_tflops * 1e12 * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * jax.device_count()
    return None


def peak_memory_gib() -> float | None:
    """Peak bytes in use on the first local device so far, in GiB (None where the backend does not say: CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """One record per call: console line (rank 0), JSONL (<workdir>/metrics.jsonl), TensorBoard (<workdir>/tb)."""

    def __init__(self, workdir: str, total_steps: int, tensorboard: bool = True):
        self.total_steps = total_steps
        self.main = jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.main:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:
                    warnings.warn(
                        "tensorboardX is not installed; TensorBoard logs are off (JSONL still written)", stacklevel=2
                    )
        self._t0 = time.time()
        self._start_step: int | None = None

    def log(self, step: int, metrics: dict, prefix: str = "train", console: bool = True):
        scalars = {k: float(v) for k, v in metrics.items()}
        if not self.main:
            return
        self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if console:
            print(self._line(step, scalars, prefix), file=sys.stdout, flush=True)

    def _line(self, step, s, prefix):
        if prefix != "train":
            return f"[{prefix}] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in s.items())
        if self._start_step is None:
            self._start_step, self._t0 = step, time.time()
        parts = [f"step {step}/{self.total_steps}", f"loss {s.get('loss', float('nan')):.4f}"]
        if "loss/mtp" in s:
            parts.append(f"mtp {s['loss/mtp']:.4f}")
        parts += [
            f"gnorm {s.get('grad_norm', 0):.3f}",
            f"lr {s.get('lr', 0):.2e}",
        ]
        if "expert_load/max_over_mean" in s:
            # the busiest expert's tokens over the mean, worst layer: num_experts / top_k means every token of some
            # layer goes to the same experts (routers start that way; the bias update has to spread them)
            parts.append(f"expert max/mean {s['expert_load/max_over_mean']:.1f}")
        parts.append(f"{s.get('tokens_per_sec', 0) / 1e3:.1f}k tok/s")
        if "mfu" in s:
            parts.append(f"MFU {100 * s['mfu']:.1f}%")
        done = step - self._start_step
        if done > 0:
            eta = (time.time() - self._t0) / done * (self.total_steps - step)
            parts.append(f"ETA {_fmt_time(eta)}")
        return " | ".join(parts)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
