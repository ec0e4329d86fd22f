"""What bounds the grouped FP8 forward: fp8_gmm's GPU kernel timed with parts of its K step taken out.

The forward runs ~930 TFLOP/s on the H200's gate+up shape (891-992); the issue asks 1,000. Whether the promotions,
the tensor cores or the operand loads hold it there decides what to build next, and the kernel's own timings cannot
say. This probe swaps the kernel's K step (`gpu.promoted_step`, which every configuration but skip_idle_wgs and
ring_loads calls) for cut-down ones and times each, same process, same operands (JAX's caches are cleared around
each swap, so every part is traced and compiled anew):

  full        the kernel as shipped
  no_promote  the wgmma and its wait, no promotion: the sum is the last step's product (wrong, on purpose)
  loads_only  the memory side alone: the stages are filled and released, no wgmma, no scales
  compute_x2  each K step's wgmma and promotion run twice on the stage's operands (TFLOP/s count both): the loads
              per flop halve, so a rate well above full's says the loads (or their latency) hold full back, one
              near full's that the compute warpgroups' own chain (wgmma, wait, promotion) does

Two group layouts: the bench's Dirichlet(4) split of M ("dirichlet"; its last tile of a group is partly
filled, 17% more rows than M at 192-row tiles) and the same split rounded to whole tiles ("aligned", M rounded
down to a multiple of block_m): every tile full. TFLOP/s count M's rows only. loads_only's rate is the ceiling
the operand loads allow; if it is near full's, the loads are the bound (remedies: fewer bytes a flop: larger
tiles, multicast); if far above, the compute warpgroups are. H200, 2026-12-06 (BENCHMARKS.md): full 0.79-0.84 of
loads_only, the promotion ~6-10% over no_promote, whole tiles 1,038-1,070 against 918-990 on the Dirichlet split;
one config timed 8 times spreads 9%. H100, 2026-12-07: full 0.94-1.0 of loads_only, compute_x2 1,282 on whole tiles
against full's 1,089, and 1,209 with one group's weights (L2-resident) against 32 groups' 1,074-1,110.

Two sources of weights (--weights): "distinct", each group its own (the gate+up shape's 32 groups: 940 MB, read
from DRAM), and "shared", every tile reading group 0's weight rows (gpu.tile_views swapped; each group keeps its own
scales; the outputs are then not the product, on purpose). The same tiles and group boundaries with the weights
L2-resident: the gap between the two sources is what the DRAM weight reads cost on a layout, and the dirichlet /
aligned gap under "shared" is what the partly filled tiles cost by themselves.

  python experiments/fp8_bound_probe.py --configs="ws3:;ws2:block_m=128,compute_wgs=2"   # overrides of GEMM_CONFIG
  python experiments/fp8_bound_probe.py --parts=full,loads_only --weights=distinct,shared
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import operator
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from experiments.bench_util import median_seconds, parse_overrides, write_results  # noqa: E402
from pallas_kernels import fp8_gemm as f8  # noqa: E402
from pallas_kernels.fp8_gemm import gpu  # noqa: E402
from pallas_kernels.fp8_gemm.gpu_config import GEMM_CONFIG  # noqa: E402
from pallas_kernels.grouped_matmul import gpu_common  # noqa: E402

PARTS = ("full", "no_promote", "loads_only", "compute_x2")
WORK = {"compute_x2": 2}  # products a K step runs, where not 1


def _no_promote(cfg, x_smem, w_smem, xs_ref, ws_ref, total, t_smem, shape, interpret, scalar_ws=False, release=None):
    """The K step without its promotion: the product into a fresh accumulator, waited for, returned as the sum."""
    del cfg, xs_ref, ws_ref, total, interpret, scalar_ws

    def product(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, gpu_common.transposed(w_smem, t_smem))
        return acc_ref[...]

    part = pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
    if release is not None:
        release()
    return part


def _loads_only(cfg, x_smem, w_smem, xs_ref, ws_ref, total, t_smem, shape, interpret, scalar_ws=False, release=None):
    """The K step with nothing computed: the stage is released and the sum passes through."""
    del cfg, x_smem, w_smem, xs_ref, ws_ref, t_smem, shape, interpret, scalar_ws
    if release is not None:
        release()
    return total


def _twice(original):
    """The K step run twice on the same stage: the second promotes into the first's sum; the release (where the
    step owns it) follows the second."""

    def step(cfg, x_smem, w_smem, xs_ref, ws_ref, total, t_smem, shape, interpret, scalar_ws=False, release=None):
        args = (cfg, x_smem, w_smem, xs_ref, ws_ref)
        total = original(*args, total, t_smem, shape, interpret, scalar_ws)
        return original(*args, total, t_smem, shape, interpret, scalar_ws, release)

    return step


@contextlib.contextmanager
def k_step(part: str):
    """gpu.promoted_step replaced by the cut-down step `part` (PARTS) while the kernel is traced."""
    if part not in PARTS:
        raise ValueError(f"--parts: unknown part {part!r} (one of {', '.join(PARTS)})")
    original = gpu.promoted_step
    steps = {"full": original, "no_promote": _no_promote, "loads_only": _loads_only, "compute_x2": _twice(original)}
    gpu.promoted_step = steps[part]
    jax.clear_caches()  # ops.py jits the kernel call per config: a cached trace would keep the other step
    try:
        yield
    finally:
        gpu.promoted_step = original
        jax.clear_caches()


WEIGHTS = ("distinct", "shared")


@contextlib.contextmanager
def weights(source: str):
    """gpu.tile_views replaced while the kernel is traced: "shared" points every tile's weight view at group 0's
    rows (its own group's scales kept); "distinct" leaves the kernel as shipped."""
    if source not in WEIGHTS:
        raise ValueError(f"--weights: unknown source {source!r} (one of {', '.join(WEIGHTS)})")
    original = gpu.tile_views

    def shared(gmem, bm, bn, gi, row0, n0, w_first=0):
        x, _, xs, ws = original(gmem, bm, bn, gi, row0, n0, w_first)
        return x, original(gmem, bm, bn, 0, row0, n0, w_first)[1], xs, ws

    gpu.tile_views = shared if source == "shared" else original
    jax.clear_caches()
    try:
        yield
    finally:
        gpu.tile_views = original
        jax.clear_caches()


def group_sizes(g: int, m: int, layout: str, block_m: int, alpha: float = 4.0, seed: int = 0) -> np.ndarray:
    """A seeded Dirichlet(alpha) split of m rows over g groups (bench_fp8_gemm's), or ("aligned") that split in
    whole block_m tiles summing to m // block_m tiles, every group at least one tile."""
    p = np.random.default_rng(seed).dirichlet([alpha] * g)
    if layout == "dirichlet":
        s = np.floor(p * m).astype(np.int32)
        s[-1] += m - s.sum()
        return s
    if layout != "aligned":
        raise ValueError(f"--layouts: unknown layout {layout!r} (dirichlet or aligned)")
    tiles = m // block_m
    if tiles < g:
        raise ValueError(f"aligned layout: M={m} holds {tiles} tiles of {block_m} rows, fewer than G={g} groups")
    t = np.maximum(np.floor(p * tiles).astype(np.int32), 1)
    t[np.argmax(t)] += tiles - t.sum()
    return (t * block_m).astype(np.int32)


def probe(shape, configs, parts, layouts, iters, interpret=False, sources=("distinct",)):
    """Rows {config, weights, layout, part, m, seconds, tflops} for every combination (first call compiles)."""
    g, m, k, n = shape
    key = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(key[0], (m, k), jnp.bfloat16)
    wq, ws = f8.quantize_blocks((jax.random.normal(key[1], (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16))
    unknown = set(sources) - set(WEIGHTS)
    if unknown:  # before anything compiles, not after the first source's timings
        raise ValueError(f"--weights: unknown source(s) {sorted(unknown)} (of {', '.join(WEIGHTS)})")
    rows = []
    for name, cfg in configs:
        if cfg.ring_loads and set(sources) - {"distinct"}:
            raise ValueError(f"--weights=shared: config {name} runs the ring kernel, which reads no gpu.tile_views")
        for layout in layouts:
            sizes = group_sizes(g, m, layout, cfg.block_m)
            rows_m = int(sizes.sum())
            xq, xs = f8.quantize_tiles(x[:rows_m])
            gs = jnp.asarray(sizes)
            for source, part in itertools.product(sources, parts):
                with weights(source), k_step(part):  # traced, compiled and timed under the swapped step
                    f = jax.jit(lambda *a, c=cfg: f8.fp8_gmm(*a, backend="gpu", config=c, interpret=interpret))
                    t = median_seconds(f, xq, xs, wq, ws, gs, warmup=2, iters=iters, repeats=5 if iters > 1 else 1)
                tflops = 2 * rows_m * k * n * WORK.get(part, 1) / t / 1e12
                row = {"config": name, "weights": source, "layout": layout, "part": part, "m": rows_m}
                rows.append(row | {"seconds": t, "tflops": tflops})
                print(
                    f"  {name:10s} {source:8s} {layout:9s} {part:10s} M={rows_m}: {1e3 * t:.3f} ms, "
                    f"{tflops:.0f} TFLOP/s",
                    flush=True,
                )
    return rows


def table(rows) -> str:
    """Markdown: one line per (config, weights, layout), TFLOP/s of each part and full's share of loads_only's rate."""
    parts = [p for p in PARTS if any(r["part"] == p for r in rows)]
    head = "| config | weights | layout | M | " + " | ".join(parts) + " | full / loads_only |"
    out = [head, "|" + "---|" * (len(parts) + 5)]
    key = operator.itemgetter("config", "weights", "layout")
    for k in dict.fromkeys(map(key, rows)):
        by = {r["part"]: r for r in rows if key(r) == k}
        share = by["full"]["tflops"] / by["loads_only"]["tflops"] if {"full", "loads_only"} <= by.keys() else None
        cells = " | ".join(f"{by[p]['tflops']:.0f}" if p in by else "" for p in parts)
        m = next(iter(by.values()))["m"]
        out.append(f"| {' | '.join(k)} | {m} | {cells} | {'' if share is None else f'{share:.2f}'} |")
    return "\n".join(out)


def _configs(spec):
    out = []
    for item in filter(None, spec.split(";")):
        name, _, sets = item.partition(":")
        out.append((name, dataclasses.replace(GEMM_CONFIG, **parse_overrides(sets))))
    return out


def main(argv):
    del argv
    flags_ = flags.FLAGS
    shape = tuple(map(int, flags_.shape.split(",")))
    print(f"device {jax.devices()[0].device_kind}; shape G,M,K,N = {shape}", flush=True)
    parts, layouts, sources = (getattr(flags_, f).split(",") for f in ("parts", "layouts", "weights"))
    rows = probe(shape, _configs(flags_.configs), parts, layouts, flags_.iters, sources=sources)
    print(table(rows))
    write_results(flags_.out, " ".join(sys.argv[1:]), rows)


if __name__ == "__main__":
    flags.DEFINE_string("shape", "32,16384,7168,4096", "G,M,K,N (the gate+up shape)")
    flags.DEFINE_string(
        "configs", "ws3:", "NAME:FIELD=VALUE,...;... overrides of GEMM_CONFIG (the default) to probe, one per name"
    )
    flags.DEFINE_string("parts", ",".join(PARTS), f"which K steps to time (of {', '.join(PARTS)})")
    flags.DEFINE_string("layouts", "dirichlet,aligned", "group layouts: dirichlet, aligned")
    flags.DEFINE_string("weights", "distinct", f"weight sources, comma-separated (of {', '.join(WEIGHTS)})")
    flags.DEFINE_integer("iters", 10, "calls per timing (median of 5 runs)")
    flags.DEFINE_string("out", "", "optional JSON output path")
    app.run(main)
