#!/usr/bin/env bash
# First look at the Mosaic GPU FP8 kernel on a Hopper GPU (jax 0.11.x), before any timing: its test cases compiled
# (FP8_TEST_REAL_GPU=1: no interpreter) against the XLA reference, under a time limit (a hang costs the limit).
# Then time:  python3 experiments/bench_fp8_gemm.py
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
JAX_PLATFORMS=cuda FP8_TEST_REAL_GPU=1 timeout "${LIMIT:-300}" python3 -m pytest -q tests/test_fp8_gemm.py tests/test_fp8_layers.py tests/test_fp8_quantize_gpu.py tests/test_fp8_act_quantize.py tests/test_fp8_expert_stacks.py -k "tgmm_ring or gpu_kernel or gpu_grouped or bit_equal or two_kernels or split_contraction or expert_ffn or shared_experts or stacked or row_scaled or fused or off_the_tile or group_offset or every_layers or in_place"
status=$?
[ $status -eq 124 ] && echo "pytest TIMED OUT (a kernel hang?)"
exit $status
