#!/usr/bin/env bash
# The FP8 kernel's config sweep on the H200 (experiments/BENCHMARKS.md, "FP8 kernels, second GPU session"): every
# Fp8GpuConfig variant's grouped forward on the gate+up shape, then the full table of the three GEMMs on the
# fastest one. Extra arguments go to bench_fp8_gemm.py (e.g. --grouped=... --dense=... --out=...).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
W2="warp_specialized=true,block_m=128"
W3="warp_specialized=true,block_m=192,compute_wgs=3"
SW="ws3:$W3;one_wg:;one_wg_col:scalar_block_scale=false;ws:$W2;ws_col:$W2,scalar_block_scale=false"
SW="$SW;ws_m3:$W2,max_concurrent_steps=3;ws_m5:$W2,max_concurrent_steps=5;ws_g16:$W2,grid_tile_n=16"
SW="$SW;ws_g4:$W2,grid_tile_n=4;ws3_m3:$W3,max_concurrent_steps=3"
SW="$SW;ws3_g4:$W3,grid_tile_n=4;ws3_g16:$W3,grid_tile_n=16"
# x multicast over 2-CTA clusters (written 2026-12-04 after the GPU runs; not yet timed)
SW="$SW;ws3_c2:$W3,cluster_n=2;ws_c2:$W2,cluster_n=2;ws3_c2_g16:$W3,cluster_n=2,grid_tile_n=16"
# 160 registers a compute thread instead of 152 (memory_registers 24 instead of 40; written 2026-12-05, untimed)
SW="$SW;ws3_r24:$W3,memory_registers=24"
# where a tile's rows go read at its start (early_store_rows); a warpgroup with no row of its tile's group skips
# its wgmma, releasing its stages itself (skip_idle_wgs, which reads them early too); both written 2026-12-05, untimed
SW="$SW;ws3_early:$W3,early_store_rows=true"
SW="$SW;ws3_skip:$W3,skip_idle_wgs=true;ws3_skip_r24:$W3,skip_idle_wgs=true,memory_registers=24;ws_skip:$W2,skip_idle_wgs=true"
# the scales read after the wgmma's wait (the default before 2026-12-05)
SW="$SW;ws3_late:$W3,early_scales=false;ws_late:$W2,early_scales=false"
timeout "${LIMIT:-400}" python3 experiments/bench_fp8_gemm.py --sweep="$SW" "$@" 2>&1 | grep -v "^[WI][0-9]\{4\}"
