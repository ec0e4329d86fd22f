"""What the FP8 test files share (test_fp8_gemm.py: the GEMM kernels; test_fp8_wgrad.py: the weight-gradient
kernels; test_fp8_layers.py: FP8 training): whether the Mosaic GPU kernels run in the interpreter (on the CPU) or
compiled (FP8_TEST_REAL_GPU=1 on a Hopper GPU), the configs only a GPU runs, and the relative error of a result
against its reference."""

from __future__ import annotations

import os

import numpy as np

from pallas_kernels.fp8_gemm import Fp8GpuConfig

INTERPRET = os.environ.get("FP8_TEST_REAL_GPU") != "1"
# the layers call the kernels compiled: on a GPU (FP8_TEST_REAL_GPU=1) the "gpu" backend too
LAYER_BACKENDS = ["xla"] + ([] if INTERPRET else ["gpu"])


def rel(a, b):
    """Relative error of a against b: the norm of the difference over b's, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# Three compute warpgroups + the memory one are four threads per SM blocking on each other's barriers: jax 0.10's
# GPU interpreter deadlocks on them on a 2-core host (its callbacks wait for each other on the CPU client's
# thread pool). Those variants are checked compiled on the GPU only (and lowered for CUDA in test_gpu_lowering).
GPU_ONLY_WS3 = (
    []
    if INTERPRET
    else [
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, memory_registers=24),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, skip_idle_wgs=True),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, early_store_rows=True),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, ring_loads=True),
        Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3, ring_loads=True, early_store_rows=True),
    ]
)
