"""Public gmm / tgmm: backend dispatch, padding to the kernels' tile multiples, and gmm's custom VJP.

Dtypes: accumulation is always float32; the output dtype is `preferred_element_type` if given, else
lhs.dtype. The Mosaic GPU kernels take 16-bit floats (bf16, f16) only: with float32 inputs "auto"
picks the XLA reference on GPU, and an explicit backend="gpu" raises. The TPU kernel takes both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import gpu as _gpu
from pallas_kernels.grouped_matmul import gpu_common as _gpu_common
from pallas_kernels.grouped_matmul import gpu_tgmm as _gpu_tgmm
from pallas_kernels.grouped_matmul import reference as _ref
from pallas_kernels.grouped_matmul import tpu as _tpu

BACKENDS = ("auto", "gpu", "tpu", "xla")
_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Opts:
    backend: str
    interpret: bool
    out_dtype: Any
    gmm_config: Any
    tgmm_config: Any


def _is_hopper():
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return cc is not None and str(cc).startswith("9")


def resolve_backend(backend, dtype, platform=None):
    """ "auto": the kernel of `platform` ("gpu" / "tpu") where the dtype allows, else XLA. platform None: this
    host's, where a GPU must be a Hopper; a platform given is a target its caller resolved (dsjax.runtime picks
    the grouped matmul for Hopper GPUs only), so a CPU host compiling for a GPU gets the kernel too."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        host = platform in (None, "auto")
        platform = jax.default_backend() if host else platform
        if platform == "gpu" and (not host or _is_hopper()) and jnp.dtype(dtype) in _GPU_DTYPES:
            return "gpu"
        return "tpu" if platform == "tpu" else "xla"
    if backend == "gpu" and jnp.dtype(dtype) not in _GPU_DTYPES:
        raise ValueError(f"the Mosaic GPU kernel takes bf16/f16 inputs, got {jnp.dtype(dtype)}")
    return backend


def _fit_smem(cfg, out_dtype):
    # The default 4-stage ring plus a 32-bit epilogue buffer overflows the H100/H200 228 KB of shared
    # memory; a 3-stage ring leaves room for it.
    if jnp.dtype(out_dtype).itemsize > 2:
        return dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, 3))
    return cfg


def _round_up(x, m):
    return -(-x // m) * m


def _pad_to(x, shape):
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _gmm_impl(lhs, rhs, group_sizes, opts, transpose_rhs=False, out_dtype=None):
    out_dtype = out_dtype or opts.out_dtype or lhs.dtype
    backend = opts.backend
    if backend == "xla":
        return _ref.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype)
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if backend == "tpu":
        return _tpu.gmm(
            lhs,
            rhs,
            group_sizes,
            transpose_rhs=transpose_rhs,
            config=opts.gmm_config,
            interpret=opts.interpret,
            out_dtype=out_dtype,
        )
    cfg = opts.gmm_config or _fit_smem(_gpu.DLHS_CONFIG if transpose_rhs else _gpu.GMM_CONFIG, out_dtype)
    cta_n = _gpu_common.num_wgs(cfg) * cfg.block_n
    # Zero padding: extra K contributes nothing, extra rows sit past sum(gs), extra N is cut off.
    mp, kp, np_ = max(_round_up(m, 8), cfg.block_m), _round_up(k, cfg.block_k), _round_up(n, cta_n)
    g = rhs.shape[0]
    lhs_p = _pad_to(lhs, (mp, kp))
    rhs_p = _pad_to(rhs, (g, np_, kp) if transpose_rhs else (g, kp, np_))
    out = _gpu.gmm(
        lhs_p,
        rhs_p,
        group_sizes,
        transpose_rhs=transpose_rhs,
        config=cfg,
        interpret=opts.interpret,
        out_dtype=out_dtype,
    )
    return out[:m, :n]


def _tgmm_impl(lhs, dout, group_sizes, opts, out_dtype=None):
    out_dtype = out_dtype or lhs.dtype
    if opts.backend == "xla":
        return _ref.tgmm(lhs, dout, group_sizes, out_dtype=out_dtype)
    if opts.backend == "tpu":
        return _tpu.tgmm(lhs, dout, group_sizes, config=opts.tgmm_config, interpret=opts.interpret, out_dtype=out_dtype)
    cfg = opts.tgmm_config or _fit_smem(_gpu.TGMM_CONFIG, out_dtype)
    m, k = lhs.shape
    n = dout.shape[1]
    cta_n = _gpu_common.num_wgs(cfg) * cfg.block_n
    mp, kp, np_ = _round_up(m, cfg.block_k), _round_up(k, cfg.block_m), _round_up(n, cta_n)
    out = _gpu_tgmm.tgmm(
        _pad_to(lhs, (mp, kp)),
        _pad_to(dout, (mp, np_)),
        group_sizes,
        config=cfg,
        interpret=opts.interpret,
        out_dtype=out_dtype,
    )
    return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_vjp(lhs, rhs, group_sizes, opts):
    return _gmm_impl(lhs, rhs, group_sizes, opts)


def _gmm_vjp_fwd(lhs, rhs, group_sizes, opts):
    return _gmm_impl(lhs, rhs, group_sizes, opts), (lhs, rhs, group_sizes)


def _gmm_vjp_bwd(opts, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)  # kernels take one input dtype; accumulation stays float32
    # dlhs[rows of g] = dout @ rhs[g].T: read rhs as [G, N, K] in place instead of transposing it.
    dlhs = _gmm_impl(dout, rhs, group_sizes, opts, transpose_rhs=True, out_dtype=lhs.dtype)
    drhs = _tgmm_impl(lhs, dout, group_sizes, opts, out_dtype=rhs.dtype)
    return dlhs, drhs, None


_gmm_vjp.defvjp(_gmm_vjp_fwd, _gmm_vjp_bwd)


def _check(lhs, other, group_sizes, name):
    if lhs.ndim != 2 or group_sizes.ndim != 1:
        raise ValueError(f"{name}: lhs must be 2-D and group_sizes 1-D")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be integer, got {group_sizes.dtype}")
    if lhs.dtype != other.dtype:
        raise ValueError(f"{name}: operand dtypes differ: {lhs.dtype} vs {other.dtype}")


def gmm(
    lhs,
    rhs,
    group_sizes,
    *,
    backend="auto",
    interpret=False,
    preferred_element_type=None,
    gmm_config=None,
    tgmm_config=None,
    platform=None,
):
    """Grouped matmul [M, K] x [G, K, N] -> [M, N]; rows are sorted by group.

    Rows past sum(group_sizes) come out as zeros. Differentiable in lhs and rhs (custom VJP: dlhs by
    gmm against rhs read transposed, drhs by tgmm); group_sizes gets no gradient. `gmm_config` and
    `tgmm_config` are the kernel tuning configs (gpu.GpuConfig or tpu.TpuConfig) of the forward and
    of the weight gradient. `platform` ("cpu" / "gpu" / "tpu") is the target "auto" builds for; None: this host's.
    """
    _check(lhs, rhs, group_sizes, "gmm")
    if rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"gmm: shapes {lhs.shape} x {rhs.shape} with {group_sizes.shape[0]} groups")
    opts = _Opts(
        resolve_backend(backend, lhs.dtype, platform),
        bool(interpret),
        None if preferred_element_type is None else jnp.dtype(preferred_element_type),
        gmm_config,
        tgmm_config,
    )
    return _gmm_vjp(lhs, rhs, group_sizes, opts)


def tgmm(
    lhs, dout, group_sizes, *, backend="auto", interpret=False, preferred_element_type=None, config=None, platform=None
):
    """Per-group lhs^T @ dout: [M, K], [M, N] -> [G, K, N]. Rows past sum(gs) are ignored; empty
    groups give zeros. Not differentiable (it is itself a gradient)."""
    _check(lhs, dout, group_sizes, "tgmm")
    if dout.ndim != 2 or dout.shape[0] != lhs.shape[0]:
        raise ValueError(f"tgmm: shapes {lhs.shape} and {dout.shape} must share rows")
    opts = _Opts(resolve_backend(backend, lhs.dtype, platform), bool(interpret), None, None, config)
    out_dtype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    return _tgmm_impl(lhs, dout, group_sizes, opts, out_dtype=out_dtype)
