"""Fingerprints of the Mosaic GPU kernels' lowered IR, on a host without a GPU: a refactor check.

Each kernel (bf16 gmm / tgmm, FP8 fp8_gmm / fp8_tgmm, one-warpgroup and warp-specialized configs) is lowered for
CUDA and its Mosaic GPU module printed without source locations (line numbers would change with any edit) and with
the kernel's name replaced (it is the body function's). Equal fingerprints before and after a change mean the
change emits the same kernels:

  JAX_PLATFORMS=cpu python experiments/kernel_ir.py --out=/tmp/before.json   # on the old code (git stash)
  JAX_PLATFORMS=cpu python experiments/kernel_ir.py --against=/tmp/before.json
"""

from __future__ import annotations

import hashlib
import json
import re

import jax
import jax.numpy as jnp
from absl import app, flags

flags.DEFINE_string("out", "", "Write the fingerprints (JSON) here.")
flags.DEFINE_string("against", "", "Compare with fingerprints written earlier; exit 1 where any differs.")
FLAGS = flags.FLAGS

S = jax.ShapeDtypeStruct
BF16, I32, E4, F32 = jnp.bfloat16, jnp.int32, jnp.float8_e4m3fn, jnp.float32
G, M, K, N = 4, 512, 384, 256
SMS = 132  # an H100 / H200


def kernels():
    """name -> (function, argument avals) of every kernel variant fingerprinted."""
    from pallas_kernels import fp8_gemm as f8
    from pallas_kernels.fp8_gemm import gpu_tgmm as f8_tgmm
    from pallas_kernels.grouped_matmul import GpuConfig, gpu, gpu_tgmm

    sizes = S((G,), I32)
    out = {}
    for ws in (False, True):
        c = GpuConfig(num_sms=SMS, warp_specialized=ws)
        x, w = S((M, K), BF16), S((G, K, N), BF16)
        out[f"gmm_ws{ws:d}"] = (lambda a, b, g, c=c: gpu.gmm(a, b, g, config=c), (x, w, sizes))
        out[f"gmm_t_ws{ws:d}"] = (
            lambda a, b, g, c=c: gpu.gmm(a, b, g, transpose_rhs=True, config=c),
            (S((M, N), BF16), w, sizes),
        )
        out[f"tgmm_ws{ws:d}"] = (lambda a, d, g, c=c: gpu_tgmm.tgmm(a, d, g, config=c), (x, S((M, N), BF16), sizes))
    ws3 = dict(num_sms=SMS, block_m=192, warp_specialized=True, compute_wgs=3)
    fp8 = {
        "one_wg": f8.Fp8GpuConfig(num_sms=SMS),
        "ws3": f8.Fp8GpuConfig(**ws3),
        "ws3_skip_idle": f8.Fp8GpuConfig(**ws3, skip_idle_wgs=True),
        "ws3_early_rows": f8.Fp8GpuConfig(**ws3, early_store_rows=True),
        "ws3_cluster2": f8.Fp8GpuConfig(**ws3, cluster_n=2),
        "ws3_ring_loads": f8.Fp8GpuConfig(**ws3, ring_loads=True),
    }
    gmm_avals = (S((M, K), E4), S((M, K // 128), F32), S((G, N, K), E4), S((G, N // 128, K // 128), F32), sizes)
    for name, c in fp8.items():
        out[f"fp8_gmm_{name}"] = (lambda *a, c=c: f8.fp8_gmm(*a, backend="gpu", config=c), gmm_avals)
    tgmm_avals = (S((K, M), E4), S((M // 128, K), F32), S((N, M), E4), S((M // 128, N), F32), sizes)
    for name, c in {
        "one_wg": fp8["one_wg"],
        "ws": f8.Fp8GpuConfig(num_sms=SMS, block_m=128, warp_specialized=True),
    }.items():
        out[f"fp8_tgmm_{name}"] = (lambda *a, c=c: f8_tgmm.fp8_tgmm(*a, config=c), tgmm_avals)
    return out


def fingerprint(fn, avals) -> str:
    """sha256 of the Mosaic GPU modules fn lowers to, printed without locations and with the kernel name fixed."""
    from jax.experimental.mosaic.gpu import core

    seen, serialize = [], core._run_serde_pass  # the last point where the kernel is still an MLIR module

    def capture(module, *a, **kw):
        seen.append(module.operation.get_asm(enable_debug_info=False))
        return serialize(module, *a, **kw)

    core._run_serde_pass = capture
    try:
        jax.jit(lambda *a: fn(*a)).trace(*avals).lower(lowering_platforms=("cuda",))  # a new function: no cache
    finally:
        core._run_serde_pass = serialize
    if not seen:
        raise RuntimeError("no Mosaic GPU kernel was lowered (a fallback ran?)")
    text = re.sub(r"module @\w+ attributes", "module @K attributes", "\n".join(seen))
    text = re.sub(r"func\.func @\w+_mosaic_gpu\(", "func.func @K_mosaic_gpu(", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(_):
    prints = {name: fingerprint(fn, avals) for name, (fn, avals) in kernels().items()}
    old = json.load(open(FLAGS.against)) if FLAGS.against else {}
    for name, fp in prints.items():
        mark = "" if not old else ("same" if old.get(name) == fp else f"DIFFERS (was {old.get(name)})")
        print(f"{name:24s} {fp} {mark}")
    if FLAGS.out:
        json.dump(prints, open(FLAGS.out, "w"), indent=1)
    if old and any(old.get(name) != fp for name, fp in prints.items()):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
