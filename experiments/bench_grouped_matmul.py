"""Times grouped matmul (MoE expert shapes) for our kernels, XLA and JAX's shipped Mosaic GPU kernels.

For each (G, M, K, N) shape, with group sizes from a seeded Dirichlet(alpha) split of M over G,
it times, in one process: forward gmm, dlhs (gmm against rhs read transposed), drhs (tgmm) and
fwd+bwd (counted as 3x the forward FLOPs). Each function is timed in --rounds rounds that interleave
the implementations (ours, xla, mgpu, ours, ...): a round is --iters calls back to back, one sync at
the end, per-call time; the median over rounds is reported. Interleaving matters on the H200: clocks
drift by ~10% over a minute of matmuls (power), which one-after-the-other timing turns into a bias.
Prints a table of TFLOP/s and our ratio over each baseline; --out writes every number as JSON.
--check also compares our outputs with XLA's.

  python experiments/bench_grouped_matmul.py                       # the BASELINES.md shapes
  python experiments/bench_grouped_matmul.py --sweep --shapes=32,16384,7168,4096
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
import statistics
import sys

# run as a script from anywhere: the repository root on the path, for `experiments.*`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench_util import median_seconds, parse_overrides, write_results  # noqa: E402
from pallas_kernels.grouped_matmul import gmm, gpu, ops, tgmm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "shapes",
    "32,16384,7168,4096;32,16384,2048,7168;8,8192,7168,4096",
    "Semicolon-separated G,M,K,N shapes (groups, rows, contraction, output cols).",
)
flags.DEFINE_float("alpha", 4.0, "Dirichlet concentration of the group-size split (uneven, >0).")
flags.DEFINE_integer("seed", 0, "Seed for the group sizes and the random inputs.")
flags.DEFINE_integer("warmup", 3, "Untimed calls of each function before its first round.")
flags.DEFINE_integer("iters", 10, "Calls per timed round (back to back).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per function, interleaved across functions; median reported.")
flags.DEFINE_list(
    "impls",
    ["ours", "xla", "mgpu"],
    "Implementations: ours (pallas_kernels), xla (lax.ragged_dot / "
    "ragged_dot_general), mgpu (jax.experimental.pallas.ops.gpu ragged_dot_mgpu and "
    "transposed_ragged_dot_mgpu).",
)
flags.DEFINE_list("ops", ["fwd", "dlhs", "drhs", "fwdbwd"], "Which operations to time.")
flags.DEFINE_string(
    "gmm_config",
    "",
    "Our forward/dlhs GpuConfig overrides, e.g. "
    "'block_m=128,block_n=128,block_k=64,max_concurrent_steps=4'. Empty: defaults.",
)
flags.DEFINE_string("tgmm_config", "", "Our drhs (tgmm) GpuConfig overrides, same syntax.")
flags.DEFINE_string(
    "mgpu_config",
    "block_m=128,block_n=128,block_k=64,max_concurrent_steps=5,grid_block_n=2",
    "Kwargs for JAX's ragged_dot_mgpu (BASELINES.md's best).",
)
flags.DEFINE_string(
    "mgpu_t_config",
    "block_m=128,block_n=128,block_k=64,max_concurrent_steps=4,grid_block_n=1",
    "Kwargs for JAX's transposed_ragged_dot_mgpu (drhs).",
)
flags.DEFINE_bool("check", True, "Compare our fwd/dlhs/drhs with XLA (relative Frobenius error).")
flags.DEFINE_bool(
    "sweep",
    False,
    "Instead of the comparison, time our kernels over a handful "
    "of tuning configs on each shape and print each (ops from --ops: fwd, dlhs, "
    "drhs).",
)
flags.DEFINE_bool(
    "sweep_mgpu",
    True,
    "With --sweep: also time JAX's ragged_dot_mgpu forward as a reference "
    "(interleaved with the configs, so the ratio is fair).",
)
flags.DEFINE_string(
    "sweep_configs",
    "",
    "With --sweep: semicolon-separated GpuConfig override specs to try "
    "(for every op in --ops) instead of the built-in lists.",
)
flags.DEFINE_string("out", "", "If set, write all results as JSON to this path.")


def _gpu_config(spec, base):
    return dataclasses.replace(base, **parse_overrides(spec)) if spec else None


def group_sizes(g, m, alpha, seed):
    p = np.random.default_rng(seed).dirichlet([alpha] * g)
    sizes = np.floor(p * m).astype(np.int64)
    sizes[np.argsort(-(p * m - sizes))[: m - sizes.sum()]] += 1  # largest remainders
    return jnp.asarray(sizes, jnp.int32)


def time_interleaved(fns, *args):
    """{name: seconds per call}: rounds that interleave all fns; median over rounds. A fn that raises
    maps to its exception."""
    out, times = {}, {}
    for name, f in fns.items():
        try:
            median_seconds(f, *args, warmup=FLAGS.warmup, iters=1)  # compile + warm-up
            times[name] = []
        except Exception as e:  # noqa: BLE001 - one failing config must not stop the others
            out[name] = e
    for _ in range(FLAGS.rounds):
        for name in times:
            times[name].append(median_seconds(fns[name], *args, warmup=0, iters=FLAGS.iters, repeats=1))
    out.update({k: statistics.median(v) for k, v in times.items()})
    return out


def _kwargs_for(fn, spec):
    params = inspect.signature(fn).parameters
    return {k: v for k, v in parse_overrides(spec).items() if k in params}


def make_fns(impl, gs, gmm_cfg=None, tgmm_cfg=None):
    """op -> jitted f(lhs, rhs, dout) for one implementation."""
    if impl in ("ours", "xla"):
        backend = "gpu" if impl == "ours" else "xla"
        kw = dict(backend=backend, gmm_config=gmm_cfg, tgmm_config=tgmm_cfg)
        fwd = lambda l, r, dy: gmm(l, r, gs, **kw)
        opts = ops._Opts(backend, False, None, gmm_cfg, tgmm_cfg)
        # What gmm's VJP runs for dlhs: gmm of dout against rhs read as [G, N, K].
        dlhs = lambda l, r, dy: ops._gmm_impl(dy, r, gs, opts, transpose_rhs=True)
        drhs = lambda l, r, dy: tgmm(l, dy, gs, backend=backend, config=tgmm_cfg)

        def fwdbwd(l, r, dy):
            out, vjp = jax.vjp(lambda a, b: gmm(a, b, gs, **kw), l, r)
            return out, *vjp(dy)
    elif impl == "mgpu":
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd

        fkw = _kwargs_for(rd.ragged_dot, FLAGS.mgpu_config)
        fwd = lambda l, r, dy: rd.ragged_dot(l, r, group_sizes=gs, **fkw)
        dlhs = lambda l, r, dy: rd.ragged_dot(dy, r, group_sizes=gs, transpose_rhs=True, **fkw)
        try:
            from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd

            tkw = _kwargs_for(trd.transposed_ragged_dot, FLAGS.mgpu_t_config)
            drhs = lambda l, r, dy: trd.transposed_ragged_dot(l, dy, group_sizes=gs, **tkw)
        except ImportError:
            drhs = None

        def fwdbwd(l, r, dy):
            return fwd(l, r, dy), dlhs(l, r, dy), drhs(l, r, dy)
    else:
        raise ValueError(impl)
    fns = dict(fwd=fwd, dlhs=dlhs, drhs=drhs, fwdbwd=fwdbwd)
    return {k: jax.jit(v) for k, v in fns.items() if v is not None and k in FLAGS.ops}


def _rel(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def f32_check(gs, lhs, rhs, dout, outs):
    """Our outputs on the first and last group's rows against float32 products (HIGHEST)."""
    hi = jax.lax.Precision.HIGHEST
    f32 = lambda x: x.astype(jnp.float32)
    ends = np.cumsum(np.asarray(gs))
    err = {}
    for g in (0, len(ends) - 1):
        rows = slice(int(ends[g] - gs[g]), int(ends[g]))
        want = {
            "fwd": jnp.matmul(f32(lhs[rows]), f32(rhs[g]), precision=hi),
            "dlhs": jnp.matmul(f32(dout[rows]), f32(rhs[g]).T, precision=hi),
            "drhs": jnp.matmul(f32(lhs[rows]).T, f32(dout[rows]), precision=hi),
        }
        got = {"fwd": outs.get(("ours", "fwd")), "dlhs": outs.get(("ours", "dlhs")), "drhs": outs.get(("ours", "drhs"))}
        for op, w in want.items():
            if got[op] is not None:
                x = got[op][g] if op == "drhs" else got[op][rows]
                err[f"{op}/g{g}"] = _rel(x, w)
    return err


def bench_shape(g, m, k, n, results):
    gs = group_sizes(g, m, FLAGS.alpha, FLAGS.seed)
    keys = jax.random.split(jax.random.key(FLAGS.seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    flops = 2.0 * m * k * n
    row = {"shape": [g, m, k, n], "group_sizes": [int(x) for x in gs], "tflops": {}, "errors": {}}
    outs, fns = {}, {}
    for impl in FLAGS.impls:
        try:
            impl_fns = make_fns(
                impl, gs, _gpu_config(FLAGS.gmm_config, gpu.GMM_CONFIG), _gpu_config(FLAGS.tgmm_config, gpu.TGMM_CONFIG)
            )
        except Exception as e:  # noqa: BLE001 - a missing baseline must not stop the others
            row["errors"][impl] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        fns.update({(impl, op): f for op, f in impl_fns.items()})
    for op in FLAGS.ops:
        timed = time_interleaved({k: f for k, f in fns.items() if k[1] == op}, lhs, rhs, dout)
        for (impl, _), t in timed.items():
            if isinstance(t, Exception):
                row["errors"][f"{impl}/{op}"] = f"{type(t).__name__}: {str(t)[:500]}"
                continue
            row["tflops"][f"{impl}/{op}"] = (3 if op == "fwdbwd" else 1) * flops / t / 1e12
            if FLAGS.check and impl in ("ours", "xla") and op in ("fwd", "dlhs", "drhs"):
                outs[(impl, op)] = fns[(impl, op)](lhs, rhs, dout)
    if FLAGS.check and ("ours", "fwd") in outs:
        row["rel_err_vs_f32"] = f32_check(gs, lhs, rhs, dout, outs)
    for op in ("fwd", "dlhs", "drhs"):
        if ("ours", op) in outs and ("xla", op) in outs:
            got = outs[("ours", op)]
            row.setdefault("rel_err_vs_xla", {})[op] = _rel(got, outs[("xla", op)])
            row.setdefault("nan", {})[op] = bool(jnp.isnan(got.astype(jnp.float32)).any())
    results.append(row)
    return row


def print_table(rows):
    """One block per shape (printed as soon as the shape is done)."""
    ops = [op for op in ("fwd", "dlhs", "drhs", "fwdbwd") if op in FLAGS.ops]
    print(
        f"\nTFLOP/s (median of {FLAGS.rounds} interleaved rounds of {FLAGS.iters} calls), bf16, "
        f"Dirichlet({FLAGS.alpha:g}) group sizes, {jax.devices()[0].device_kind}"
    )
    head = f"{'G,M,K,N':<22}{'op':<8}" + "".join(f"{i:>8}" for i in FLAGS.impls)
    others = [i for i in FLAGS.impls if i != "ours"] if "ours" in FLAGS.impls else []
    head += "".join(f"{'ours/' + i:>11}" for i in others)
    print(head)
    for row in rows:
        for op in ops:
            vals = [row["tflops"].get(f"{i}/{op}") for i in FLAGS.impls]
            line = f"{','.join(map(str, row['shape'])):<22}{op:<8}"
            line += "".join(f"{v:8.1f}" if v else f"{'-':>8}" for v in vals)
            ours = row["tflops"].get(f"ours/{op}")
            for i, v in zip(FLAGS.impls, vals):
                if i in others:
                    line += f"{ours / v:11.2f}" if ours and v else f"{'-':>11}"
            print(line)
        if row.get("rel_err_vs_f32"):
            print(f"{'':<22}rel err vs f32: " + ", ".join(f"{k}={v:.1e}" for k, v in row["rel_err_vs_f32"].items()))
        if row.get("rel_err_vs_xla"):
            print(
                f"{'':<22}rel err vs xla: "
                + ", ".join(f"{k}={v:.2e}{' NaN!' if row['nan'][k] else ''}" for k, v in row["rel_err_vs_xla"].items())
            )
    for row in rows:
        for k, v in row["errors"].items():
            print(f"error {row['shape']} {k}: {v[:300]}")


SWEEP_GMM = [
    "grid_tile_n=0",
    "grid_tile_n=2",
    "grid_tile_n=4",
    "grid_tile_n=8",
    "grid_tile_n=16",
    "block_k=128,max_concurrent_steps=2,grid_tile_n=8",
    "warp_specialized=false,block_n=128,max_concurrent_steps=4",
]
SWEEP_TGMM = [
    "grid_tile_n=0",
    "grid_tile_n=2",
    "grid_tile_n=4",
    "grid_tile_n=8",
    "max_concurrent_steps=3,grid_tile_n=4",
]


def sweep(shape, results):
    g, m, k, n = shape
    gs = group_sizes(g, m, FLAGS.alpha, FLAGS.seed)
    keys = jax.random.split(jax.random.key(FLAGS.seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    flops = 2.0 * m * k * n
    lists = (("fwd", SWEEP_GMM), ("dlhs", SWEEP_GMM[:5]), ("drhs", SWEEP_TGMM))
    if FLAGS.sweep_configs:
        lists = [(op, FLAGS.sweep_configs.split(";")) for op, _ in lists]
    base = {"fwd": gpu.GMM_CONFIG, "dlhs": gpu.DLHS_CONFIG, "drhs": gpu.TGMM_CONFIG}
    for op, specs in lists:
        if op not in FLAGS.ops:
            continue
        fns = {}
        for spec in specs:
            opts = ops._Opts("gpu", False, None, _gpu_config(spec, base[op]), _gpu_config(spec, base[op]))
            if op == "fwd":
                fns[spec] = jax.jit(lambda l, r, dy, o=opts: ops._gmm_impl(l, r, gs, o))
            elif op == "dlhs":
                fns[spec] = jax.jit(lambda l, r, dy, o=opts: ops._gmm_impl(dy, r, gs, o, transpose_rhs=True))
            else:
                fns[spec] = jax.jit(lambda l, r, dy, o=opts: ops._tgmm_impl(l, dy, gs, o))
        if FLAGS.sweep_mgpu and op in ("fwd", "dlhs"):
            fns["mgpu"] = make_fns("mgpu", gs)[op]
        for spec, t in time_interleaved(fns, lhs, rhs, dout).items():
            if isinstance(t, Exception):
                print(f"sweep {shape} {op:<5}  failed  {spec}: {type(t).__name__}: {str(t)[:300]}")
                results.append({"shape": list(shape), "op": op, "config": spec, "error": str(t)[:500]})
                continue
            tf = flops / t / 1e12
            print(f"sweep {shape} {op:<5} {tf:7.1f} TFLOP/s  {spec or 'default'}", flush=True)
            results.append({"shape": list(shape), "op": op, "config": spec, "tflops": tf})


def _write(results):
    write_results(FLAGS.out, FLAGS.flags_into_string(), results)


def main(_):
    shapes = [tuple(int(x) for x in s.split(",")) for s in FLAGS.shapes.split(";") if s]
    if (FLAGS.sweep or {"ours", "mgpu"} & set(FLAGS.impls)) and not ops._is_hopper():
        raise app.UsageError(
            f"--impls={','.join(FLAGS.impls)}{' --sweep' if FLAGS.sweep else ''}: the Mosaic GPU "
            f"kernels need a Hopper GPU, this is {jax.devices()[0].device_kind}; on CPU only "
            "--impls=xla runs (the kernels' CPU check is tests/test_grouped_matmul.py, interpret mode)"
        )
    print(f"{datetime.datetime.now().isoformat()} jax {jax.__version__} {jax.devices()[0]}")
    results = []
    for shape in shapes:
        if FLAGS.sweep:
            sweep(shape, results)
        else:
            # Print and save as each shape finishes, so a run cut short by a time limit keeps its rows.
            print_table([bench_shape(*shape, results)])
        sys.stdout.flush()
        _write(results)


if __name__ == "__main__":
    app.run(main)
