"""MLA decode attention over a paged latent cache (DeepSeek-V3 absorbed form, 512 latent + 64 rope).

`backend` picks Mosaic GPU (Hopper), Mosaic TPU or the XLA reference; see ops.py.
"""

from pallas_kernels.mla_decode.common import V_DIM
from pallas_kernels.mla_decode.ops import mla_decode, resolve_backend
from pallas_kernels.mla_decode.reference import mla_decode_reference

__all__ = ["V_DIM", "mla_decode", "mla_decode_reference", "resolve_backend"]
