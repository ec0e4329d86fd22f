"""FP8 (e4m3) GEMMs with DeepSeek-V3's fine-grained scaling: 1 x 128 activation tiles, 128 x 128 weight blocks.

quantize.py holds the scaling (quantize_gpu.py: its single-pass GPU kernels; quantize_act.py: an activation fused
with the quantization of its result, forward and backward), reference.py
the XLA reference, ops.py the public entry points (see ops.py for what each backend runs today).
"""

from pallas_kernels.fp8_gemm.gpu_config import Fp8GpuConfig
from pallas_kernels.fp8_gemm.ops import (
    act_bwd_quantize,
    act_quantize,
    align_groups,
    aligned_positions,
    fp8_gemm,
    fp8_gmm,
    fp8_tgmm,
    fp8_wgrad,
    quantize_blocks,
    quantize_both,
    quantize_tiles,
    quantize_tiles_t,
    requantize_tiles_t,
    resolve_backend,
    take_aligned,
)
from pallas_kernels.fp8_gemm.quantize import (
    E4M3_MAX,
    TILE,
    dequantize_blocks,
    dequantize_tiles,
    transposed_blocks,
)

__all__ = [
    "E4M3_MAX",
    "TILE",
    "Fp8GpuConfig",
    "act_bwd_quantize",
    "act_quantize",
    "align_groups",
    "aligned_positions",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_gemm",
    "fp8_gmm",
    "fp8_tgmm",
    "fp8_wgrad",
    "quantize_blocks",
    "quantize_both",
    "quantize_tiles",
    "quantize_tiles_t",
    "requantize_tiles_t",
    "resolve_backend",
    "take_aligned",
    "transposed_blocks",
]
