"""Public mla_decode: argument checks and backend dispatch (Mosaic GPU, Mosaic TPU or XLA).

"auto" picks the Mosaic GPU kernel on Hopper, the Mosaic TPU kernel on TPU, and the XLA reference
elsewhere (CPU) or when the kernel cannot take the inputs (dtype, page size, head dims); an explicit
backend="gpu"/"tpu" raises instead of falling back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mla_decode import reference as _ref
from pallas_kernels.mla_decode.common import V_DIM

BACKENDS = ("auto", "gpu", "tpu", "xla")
_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_hopper():
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return cc is not None and str(cc).startswith("9")


def _kernel_problem(backend, q, kv_pages, config):
    """Why the `backend` kernel cannot run these inputs, or None."""
    if q.dtype not in _KERNEL_DTYPES or kv_pages.dtype != q.dtype:
        return f"the kernels take bf16/f16 q and kv_pages of one dtype, got {q.dtype}, {kv_pages.dtype}"
    if q.shape[-1] != kv_pages.shape[-1] or q.shape[-1] <= V_DIM:
        return f"q and kv rows must be [{V_DIM} latent | rope] wide, got {q.shape[-1]}, {kv_pages.shape[-1]}"
    if backend == "gpu":
        from pallas_kernels.mla_decode import gpu as _gpu

        return _gpu.unsupported(q, kv_pages, config)
    from pallas_kernels.mla_decode import tpu as _tpu

    return _tpu.unsupported(q, kv_pages, config)


def resolve_backend(backend, q, kv_pages, config=None, platform=None):
    """ "auto": the kernel of `platform` ("gpu" / "tpu"; None = this host's) where the shape allows, else XLA."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        platform = jax.default_backend() if platform in (None, "auto") else platform
        if platform == "gpu" and _is_hopper():
            backend = "gpu"
        elif platform == "tpu":
            backend = "tpu"
        else:
            return "xla"
        return "xla" if _kernel_problem(backend, q, kv_pages, config) else backend
    if backend != "xla":
        problem = _kernel_problem(backend, q, kv_pages, config)
        if problem:
            raise ValueError(f"mla_decode backend={backend!r}: {problem}")
    return backend


def _check(q, kv_pages, block_table, lengths):
    if q.ndim != 4 or kv_pages.ndim != 3 or block_table.ndim != 2 or lengths.ndim != 1:
        raise ValueError(
            "mla_decode: want q [B, s_q, H, D], kv_pages [N, P, D], block_table [B, M], "
            f"lengths [B]; got {q.shape}, {kv_pages.shape}, {block_table.shape}, "
            f"{lengths.shape}"
        )
    b = q.shape[0]
    if block_table.shape[0] != b or lengths.shape[0] != b:
        raise ValueError(f"mla_decode: batch mismatch {q.shape}, {block_table.shape}, {lengths.shape}")
    if q.shape[-1] != kv_pages.shape[-1]:
        raise ValueError(f"mla_decode: q width {q.shape[-1]} != kv row width {kv_pages.shape[-1]}")
    for name, x in (("block_table", block_table), ("lengths", lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"mla_decode: {name} must be integer, got {x.dtype}")


def mla_decode(
    q, kv_pages, block_table, lengths, *, softmax_scale, backend="auto", interpret=False, config=None, platform=None
):
    """Absorbed MLA decode attention over a paged latent cache.

    q [B, s_q, H, 576] (512 latent | 64 rope); kv_pages [num_pages, page_size, 576], values are the
    first 512 columns of the same rows; block_table [B, max_pages] int32 (entries past a sequence's
    pages are ignored); lengths [B] int32 = cached tokens including the s_q new ones. Query i attends
    to positions < lengths - s_q + i + 1. Returns out [B, s_q, H, 512] in q.dtype and lse [B, s_q, H]
    float32 (natural log of the softmax denominator of the scaled scores; -inf and out = 0 for a
    query that sees nothing). `interpret=True` runs the GPU or TPU kernel body on CPU; `config` is
    the kernel's tuning config (gpu.GpuConfig / tpu.TpuConfig), None for the defaults. `platform` ("cpu" / "gpu" /
    "tpu") is the target "auto" builds for; None: this host's.
    """
    _check(q, kv_pages, block_table, lengths)
    backend = resolve_backend(backend, q, kv_pages, config, platform)
    return _dispatch(
        q,
        kv_pages,
        block_table.astype(jnp.int32),
        lengths.astype(jnp.int32),
        softmax_scale=float(softmax_scale),
        backend=backend,
        interpret=bool(interpret),
        config=config,
    )


@functools.partial(jax.jit, static_argnames=("softmax_scale", "backend", "interpret", "config"))
def _dispatch(q, kv_pages, block_table, lengths, *, softmax_scale, backend, interpret, config):
    if backend == "xla":
        return _ref.mla_decode_reference(q, kv_pages, block_table, lengths, softmax_scale=softmax_scale)
    if backend == "gpu":
        from pallas_kernels.mla_decode import gpu as _gpu

        return _gpu.mla_decode(
            q, kv_pages, block_table, lengths, softmax_scale=softmax_scale, config=config, interpret=interpret
        )
    from pallas_kernels.mla_decode import tpu as _tpu

    return _tpu.mla_decode(
        q, kv_pages, block_table, lengths, softmax_scale=softmax_scale, config=config, interpret=interpret
    )
