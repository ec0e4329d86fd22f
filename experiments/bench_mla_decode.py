"""Times MLA decode (absorbed, 576-wide latent rows) for our kernel against XLA, in one process.

Implementations (--impls):
  ours        pallas_kernels.mla_decode over the paged cache, one row per --configs entry
  xla         the absorbed-attention einsums over a contiguous [B, S, 576] cache (BASELINES.md's path:
              latent and rope score einsums, float32 masked softmax, value einsum)
  xla_paged   the XLA reference over pages (gather through the block table, then the same einsums)
Each shape is first checked against the paged reference on the GPU (relative Frobenius error of out,
max |lse| difference); then each function is timed as the median over --repeats of (--iters calls
back to back) / iters, after --warmup calls. Reported: ms, TB/s of cache rows read (B * len * 576 * 2
bytes), TFLOP/s (2 * B * s_q * H * len * (576 + 512)), and xla time / ours.

  python experiments/bench_mla_decode.py --quick          # every config on small shapes, errors only
  python experiments/bench_mla_decode.py                  # the full table (B=128)
  python experiments/bench_mla_decode.py --sweep --shapes=128,8192,16,1
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import traceback

# run as a script from anywhere: the repository root on the path, for `experiments.*`
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench_util import median_seconds, parse_overrides, write_results  # noqa: E402
from pallas_kernels.mla_decode import gpu, mla_decode, mla_decode_reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "shapes",
    "",
    "Semicolon-separated B,S,H,s_q; empty: B=128 x S in {4096, 8192, 16384} x H in {16, 128} x s_q in {1, 2}.",
)
flags.DEFINE_integer("page_size", 64, "Cache page size (rows).")
flags.DEFINE_float("softmax_scale", 0.1352, "(128 + 64)^-0.5 x YaRN mscale^2, as in DeepSeek-V3.")
flags.DEFINE_enum(
    "lengths", "full", ["full", "random"], "full: every sequence holds S tokens; random: uniform in [S/2, S] (seeded)."
)
flags.DEFINE_list("impls", ["ours", "xla", "xla_paged"], "Implementations to time.")
flags.DEFINE_string(
    "configs",
    "kernel=ws;kernel=simple,p_in_registers=false,pv_inplace=false,pv_chunk=128",
    "Semicolon-separated GpuConfig overrides, one 'ours' row each "
    "(keys: kernel, num_splits, num_stages, p_in_registers, pv_inplace, pv_chunk).",
)
flags.DEFINE_bool("sweep", False, "Add the SWEEP configs to --configs.")
flags.DEFINE_bool("quick", False, "Only check every config against the reference on small shapes.")
flags.DEFINE_bool(
    "list_configs",
    False,
    "Print the configs (--configs, plus SWEEP with --sweep), one "
    "a line, and exit (check_mla_decode_gpu.sh runs each in its own process).",
)
flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
flags.DEFINE_integer("iters", 20, "Calls per timed repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
flags.DEFINE_integer("seed", 0, "Seed for inputs, page shuffle and random lengths.")
flags.DEFINE_string("out", "", "If set, write every result as JSON here.")
flags.DEFINE_bool(
    "interpret", False, "Run our kernels in interpret mode (a CPU smoke test of this script; use tiny --shapes)."
)

# Without in-place accumulation a 256-column chunk would need 2 x 128 accumulator registers.
SWEEP = [
    "kernel=ws,pv_inplace=false,pv_chunk=128",
    "kernel=ws,p_in_registers=false",
    "kernel=ws,p_in_registers=false,pv_inplace=false,pv_chunk=128",
    "kernel=ws,num_stages=1",
    "kernel=ws,num_splits=1",
    "kernel=ws,num_splits=2",
    "kernel=ws,num_splits=4",
    "kernel=simple",
    "kernel=simple,num_splits=2",
]
QUICK_SHAPES = [(4, 256, 16, 1), (2, 200, 16, 2), (2, 256, 128, 1), (1, 130, 128, 2), (2, 1000, 16, 1)]
QUICK_SHAPES_INTERPRET = [(2, 100, 16, 2)]


def parse_config(spec):
    return dataclasses.replace(gpu.GpuConfig(), **parse_overrides(spec))


def xla_contiguous(q, cache, lengths, scale):
    """BASELINES.md's absorbed attention over a contiguous cache [B, S, 576]; q [B, s_q, H, 576]."""
    s_q = q.shape[1]
    f32 = dict(preferred_element_type=jnp.float32)
    s = jnp.einsum("bthc,bsc->bhts", q[..., :512], cache[..., :512], **f32)
    s = s + jnp.einsum("bthr,bsr->bhts", q[..., 512:], cache[..., 512:], **f32)
    limit = lengths[:, None] - s_q + 1 + jnp.arange(s_q)[None]
    mask = jnp.arange(cache.shape[1])[None, None] < limit[..., None]  # [B, s_q, S]
    s = jnp.where(mask[:, None], s * scale, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bsc->bthc", p, cache[..., :512], **f32).astype(q.dtype)


def make_inputs(b, s, h, s_q, seed, lengths_mode):
    page = FLAGS.page_size
    max_pages = -(-s // page)
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, s_q, h, 576), jnp.bfloat16)
    kv_pages = jax.random.normal(keys[1], (b * max_pages, page, 576), jnp.bfloat16)
    table = jax.random.permutation(keys[2], b * max_pages).reshape(b, max_pages).astype(jnp.int32)
    if lengths_mode == "random":
        lengths = jax.random.randint(keys[3], (b,), max(s // 2, s_q), s + 1, jnp.int32)
    else:
        lengths = jnp.full((b,), s, jnp.int32)
    return q, kv_pages, table, lengths


def rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def lse_err(x, ref):
    fin = jnp.isfinite(ref)
    same_inf = bool(jnp.all(jnp.isfinite(x) == fin))
    return float(jnp.max(jnp.where(fin, jnp.abs(x - ref), 0.0))) if same_inf else float("inf")


def check(fn, inputs, want):
    """(out rel err, lse max abs err, NaN present) of fn(*inputs) against the reference."""
    out, lse = jax.block_until_ready(fn(*inputs))
    nan = bool(jnp.isnan(out.astype(jnp.float32)).any())
    return rel_err(out, want[0]), lse_err(lse, want[1]), nan


def time_fn(f, *args):
    return median_seconds(f, *args, warmup=FLAGS.warmup, iters=FLAGS.iters, repeats=max(FLAGS.repeats, 1))


def ours_fn(spec, scale):
    cfg = parse_config(spec)
    return jax.jit(
        lambda q, kv, t, n: mla_decode(
            q, kv, t, n, softmax_scale=scale, backend="gpu", config=cfg, interpret=FLAGS.interpret
        )
    )


def short_error(e):
    """The exception's first and last lines, and where in our code it was raised."""
    lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    msg = " | ".join(lines[:6] + (["..."] + lines[-3:] if len(lines) > 9 else lines[6:]))[:900]
    ours = [f for f in traceback.extract_tb(e.__traceback__) if "pallas_kernels" in f.filename]
    if ours:
        msg += f"  [at {ours[-1].filename.split('pallas_kernels/')[-1]}:{ours[-1].lineno}]"
    return msg


def quick(specs):
    """Compile and check every config on small shapes; one line each. Returns the failure count."""
    failures = 0
    rng = np.random.default_rng(FLAGS.seed)
    for shape in QUICK_SHAPES_INTERPRET if FLAGS.interpret else QUICK_SHAPES:
        b, s, h, s_q = shape
        inputs = make_inputs(b, s, h, s_q, FLAGS.seed, "full")
        lengths = rng.integers(1, s + 1, b)
        lengths[0] = 1  # a query of an MTP pair that sees nothing, and a 1-token sequence
        inputs = (*inputs[:3], jnp.asarray(lengths, jnp.int32))
        want = mla_decode_reference(*inputs, softmax_scale=FLAGS.softmax_scale)
        for spec in specs:
            try:
                err, lerr, nan = check(ours_fn(spec, FLAGS.softmax_scale), inputs, want)
                ok = err <= 1e-2 and lerr <= 1e-2 and not nan
                print(
                    f"{'OK  ' if ok else 'FAIL'} {shape} [{spec}] out rel err {err:.2e}, "
                    f"lse err {lerr:.2e}{', NaN!' if nan else ''}",
                    flush=True,
                )
                failures += not ok
            except Exception as e:  # noqa: BLE001 - one config failing must not stop the others
                print(f"FAIL {shape} [{spec}] {short_error(e)}", flush=True)
                failures += 1
    return failures


def bench_shape(shape, specs, results):
    b, s, h, s_q = shape
    scale = FLAGS.softmax_scale
    inputs = make_inputs(b, s, h, s_q, FLAGS.seed, FLAGS.lengths)
    q, kv_pages, table, lengths = inputs
    tokens = float(jnp.sum(lengths))
    cache_bytes = tokens * 576 * 2
    flops = 2.0 * s_q * h * tokens * (576 + 512)
    want = mla_decode_reference(*inputs, softmax_scale=scale)
    fns = {}
    if "xla" in FLAGS.impls:
        cache = kv_pages[table].reshape(b, -1, 576)
        fx = jax.jit(lambda q_, c_, n_: xla_contiguous(q_, c_, n_, scale))
        fns["xla"] = lambda *a: fx(a[0], cache, a[3])
    if "xla_paged" in FLAGS.impls:
        fns["xla_paged"] = jax.jit(lambda *a: mla_decode_reference(*a, softmax_scale=scale)[0])
    if "ours" in FLAGS.impls:
        for spec in specs:
            fns[f"ours[{spec}]"] = ours_fn(spec, scale)
    rows = []
    for name, f in fns.items():
        row = {"shape": list(shape), "impl": name}
        try:
            if name.startswith("ours"):
                row["out_err"], row["lse_err"], row["nan"] = check(f, inputs, want)
            elif name == "xla":
                row["out_err"] = rel_err(f(*inputs), want[0])
            row["ms"] = time_fn(f, *inputs) * 1e3
            row["tbps"] = cache_bytes / row["ms"] / 1e9
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as e:  # noqa: BLE001
            row["error"] = short_error(e)
            row["traceback"] = traceback.format_exc()[-4000:]
        rows.append(row)
        results.append(row)
    print_table(shape, rows)
    return rows


TARGETS = "targets: >= 2.5x xla on every shape, >= 3.4 TB/s at H=16, >= 550 TFLOP/s at H=128"


def print_summary(results):
    """One table: the baselines and our best config per shape, against the targets."""
    print(f"\nSummary ({TARGETS})")
    print(
        f"{'B,S,H,s_q':<18}{'xla ms':>8}{'paged ms':>9}{'ours ms':>8}{'TB/s':>7}{'TFLOP/s':>9}"
        f"{'vs xla':>8}{'vs paged':>9}  best config"
    )
    for shape in dict.fromkeys(tuple(r["shape"]) for r in results):
        rows = [r for r in results if tuple(r["shape"]) == shape and "ms" in r]
        by = {r["impl"]: r for r in rows}
        ours = [r for r in rows if r["impl"].startswith("ours") and not r.get("nan") and r.get("out_err", 1) <= 1e-2]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        fmt = lambda r, k, f: format(r[k], f) if r and k in r else "-"
        xla, paged = by.get("xla"), by.get("xla_paged")
        line = f"{','.join(map(str, shape)):<18}{fmt(xla, 'ms', '.3f'):>8} "
        line += f"{fmt(paged, 'ms', '.3f'):>8} {fmt(best, 'ms', '.3f'):>7} "
        line += f"{fmt(best, 'tbps', '.2f'):>6} {fmt(best, 'tflops', '.1f'):>8}"
        for base in (xla, paged):
            line += f"{base['ms'] / best['ms']:8.2f}x" if best and base else f"{'-':>9}"
        print(line + (f"  {best['impl'][5:-1]}" if best else "  (no correct config)"))
    sys.stdout.flush()


def print_table(shape, rows):
    base = {r["impl"]: r.get("ms") for r in rows if not r["impl"].startswith("ours")}
    b, s, h, s_q = shape
    print(
        f"\nB={b} S={s} H={h} s_q={s_q} ({FLAGS.lengths} lengths, page {FLAGS.page_size}, "
        f"{jax.devices()[0].device_kind})"
    )
    print(f"{'impl':<72}{'ms':>8}{'TB/s':>7}{'TFLOP/s':>9}{'vs xla':>8}{'vs paged':>9}  err")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<72} FAILED: {r['error']}")
            continue
        ratio = lambda k: f"{base[k] / r['ms']:.2f}" if base.get(k) else "-"  # noqa: B023 - used in this iteration
        err = f"{r['out_err']:.1e}/{r.get('lse_err', 0):.1e}" if "out_err" in r else ""
        if r.get("nan"):
            err += " NaN!"
        print(
            f"{r['impl']:<72} {r['ms']:7.3f}{r['tbps']:7.2f}{r['tflops']:9.1f}"
            f"{ratio('xla'):>8}{ratio('xla_paged'):>9}  {err}"
        )
    sys.stdout.flush()


def _write(results):
    write_results(FLAGS.out, FLAGS.flags_into_string(), results)


def main(_):
    if not FLAGS.list_configs:
        print(f"{datetime.datetime.now().isoformat()} jax {jax.__version__} {jax.devices()[0]}")
    specs = [s for s in FLAGS.configs.split(";") if s] + (SWEEP if FLAGS.sweep else [])
    if FLAGS.list_configs:
        print("\n".join(specs))
        return
    if FLAGS.quick:
        failures = quick(specs)
        print(f"\n{failures} failing (shape, config) pairs")
        sys.exit(1 if failures else 0)
    if FLAGS.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in FLAGS.shapes.split(";") if s]
    else:
        shapes = [(128, s, h, s_q) for s in (4096, 8192, 16384) for h in (16, 128) for s_q in (1, 2)]
    results = []
    for shape in shapes:
        bench_shape(shape, specs, results)
        _write(results)  # keep what finished if a time limit cuts the run short
    print_summary(results)


if __name__ == "__main__":
    app.run(main)
