"""The FP8 Mosaic GPU kernels' tuning knobs (Fp8GpuConfig, read by gpu.py's fp8_gmm and gpu_tgmm.py's fp8_tgmm),
fp8_gmm's measured default (GEMM_CONFIG, default_config), the checks on a config and the pipeline depth it fits."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gpu_common

BLOCK_K = 128  # = the scaling tile: one promotion per K step
SMEM_BYTES = 226 * 1024  # a Hopper CTA's shared memory (232,448 bytes), less room for the pipeline's barriers


@dataclasses.dataclass(frozen=True)
class Fp8GpuConfig:
    """block_m: rows per tile (warp-specialized: split among the compute_wgs warpgroups). A warpgroup holds its
    running sum and each step's fresh accumulator, 2 x 64 x 128 float32 = 128 registers a thread: at most 64 x 128
    per warpgroup (two 128-row accumulators would need 256, past the 255-register limit)."""

    block_m: int = 64
    block_n: int = 128
    max_concurrent_steps: int = 4
    grid_tile_n: int = 8  # tile order: strips of this many N tiles (as the bf16 gmm's forward)
    num_sms: int | None = None  # None: the device's SM count (2 in interpret mode)
    warp_specialized: bool = False  # True: compute warpgroups + a memory one (gpu_common reads it too)
    compute_wgs: int = 2  # warp-specialized: compute warpgroups, each block_m / compute_wgs rows of a tile
    # Weight scales of 128 x 128 blocks are one number per K step across a tile's columns (128 % block_n == 0):
    # read that scalar and fold it into the row scales, so a promotion is one multiply-add per element
    scalar_block_scale: bool = True
    # Warp-specialized fp8_gmm: the 2 CTAs of a cluster take adjacent N tiles of one row tile, and each x step is
    # one TMA multicast into both (one L2 read for two SMs; N is padded to 2 * block_n)
    cluster_n: int = 1
    # Warp-specialized: registers per thread left to the memory warpgroup (setmaxnreg); the compute warpgroups share
    # the rest, floor8((512 - this) / compute_wgs): 152 each with 3 warpgroups at 40, 160 at 24. A warpgroup holds
    # two 64 x 128 float32 tiles (128 registers) plus scales and addresses. 40 = the pipeline's default; ptxas
    # (experiments/ptxas_offline.py, 2026-12-05): 152 registers spill 44 bytes, 160 spill 52, both outside the K loop
    memory_registers: int = gpu_common.MEMORY_REGISTERS
    # Read a K step's scales from smem before issuing its wgmma (as DeepGEMM does), not after its wait: there
    # their latency sits between the tensor cores finishing and the promotion starting, on every step's critical
    # path, and the step's smem slot is released only after them (ptxas: the release then directly follows the
    # wait). H100, gate+up: 953 / 928 TFLOP/s against 925 / 920 late, same process (BENCHMARKS.md, 2026-12-05)
    early_scales: bool = True
    # Warp-specialized fp8_gmm: a compute warpgroup none of whose rows belong to its tile's group (in a group's
    # last, partly filled tile) skips its wgmma and promotion. The pipeline's stage releases become the body's
    # (manual consumed barriers), so a busy warpgroup still releases right after its wgmma's wait and an idle one
    # at once: the first skip_idle_wgs (lax.cond around the whole step) left every release after the promotion
    # (ptxas_offline) and ran slower (853 vs 953 on the H100). On the gate+up bench's groups the 192-row tiles hold
    # 17% more rows than M, the busy warpgroups' 64-row shares 7%. H200: 975 / 955 vs 976 / 961 off (2026-12-06)
    skip_idle_wgs: bool = False
    # Warp-specialized fp8_gmm: a compute warpgroup reads where its tile's rows go (row0, and its own first row and
    # count: three global loads) at the tile's start, so their latency passes under the K loop. Otherwise they are
    # read after the loop, right before the output's TMA store (ptxas_offline: three LDG whose results the next
    # instructions wait for, in every warpgroup at once): a few hundred cycles a tile with the tensor cores idle,
    # which matters where a tile is only a few K steps (small's experts: K = 512 / 1024). skip_idle_wgs implies it
    # (it needs the count at the start). H200 at K = 7168: 949 vs 976 / 961 off; H100 at K = 1024 / 512 (small's
    # experts): 929 vs 855 / 839, 802 vs 747 / 724 (2026-12-06): default_config turns it on up to SHORT_K_MAX
    # (the ring_loads kernel reads its rows' share and count at a tile's start anyway; the knob adds row0: timed
    # together with the ring at small's shapes, BENCHMARKS.md twenty-fourth FP8 session)
    early_store_rows: bool = False
    # Warp-specialized fp8_gmm (gpu_ring.py): a hand-run load ring that copies only the x rows of compute warpgroups
    # with rows in the tile (a group's partly filled last tile), whose wgmma is skipped as well. H100 (2026-12-07,
    # BENCHMARKS.md twenty-fourth session): 1,047 / 1,050 TFLOP/s against 952 / 953 at small's gate+up (K = 1024,
    # groups of whole 128-row steps on 192-row tiles), 991 / 989 against 994 / 1,006 at V3's; small's step 1.0024x
    # BF16's with it against 0.9958x without: default_config turns it on up to SHORT_K_MAX
    ring_loads: bool = False


# The GEMMs' default (fp8_gmm, fp8_gemm and its weight gradient): three compute warpgroups of 64 rows each under a
# memory warpgroup, the fastest config of the H200 sweep (experiments/BENCHMARKS.md, 2026-12-04). The dataclass's
# own defaults stay the one-warpgroup kernel, which jax 0.10's interpreter can run on two cores.
GEMM_CONFIG = Fp8GpuConfig(block_m=192, warp_specialized=True, compute_wgs=3)
# Contractions up to this long (8 K steps a tile) take the ring_loads kernel with each tile's store rows read at its
# start (this bound was EARLY_ROWS_MAX_K before the ring joined it): early_store_rows measured 7-11% faster at K = 512
# / 1024 and 2-3% slower at K = 7168 (its comment), the ring 10% faster at K = 1024 and even at K = 7168 (its
# comment); K = 2048 untimed, so both off there
SHORT_K_MAX = 1024


def default_config(k: int) -> Fp8GpuConfig:
    """fp8_gmm's config where the caller names none, for a contraction of length k: GEMM_CONFIG, on the load ring
    with the store rows read early where a tile is only a few K steps long (SHORT_K_MAX)."""
    if k <= SHORT_K_MAX:
        return dataclasses.replace(GEMM_CONFIG, early_store_rows=True, ring_loads=True)
    return GEMM_CONFIG


def check_config(cfg):
    """ValueError unless each compute warpgroup's share of a tile fits its registers twice (sum + fresh product)."""
    nw = gpu_common.num_wgs(cfg)
    rows = cfg.block_m // nw
    if rows * nw != cfg.block_m or rows * cfg.block_n > 64 * 128 or rows % 64 or cfg.block_n % 64:
        raise ValueError(
            f"Fp8GpuConfig: block_m={cfg.block_m} rows over {nw} warpgroup(s) x block_n="
            f"{cfg.block_n} must be 64 x 128 per warpgroup at most (multiples of 64): the register file holds two"
        )
    if cfg.warp_specialized and cfg.compute_wgs not in (2, 3):
        raise ValueError(f"Fp8GpuConfig: compute_wgs must be 2 or 3, got {cfg.compute_wgs}")
    if cfg.memory_registers % 8 or not 24 <= cfg.memory_registers <= 256:
        raise ValueError(
            f"Fp8GpuConfig: memory_registers must be a multiple of 8 in [24, 256] (setmaxnreg), got "
            f"{cfg.memory_registers}"
        )
    if cfg.cluster_n not in (1, 2) or (cfg.cluster_n > 1 and not cfg.warp_specialized):
        raise ValueError(f"Fp8GpuConfig: cluster_n must be 1, or 2 when warp-specialized, got {cfg.cluster_n}")


def ws_stages(cfg, out_dtype, k_steps=None):
    """Pipeline stages of a warp-specialized kernel: the config's, at most k_steps (when static), and no more than
    fit in smem beside the block_m x block_n output staging buffers (a float32 output takes twice a bf16 one's)."""
    stage_bytes = (cfg.block_m + cfg.block_n) * (BLOCK_K + 4)  # e4m3 operand tiles + their float32 scales
    fit = (SMEM_BYTES - cfg.block_m * cfg.block_n * jnp.dtype(out_dtype).itemsize) // stage_bytes
    return max(2, min(cfg.max_concurrent_steps, fit, k_steps or cfg.max_concurrent_steps))
