"""The fused FP8 quantization kernels (pallas_kernels/fp8_gemm/quantize_gpu.py) against quantize.py's XLA ops:
bit-equality of values and scales (every input holds an all-zero 128 x 128 tile and a NaN) and time per call.

  python experiments/bench_fp8_quantize.py      # small's shapes: experts' rows, tokens, weights; a table
  python experiments/bench_fp8_quantize.py --sweep=196608,1024   # tilings, blocked variants, a cast's speed
  python experiments/bench_fp8_quantize.py --probe               # where XLA's and Triton's rounding part
  python experiments/bench_fp8_quantize.py --floor=196608,1024    # one pass's memory floor: copies, casts, timers
  python experiments/bench_fp8_quantize.py --act=204800,512       # SwiGLU fused with its quantization vs unfused
  python experiments/bench_fp8_quantize.py --requant=32768,1024,512  # weight-gradient operands: from e4m3 tiles
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from dsjax.layers.mlp import swiglu  # noqa: E402
from experiments.bench_util import median_seconds  # noqa: E402
from pallas_kernels.fp8_gemm import (  # noqa: E402
    align_groups,
    quantize,
    quantize_act,
    quantize_gpu,
    take_aligned,
)

flags.DEFINE_string(
    "activations",
    "300,200;196608,1024;196608,512;32768,1024;32768,576;1000,130",
    "R,C activation shapes (;): quantize_tiles and quantize_tiles_t; with more than 20,000 rows also the gathering "
    "quantize_tiles_t on align_groups' layout of --groups groups.",
)
flags.DEFINE_string("weights", "64,1024,1024;64,512,1024;1024,3072;1024,576;3,200,300", "weight shapes (;), f32")
flags.DEFINE_integer("groups", 64, "Groups (experts) of the gathered layout.")
flags.DEFINE_integer("iters", 20, "Calls per timing (median).")
flags.DEFINE_string(
    "floor",
    "",
    "R,C: what one pass over a bf16 [R, C] array costs: XLA copy / scale / casts and Triton casts and copies at "
    "several tilings, each timed per call (synchronised) and back to back (no launch gaps).",
)
flags.DEFINE_string(
    "act",
    "",
    "R,I: the experts' SwiGLU forward / backward fused with the quantization of its result (quantize_act.py) "
    "against the unfused path the layer took before (XLA's SwiGLU, then the Triton quantize_tiles), back to back.",
)
flags.DEFINE_string(
    "requant",
    "",
    "N,D,I: the FP8 experts' four weight-gradient operands at N tokens x (--k routed + 1 shared) rows, hidden D, "
    "expert width I, two ways: quantized from the compute-dtype values (quantize_tiles_t; the SwiGLU passes write "
    "h and d[gate | up]) and requantized from the e4m3 tiles (requantize_tiles_t; the SwiGLU passes write tiles "
    "only), each pass timed, the requantizer's reads (uint16 pairs, uint32 quads, bytes) x block_c x warps swept.",
)
flags.DEFINE_integer("k", 6, "Routed experts per token for --requant (plus one shared).")
flags.DEFINE_bool("probe", False, "Print where XLA's and Triton's float32 -> e4m3 casts and divisions round apart.")
flags.DEFINE_string(
    "sweep",
    "",
    "R,C: time quantize_tiles (block_r x num_warps) and the gathering quantize_tiles_t (block_c x num_warps) "
    "variants on one activation shape, beside a Triton cast-only pass and XLA's cast (the memory floor's stand-ins).",
)
FLAGS = flags.FLAGS


def _compare(got, want) -> str:
    """ "equal", or per output: how many entries differ and by how much (values: the largest difference over the
    wanted entry's magnitude, 0.0625 being one e4m3 step at the top of a binade; scales: the largest relative)."""
    out = []
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    names = {2: ("q", "s"), 3: ("value", "q", "s"), 4: ("q", "s", "qt", "st")}[len(got)]
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape:
            return f"{name} shape {g.shape} != {w.shape}"
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        bad = ~((g == w) | (np.isnan(g) & np.isnan(w)))
        if bad.any():
            rel = np.abs(g[bad] - w[bad]) / np.maximum(np.abs(w[bad]), 1e-30)
            out.append(f"{name}: {int(bad.sum())} differ (max rel {np.nanmax(rel, initial=0.0):.2g})")
    return "; ".join(out) or "equal"


def _ms(f, *args):
    # back to back: a per-call host sync adds ~0.1 ms, half of a quantizer's time (--floor shows both)
    return 1e3 * median_seconds(jax.jit(f), *args, warmup=2, iters=FLAGS.iters, repeats=5)


def _row(op, shape, kernel, ref, *args):
    print(
        f"| {op} | {shape} | {_compare(kernel(*args), jax.jit(ref)(*args))} | {_ms(kernel, *args):.3f} | "
        f"{_ms(ref, *args):.3f} |",
        flush=True,
    )


def _cast_kernel(x_ref, q_ref, *, rows, cols, block_r, block_c, dtype):
    row = pl.program_id(0) * block_r + jnp.arange(block_r, dtype=jnp.int32)
    col = pl.program_id(1) * block_c + jnp.arange(block_c, dtype=jnp.int32)
    ok = (row < rows)[:, None] & (col < cols)[None, :]
    t = pltriton.load(x_ref.at[row[:, None], col[None, :]], mask=ok, other=0).astype(jnp.float32)
    pltriton.store(q_ref.at[row[:, None], col[None, :]], t.astype(dtype), mask=ok)


def _blocked_cast_kernel(x_ref, q_ref, *, dtype):
    q_ref[...] = x_ref[...].astype(jnp.float32).astype(dtype)


def _triton_cast(x, block_r=64, block_c=128, num_warps=4, dtype=quantize.E4M3, blocked=False):
    """A cast-only pass (to e4m3, or to bf16: a copy) with the quantizers' tiling by default: the bytes of
    quantize_tiles without its arithmetic. blocked: BlockSpec tiles instead of masked pointer loads."""
    rows, cols = x.shape
    grid = (-(-rows // block_r), -(-cols // block_c))
    if blocked:
        kernel, spec = (
            functools.partial(_blocked_cast_kernel, dtype=dtype),
            pl.BlockSpec((block_r, block_c), lambda r, c: (r, c)),
        )
    else:
        kernel = functools.partial(_cast_kernel, rows=rows, cols=cols, block_r=block_r, block_c=block_c, dtype=dtype)
        spec = pl.BlockSpec((rows, cols), lambda r, c: (0, 0))
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((rows, cols), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
    )(x)


def floor(r: int, c: int):
    """One pass's cost over x [R, C] bf16 by XLA and by Pallas Triton: is the quantizers' ~1.5 TB/s the e4m3 cast,
    the tiling, the Pallas Triton lowering or the per-call timer?"""
    x = (jax.random.normal(jax.random.key(0), (r, c)) * 3.0).astype(jnp.bfloat16)
    e4m3, bf16 = r * c * 3 / 1e9, r * c * 4 / 1e9  # bytes read + written, GB
    print(f"| pass over [{r}, {c}] bf16 | ms per call | TB/s | ms back to back | TB/s |\n|---|---|---|---|---|")
    cases = [
        ("XLA x * 2 (bf16 out)", lambda x: x * 2, bf16),
        ("XLA cast to e4m3", lambda x: x.astype(quantize.E4M3), e4m3),
        ("XLA x * 2 to e4m3", lambda x: (x * 2).astype(quantize.E4M3), e4m3),
        ("XLA quantize_tiles", quantize.quantize_tiles, e4m3),
        ("Triton quantize_tiles (default)", quantize_gpu.quantize_tiles, e4m3),
    ]
    for br, bc, w in ((64, 128, 4), (128, 128, 8), (256, 128, 8), (32, 512, 4), (64, 1024, 8), (16, 1024, 4)):
        for blocked in (False, True):
            tag = f"{br} x {bc}, {w} warps{', blocked' if blocked else ''}"
            cast = functools.partial(_triton_cast, block_r=br, block_c=bc, num_warps=w, blocked=blocked)
            cases.append((f"Triton cast to e4m3, {tag}", cast, e4m3))
            cases.append((f"Triton copy (bf16), {tag}", functools.partial(cast, dtype=jnp.bfloat16), bf16))
    for name, f, gb in cases:
        try:
            one = 1e3 * median_seconds(jax.jit(f), x, warmup=2, iters=FLAGS.iters)
            b2b = 1e3 * median_seconds(jax.jit(f), x, warmup=2, iters=FLAGS.iters, repeats=5)
            print(f"| {name} | {one:.3f} | {gb / one:.2f} | {b2b:.3f} | {gb / b2b:.2f} |", flush=True)
        except Exception as e:  # noqa: BLE001 - a tiling Triton refuses: say so, time the rest
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |", flush=True)


def sweep(r: int, c: int):
    x = (jax.random.normal(jax.random.key(0), (r, c)) * 3.0).astype(jnp.bfloat16)
    alpha = jnp.full((FLAGS.groups,), 4.0)
    sizes = (jax.random.dirichlet(jax.random.key(2), alpha) * r * 0.97).astype(jnp.int32)
    index, _ = align_groups(sizes, r)
    gb = r * c * 3 / 1e9  # bf16 read + e4m3 written
    print(f"| variant [{r}, {c}] | ms | TB/s (bf16 read + e4m3 written) |\n|---|---|---|")

    def row(name, f, *args):
        ms = _ms(f, *args)
        print(f"| {name} | {ms:.3f} | {gb / ms:.2f} |", flush=True)

    row("XLA cast to e4m3", lambda x: x.astype(quantize.E4M3), x)
    row("Triton cast, 64 x 128 tiles", _triton_cast, x)
    for block_r in (32, 64, 128):
        for warps in (2, 4, 8):
            f = functools.partial(quantize_gpu.quantize_tiles, block_r=block_r, num_warps=warps)
            row(f"quantize_tiles block_r={block_r} warps={warps}", f, x)
            f = functools.partial(quantize_gpu.quantize_tiles, block_r=block_r, num_warps=warps, blocked=True)
            row(f"quantize_tiles blocked block_r={block_r} warps={warps}", f, x)
    for block_c in (32, 64, 128):
        for warps in (4, 8):
            f = functools.partial(quantize_gpu.quantize_tiles_t, block_c=block_c, num_warps=warps, blocked=True)
            row(f"quantize_tiles_t blocked block_c={block_c} warps={warps}", f, x)
    for block_c in (32, 64, 128):
        for warps in (2, 4, 8):
            f = functools.partial(quantize_gpu.quantize_tiles_t, block_c=block_c, num_warps=warps)
            row(f"quantize_tiles_t gathered block_c={block_c} warps={warps}", f, x, index)


def _div_kernel(a_ref, o_ref, *, ieee):
    a = a_ref[...]
    if not ieee:
        o_ref[...] = quantize.E4M3_MAX / a  # Triton's division: div.full
        return
    o_ref[...] = pltriton.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[jnp.full(a.shape, quantize.E4M3_MAX, jnp.float32), a],
        constraints="=f,f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )[0]


def probe():
    """Where XLA on this GPU and the Triton kernels round differently: float32 -> e4m3 casts against the correctly
    rounded cast (ml_dtypes) and against rounding through float16 first; 448 / amax against IEEE division."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    mant = rng.integers(0, 1 << 23, 1 << 20, dtype=np.uint32)
    expo = rng.integers(127 - 12, 127 + 9, 1 << 20, dtype=np.uint32)
    v = np.clip((expo << 23 | mant).view(np.float32) * np.where(rng.random(1 << 20) < 0.5, -1, 1), -448, 448)
    v = v.astype(np.float32).reshape(1024, 1024)
    codes = lambda a: np.asarray(a).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)  # noqa: E731 - correct rounding
    exact = codes(v)
    via_f16 = codes(v.astype(np.float16))
    xla = np.asarray(jax.jit(lambda a: a.astype(quantize.E4M3))(jnp.asarray(v))).view(np.uint8)
    tri = np.asarray(_triton_cast(jnp.asarray(v))).view(np.uint8)
    n = v.size
    print(f"| f32 -> e4m3 of {n} values | differ from correct rounding | differ from rounding via f16 |")
    print("|---|---|---|")
    for name, got in (("XLA", xla), ("Triton", tri)):
        print(f"| {name} | {int((got != exact).sum())} | {int((got != via_f16).sum())} |")
    amax = np.abs(v) + np.float32(1e-3)
    ieee = np.float32(quantize.E4M3_MAX) / amax
    xla_div = np.asarray(jax.jit(lambda a: quantize.E4M3_MAX / a)(jnp.asarray(amax)))
    print(f"| 448 / amax: XLA | {int((xla_div != ieee).sum())} differ from IEEE | |")
    for exact_div in (False, True):
        got = pl.pallas_call(
            functools.partial(_div_kernel, ieee=exact_div),
            out_shape=jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            grid=(1024 // 64,),
            in_specs=[pl.BlockSpec((64, 1024), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((64, 1024), lambda i: (i, 0)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        )(jnp.asarray(amax))
        got = np.asarray(got)
        print(
            f"| 448 / amax: Triton {'div.rn' if exact_div else '/'} | {int((got != ieee).sum())} differ from IEEE "
            f"| {int((got != xla_div).sum())} differ from XLA |"
        )


def act(r: int, i: int):
    """The experts' SwiGLU and both quantizations of its result, forward and backward, two ways: unfused (XLA's
    SwiGLU, then the Triton quantize_tiles and quantize_tiles_t passes) and fused (act_quantize, what the layer
    runs, + the transposing pass), at several tile heights. Codes compared with the unfused path's (rare one-step
    differences where Triton's sigmoid rounds apart from XLA's)."""
    kg, kd = jax.random.split(jax.random.key(5))
    gu = jax.random.normal(kg, (r, 2 * i), jnp.bfloat16)
    dh = jax.random.normal(kd, (r, i), jnp.bfloat16)
    bf16 = jnp.bfloat16
    both_ways = lambda x: (quantize_gpu.quantize_tiles(x), quantize_gpu.quantize_tiles_t(x))  # noqa: E731

    def unfused_fwd(gu):
        return both_ways(swiglu(gu[:, :i], gu[:, i:], bf16))

    def unfused_bwd(gu, dh):
        return both_ways(jnp.concatenate(jax.vjp(lambda a, b: swiglu(a, b, bf16), gu[:, :i], gu[:, i:])[1](dh), -1))

    print(f"device {jax.devices()[0].device_kind}")
    print("| op | shape | fused vs unfused | fused ms | unfused ms |\n|---|---|---|---|---|")
    shape = [r, 2 * i]
    for block_r, warps in ((16, 4), (32, 4), (64, 4), (64, 8)):  # the first: quantize_act.BLOCK_R's default
        how = dict(block_r=block_r, num_warps=warps)

        def fwd(gu, how=how):
            h, q = quantize_act.act_quantize(gu, swiglu, bf16, **how)
            return q, quantize_gpu.quantize_tiles_t(h)

        def bwd(gu, dh, how=how):
            dgu, q = quantize_act.act_bwd_quantize(gu, dh, swiglu, **how)
            return q, quantize_gpu.quantize_tiles_t(dgu)

        _row(f"fwd: act_quantize ({block_r} rows x {warps} warps) + quantize_tiles_t", shape, fwd, unfused_fwd, gu)
        _row(f"bwd: act_bwd_quantize ({block_r} x {warps}) + quantize_tiles_t", shape, bwd, unfused_bwd, gu, dh)


def requant(n: int, d: int, i: int):
    """Per pass, ms, both ways (see --requant); the requantizer's codes compared with XLA's (dequantize_tiles, then
    quantize_tiles_t)."""
    kk = FLAGS.k + 1
    rows = n * kk
    sizes = (jax.random.dirichlet(jax.random.key(2), jnp.full((FLAGS.groups,), 4.0)) * rows).astype(jnp.int32)
    index, _ = align_groups(sizes.at[-1].add(rows - sizes.sum()), rows)
    token = index // kk  # a zero row (index == rows) -> n: out of range, read as zero
    r = index.shape[0]
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (n, d), jnp.bfloat16)
    gu = jax.random.normal(keys[1], (r, 2 * i), jnp.bfloat16)
    dh = jax.random.normal(keys[2], (r, i), jnp.bfloat16)
    w_row = jax.random.uniform(keys[3], (r,))
    xq, xs = quantize_gpu.quantize_tiles(x)
    h, (hq, hs) = quantize_act.act_quantize(gu, swiglu, jnp.bfloat16)
    dgu, (dq, ds) = quantize_act.act_bwd_quantize(gu, dh, swiglu)
    print(f"device {jax.devices()[0].device_kind}; {n} tokens x {kk} = {r} aligned rows, D {d}, I {i}")
    print("| pass | from values ms | from e4m3 tiles ms | requantizer vs XLA |\n|---|---|---|---|")
    requant_ref = lambda q, s, *a: quantize.quantize_tiles(  # noqa: E731
        (lambda v: v if len(a) < 2 else v * a[1][:, None])(
            take_aligned(quantize.dequantize_tiles(q, s), a[0]) if a else quantize.dequantize_tiles(q, s)
        ).T
    )
    cases = [
        ("x^T gathered (gate_up wgrad)", (quantize_gpu.quantize_tiles_t, x, token), (xq, xs, token)),
        ("h^T (down wgrad)", (quantize_gpu.quantize_tiles_t, h), (hq, hs)),
        (
            "dy^T gathered x weight (down wgrad)",
            (quantize_gpu.quantize_tiles_t, x, token, w_row),
            (xq, xs, token, w_row),
        ),
        ("d[gate|up]^T (gate_up wgrad)", (quantize_gpu.quantize_tiles_t, dgu), (dq, ds)),
    ]
    for name, (f, *old), new in cases:
        q, s, *rest = new
        req = lambda q, s, *a: quantize_gpu.quantize_tiles_t(q, *a, *[None] * (2 - len(a)), s)  # noqa: E731
        same = _compare(jax.jit(req)(q, s, *rest), jax.jit(requant_ref)(q, s, *rest))
        print(f"| {name} | {_ms(f, *old):.3f} | {_ms(req, q, s, *rest):.3f} | {same} |", flush=True)
    print(
        "| SwiGLU fwd: act_quantize keep / tiles only | "
        f"{_ms(lambda a: quantize_act.act_quantize(a, swiglu, jnp.bfloat16), gu):.3f} | "
        f"{_ms(lambda a: quantize_act.act_quantize(a, swiglu, jnp.bfloat16, keep=False), gu):.3f} | |"
    )
    print(
        "| SwiGLU bwd: act_bwd_quantize keep / tiles only | "
        f"{_ms(lambda a, b: quantize_act.act_bwd_quantize(a, b, swiglu), gu, dh):.3f} | "
        f"{_ms(lambda a, b: quantize_act.act_bwd_quantize(a, b, swiglu, keep=False), gu, dh):.3f} | |",
        flush=True,
    )
    print("| requantizer tiling (x^T gathered / d[gate|up]^T) | ms | ms |\n|---|---|---|")
    for pack in (2, 4, 1):
        for block_c in (32, 64, 128):
            for warps in (2, 4, 8):
                how = dict(block_c=block_c, num_warps=warps, pack=pack)
                f = functools.partial(quantize_gpu.quantize_tiles_t, **how)
                a = _ms(lambda q, s, t, f=f: f(q, t, None, s), xq, xs, token)
                b = _ms(lambda q, s, f=f: f(q, None, None, s), dq, ds)
                print(
                    f"| {({1: 'bytes', 2: 'uint16 pairs', 4: 'uint32 quads'})[pack]}, block_c={block_c} warps={warps} "
                    f"| {a:.3f} | {b:.3f} |"
                )


def main(argv):
    del argv
    if FLAGS.act:
        act(*map(int, FLAGS.act.split(",")))
        return
    if FLAGS.probe:
        probe()
        return
    if FLAGS.requant:
        requant(*map(int, FLAGS.requant.split(",")))
        return
    if FLAGS.floor:
        floor(*map(int, FLAGS.floor.split(",")))
        return
    if FLAGS.sweep:
        sweep(*map(int, FLAGS.sweep.split(",")))
        return
    print(f"device {jax.devices()[0].device_kind}")
    print("| op | shape | vs XLA, bitwise (zero tile, NaN tile) | fused ms | XLA ms |\n|---|---|---|---|---|")
    for spec in filter(None, FLAGS.activations.split(";")):
        r, c = map(int, spec.split(","))
        kx, ks = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (r, c)) * jnp.exp(3.0 * jax.random.normal(ks, (r, 1)))
        x = x.at[:128, :128].set(0.0).at[r // 2, c // 3].set(jnp.nan).astype(jnp.bfloat16)
        _row("quantize_tiles", [r, c], quantize_gpu.quantize_tiles, quantize.quantize_tiles, x)
        _row("quantize_tiles_t", [r, c], quantize_gpu.quantize_tiles_t, lambda x: quantize.quantize_tiles(x.T), x)
        if r > 20_000:
            alpha = jnp.full((FLAGS.groups,), 4.0)
            sizes = (jax.random.dirichlet(jax.random.key(2), alpha) * r * 0.97).astype(jnp.int32).at[1].set(0)
            index, _ = align_groups(sizes, r)
            ref = lambda x, i: quantize.quantize_tiles(take_aligned(x, i).T)  # noqa: E731
            _row("quantize_tiles_t, gathered", [r, c, FLAGS.groups], quantize_gpu.quantize_tiles_t, ref, x, index)
    for spec in filter(None, FLAGS.weights.split(";")):
        shape = tuple(map(int, spec.split(",")))
        w = (jax.random.normal(jax.random.key(3), shape) * 0.02).at[..., :128, :128].set(0.0)
        w = w.at[..., 130 % shape[-2], 7].set(jnp.nan)
        _row("quantize_blocks", list(shape), quantize_gpu.quantize_blocks, quantize.quantize_blocks, w)


if __name__ == "__main__":
    app.run(main)
