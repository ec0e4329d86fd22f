"""Grouped matmul for MoE experts: gmm ([M, K] x [G, K, N] -> [M, N]) and tgmm (its weight gradient).

`backend` picks Mosaic GPU (Hopper), Mosaic TPU or the XLA reference; see ops.py for dtypes.
"""

from pallas_kernels.grouped_matmul.gpu import GpuConfig
from pallas_kernels.grouped_matmul.ops import gmm, resolve_backend, tgmm
from pallas_kernels.grouped_matmul.tpu import TpuConfig

__all__ = ["gmm", "tgmm", "GpuConfig", "TpuConfig", "resolve_backend"]
