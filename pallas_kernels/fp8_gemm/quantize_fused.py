"""FP8 quantizers that read their input once for both of a layer's operands, and fuse the routed experts' SwiGLU
(forward and backward) into them (Pallas Triton; the XLA compositions in ops.py are their reference).

    (q, s), (qt, st) = quantize_both(x)          # x [R, C] -> quantize_tiles(x), quantize_tiles(x.T)
    (q, s), (qt, st) = quantize_swiglu(gu)       # the same of h = silu(gate) * up, gu = [gate | up] [R, 2I]
    (q, s), (qt, st) = quantize_swiglu_bwd(gu, dh)   # the same of d[gate | up] for the output gradient dh [R, I]

In the FP8 expert layer (dsjax/layers/fp8.py, rows in align_groups' layout) every activation and gradient is
quantized twice: along its columns (the operand of the forward or the activation gradient) and along its rows
(the weight gradient's, transposed). Quantized in separate passes after the XLA fusion that produces it, each
[rows x 1024] bf16 array is written once and read twice more (the SwiGLU's backward also writes d[gate | up]);
here one program reads a 128 x 128 tile (of gate and up, or of gate, up and dh), computes the value in float32,
rounds it to the compute dtype as the unfused path stores it, and writes both e4m3 tiles and their scales: the
passes after the producer disappear. Tiles are BlockSpec blocks (no masked loads), so R and the column counts must
be multiples of 128. Values are the unfused path's where the compute-dtype rounding of the SwiGLU agrees with
XLA's (its sigmoid may differ in the last bit: then the tile's codes may differ by one e4m3 step).

Untimed on a GPU (written 2026-12-04 after the fourth FP8 session's runs); experiments/bench_fp8_quantize.py
--fused times them against the separate passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fp8_gemm.quantize import E4M3, TILE
from pallas_kernels.fp8_gemm.quantize_gpu import nan_amax, to_e4m3

NUM_WARPS = 8  # a 128 x 128 float32 tile over 256 threads: 64 values each


def _quantize_tile(t):
    """A float32 [128, 128] tile -> (codes and scales along its rows (1 x 128 tiles), [1, 128] scales transposed;
    codes and scales along its columns (128 x 1 tiles), codes transposed [128, 128])."""
    q, s = to_e4m3(t, nan_amax(t, axis=1)[:, None])
    qt, st = to_e4m3(t, nan_amax(t, axis=0)[None, :])
    return q, s.T, qt.T, st


def _check(name, rows, cols):
    if rows % TILE or cols % TILE:
        raise ValueError(f"{name}: rows and columns must be multiples of {TILE}, got [{rows}, {cols}]")


def _both_kernel(x_ref, q_ref, s_ref, qt_ref, st_ref):
    q_ref[...], s_ref[...], qt_ref[...], st_ref[...] = _quantize_tile(x_ref[...].astype(jnp.float32))


def _call(kernel, inputs, in_specs, rows, cols, halves, interpret, name):
    """The pallas_call every fused quantizer makes: a (rows / 128, cols / 128) grid writing, for an output of
    `halves` x cols columns (2: the [gate | up] halves, each program writing its column tile of both), codes [R,
    halves, C] and their transposed [halves, C, R], with scales."""
    nr, nc = rows // TILE, cols // TILE
    h = (halves,) if halves > 1 else ()
    hz = (0,) if halves > 1 else ()
    q, s, qt, st = pl.pallas_call(
        kernel,
        grid=(nr, nc),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((TILE, *h, TILE), lambda r, c: (r, *hz, c)),
            pl.BlockSpec((*h, 1, TILE), lambda r, c: (*hz, c, r)),
            pl.BlockSpec((*h, TILE, TILE), lambda r, c: (*hz, c, r)),
            pl.BlockSpec((1, *h, TILE), lambda r, c: (r, *hz, c)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((rows, *h, cols), E4M3),
            jax.ShapeDtypeStruct((*h, nc, rows), jnp.float32),
            jax.ShapeDtypeStruct((*h, cols, rows), E4M3),
            jax.ShapeDtypeStruct((nr, *h, cols), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name=name,
    )(*inputs)
    width = halves * cols
    return (q.reshape(rows, width), s.reshape(width // TILE, rows).T), (
        qt.reshape(width, rows),
        st.reshape(nr, width).T,
    )


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_both(x, *, interpret: bool = False):
    """x [R, C] -> ((q [R, C], s [R, C / 128]) = quantize_tiles(x), (qt [C, R], st [C, R / 128]) =
    quantize_tiles(x.T)) from one read of x; R and C multiples of 128."""
    rows, cols = x.shape
    _check("quantize_both", rows, cols)
    spec = pl.BlockSpec((TILE, TILE), lambda r, c: (r, c))
    return _call(_both_kernel, (x,), [spec], rows, cols, 1, interpret, "fp8_quantize_both")


def swiglu(g, u, dtype):
    """silu(g) * u in float32, rounded to dtype (as the unfused layer stores h), returned in float32."""
    return (g * jax.nn.sigmoid(g) * u).astype(dtype).astype(jnp.float32)


def _swiglu_kernel(gu_ref, q_ref, s_ref, qt_ref, st_ref):
    g, u = gu_ref[:, 0, :].astype(jnp.float32), gu_ref[:, 1, :].astype(jnp.float32)
    q_ref[...], s_ref[...], qt_ref[...], st_ref[...] = _quantize_tile(swiglu(g, u, gu_ref.dtype))


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_swiglu(gu, *, interpret: bool = False):
    """gu [R, 2I] = [gate | up] -> both quantizations (as quantize_both) of h = silu(gate) * up [R, I], rounded to
    gu's dtype first; R and I multiples of 128."""
    rows, width = gu.shape
    _check("quantize_swiglu", rows, width // 2)
    spec = pl.BlockSpec((TILE, 2, TILE), lambda r, c: (r, 0, c))
    gu3 = gu.reshape(rows, 2, width // 2)
    return _call(_swiglu_kernel, (gu3,), [spec], rows, width // 2, 1, interpret, "fp8_quantize_swiglu")


def swiglu_bwd(g, u, dh, dtype):
    """(d gate, d up) of silu(g) * u for the output gradient dh, float32 math rounded to dtype, in float32."""
    sig = jax.nn.sigmoid(g)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    return dg.astype(dtype).astype(jnp.float32), (dh * g * sig).astype(dtype).astype(jnp.float32)


def _swiglu_bwd_kernel(gu_ref, dh_ref, q_ref, s_ref, qt_ref, st_ref):
    g, u = gu_ref[:, 0, :].astype(jnp.float32), gu_ref[:, 1, :].astype(jnp.float32)
    dg, du = swiglu_bwd(g, u, dh_ref[...].astype(jnp.float32), dh_ref.dtype)
    for half, t in enumerate((dg, du)):
        q, s, qt, st = _quantize_tile(t)
        q_ref[:, half, :], s_ref[half], qt_ref[half], st_ref[:, half, :] = q, s, qt, st


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_swiglu_bwd(gu, dh, *, interpret: bool = False):
    """gu [R, 2I] = [gate | up], dh [R, I] (the gradient of silu(gate) * up) -> both quantizations (as
    quantize_both) of d[gate | up] [R, 2I], rounded to dh's dtype first; R and I multiples of 128."""
    rows, width = gu.shape
    _check("quantize_swiglu_bwd", rows, width // 2)
    if dh.shape != (rows, width // 2):
        raise ValueError(f"quantize_swiglu_bwd: dh must be {(rows, width // 2)}, got {dh.shape}")
    specs = [pl.BlockSpec((TILE, 2, TILE), lambda r, c: (r, 0, c)), pl.BlockSpec((TILE, TILE), lambda r, c: (r, c))]
    gu3 = gu.reshape(rows, 2, width // 2)
    return _call(_swiglu_bwd_kernel, (gu3, dh), specs, rows, width // 2, 2, interpret, "fp8_quantize_swiglu_bwd")
