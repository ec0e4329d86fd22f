#!/usr/bin/env bash
# First look at the Mosaic GPU FP8 kernel on a Hopper GPU (jax 0.11.x), before any timing: its test cases compiled
# (FP8_TEST_REAL_GPU=1: no interpreter, the GPU backend: tests/conftest.py) against the XLA reference, under a time limit (a hang costs the limit).
# Compiling dominates (one program a case), so where pytest-xdist is importable the cases run in WORKERS processes
# (default 4) sharing the GPU, each allocating GPU memory as it goes (no 75% preallocation each). The device has no
# xdist: `bash ../shared/tools/device-wheels.sh pytest-xdist execnet` adds its wheels to .whl. Extra arguments go to
# pytest (e.g. -x, --tb=short). Then time:  python3 experiments/bench_fp8_gemm.py
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PAR=()
if python3 -c "import xdist" 2>/dev/null; then
  PAR=(-n "${WORKERS:-4}")
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
FP8_TEST_REAL_GPU=1 timeout "${LIMIT:-300}" python3 -m pytest -q "${PAR[@]}" tests/test_fp8_gemm.py tests/test_fp8_wgrad.py tests/test_fp8_layers.py tests/test_fp8_quantize_gpu.py tests/test_fp8_act_quantize.py tests/test_fp8_expert_stacks.py -k "tgmm_ring or gpu_kernel or gpu_grouped or bit_equal or two_kernels or split_contraction or expert_ffn or shared_experts or stacked or row_scaled or fused or off_the_tile or group_offset or every_layers or in_place" "$@"
status=$?
[ $status -eq 124 ] && echo "pytest TIMED OUT (a kernel hang, or more cases than the limit compiles: raise LIMIT or WORKERS)"
exit $status
