"""Conversion throughput and peak memory on a synthetic multi-shard checkpoint (HF -> Orbax -> HF).

  python experiments/bench_convert.py                      # ~2 GB bf16 checkpoint, 512 MB shards
  python experiments/bench_convert.py --fp8                # the same model stored like the release (FP8 + scales)

Builds a DeepSeek-V3-shaped model of about 1B parameters (4 layers + MTP, 48 experts of width 1536, vocab 32768;
every tensor kind of the real checkpoint, including the 576-row kv_a_proj_with_mqa), writes it as sharded
safetensors, then times each direction in a fresh child process and reports its peak RSS (VmHWM, the kernel's
high-water mark of the process's resident set), so the number covers the whole process: Python, jax, TensorStore
and the conversion's buffers. Results go in
experiments/BENCHMARKS.md. tests/test_convert.py uses `make_synthetic` and `measure` for its memory test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_config():
    import dsjax

    return dsjax.ModelConfig(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=1536,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=8,
        q_lora_rank=384,
        kv_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=48,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=1,
        max_position_embeddings=4096,
        rope_scaling=None,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )


def make_synthetic(hf_dir: str, cfg=None, fp8: bool = False, max_shard_bytes: int = 512 << 20, seed: int = 0) -> int:
    """Writes a random checkpoint for `cfg` (bf16, or FP8 + block scales) as sharded safetensors; returns bytes.

    Values come from a 16M-entry random pool, so building 2 GB costs a few seconds rather than a minute of RNG;
    tensors go to disk one at a time (safetensors_io.ShardedWriter), so this stays small in memory too."""
    import jax.numpy as jnp

    from dsjax.convert import export, plan
    from dsjax.convert import fp8 as fp8_lib
    from dsjax.convert import safetensors_io as st

    cfg = cfg or synthetic_config()
    rng = np.random.RandomState(seed)
    pool = (rng.standard_normal(1 << 24) * 0.02).astype(jnp.bfloat16)
    codes = rng.randint(0, 256, 1 << 24).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] -= 1  # no NaN codes
    pools = {
        np.dtype(jnp.bfloat16): pool,
        np.dtype(np.float32): pool.astype(np.float32),
        fp8_lib.E4M3: codes.view(fp8_lib.E4M3),
    }
    leaf_dtypes = {p: np.dtype(s.dtype) for p, s in plan.leaf_specs(cfg).items()}
    specs = export.export_specs(cfg, leaf_dtypes, jnp.bfloat16, fp8)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(export.hf_config_dict(cfg, jnp.bfloat16, fp8), f, indent=2)
    writer = st.ShardedWriter(hf_dir, specs, max_shard_bytes)
    start = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape))
        if name.endswith("_scale_inv"):
            a = rng.uniform(2e-5, 1e-4, shape).astype(np.float32)
        elif "norm" in name:
            a = np.ones(shape, dtype)
        else:
            src = pools[np.dtype(dtype)]
            if n > len(src):
                a = np.resize(src, shape)  # tiled (only the 64 MB embedding / head here)
            else:
                start = (start + 7919) % (len(src) - n + 1)  # a different window of the pool per tensor, no copy
                a = src[start : start + n].reshape(shape)
        writer.write(name, a)
    writer.close()
    return writer.bytes_written


_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})

def peak_mb():
    # VmHWM: this process image's peak RSS. ru_maxrss would also do on a fresh process, but Linux carries it across
    # fork/vfork + exec, so a child of a big parent (pytest) reports the parent's peak.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from dsjax.convert import stream
base = peak_mb()
fn = getattr(stream, {fn!r})
s = fn({src!r}, {out!r}, **{kw!r})
print("RESULT " + json.dumps({{"bytes": s["bytes"], "seconds": s["seconds"], "gb_per_s": s["gb_per_s"],
      "peak_rss_mb": peak_mb(), "import_rss_mb": base,
      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(direction: str, src: str, out: str, **kw) -> dict:
    """Runs one conversion in a fresh Python process; returns its stats and peak RSS (MB, ru_maxrss)."""
    fn = {"orbax": "hf_to_orbax", "hf": "orbax_to_hf"}[direction]
    code = _CHILD.format(root=ROOT, fn=fn, src=src, out=out, kw={"every": 30.0, **kw})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(f"conversion child failed ({r.returncode}):\n{r.stderr[-4000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main():
    from absl import app, flags

    flags.DEFINE_bool("fp8", False, "Store the synthetic input like the release: FP8 weights + block scales.")
    flags.DEFINE_string("workdir", None, "Where to build the checkpoints (default: a temporary directory).")
    flags.DEFINE_integer("shard_mb", 512, "Input shard size bound in MiB.")

    def run(argv):
        import shutil

        f = flags.FLAGS
        work = f.workdir or tempfile.mkdtemp(prefix="bench_convert-")
        hf_dir, ob, back = (os.path.join(work, n) for n in ("hf", "orbax", "hf_back"))
        for d in (hf_dir, ob, back):
            shutil.rmtree(d, ignore_errors=True)
        size = make_synthetic(hf_dir, fp8=f.fp8, max_shard_bytes=f.shard_mb << 20)
        shards = len([x for x in os.listdir(hf_dir) if x.endswith(".safetensors")])
        print(f"input: {size / 1e9:.2f} GB in {shards} shards ({'FP8 + scales' if f.fp8 else 'bf16'}) at {hf_dir}")
        for name, direction, src, out, kw in (
            ("HF -> Orbax (bf16)", "orbax", hf_dir, ob, {}),
            ("Orbax -> HF" + (" (FP8)" if f.fp8 else " (bf16)"), "hf", ob, back, {"fp8": f.fp8}),
        ):
            r = measure(direction, src, out, **kw)
            print(
                f"{name:22s} {r['bytes'] / 1e9:6.2f} GB  {r['seconds']:6.1f} s  {r['gb_per_s']:.3f} GB/s  "
                f"peak RSS {r['peak_rss_mb']:.0f} MB (after imports {r['import_rss_mb']:.0f} MB)"
            )
        if not f.workdir:
            shutil.rmtree(work, ignore_errors=True)

    app.run(run)


if __name__ == "__main__":
    main()
