#!/usr/bin/env bash
# First look at the MLA decode kernels on a Hopper GPU (jax 0.11.x), before any timing:
#  1. the GPU test cases compiled (MLA_TEST_REAL_GPU=1: no interpreter);
#  2. every benchmark config (defaults, then --sweep's) against the XLA reference on small shapes,
#     each config in its own process under a time limit, so a failure or a hang costs one config.
# Prints one line per (shape, config) with its errors. Then time:  python3 experiments/bench_mla_decode.py
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${LIMIT:-150}  # seconds per config (compiles of 5 small shapes)

timeout 400 python3 -m pytest -q tests/test_mla_decode.py -k "gpu_kernel and not lowers"
tests=$?
[ $tests -eq 124 ] && echo "pytest TIMED OUT (a kernel hang?)"

failed=0
while IFS= read -r cfg; do
  echo "== $cfg"
  timeout "$LIMIT" python3 experiments/bench_mla_decode.py --quick --configs="$cfg" 2>&1 \
    | grep -E "^(OK|FAIL)|failing|Error" | cut -c1-600
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "TIMEOUT after ${LIMIT}s (a hang?): $cfg"
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
done < <(python3 experiments/bench_mla_decode.py --list_configs --sweep)
echo "pytest rc=$tests; configs failing: $failed"
exit $(( tests != 0 || failed != 0 ))
