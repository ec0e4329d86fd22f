"""Training throughput across the local accelerators: tokens/s per device on each mesh vs one device.

  python experiments/bench_scaling.py                                  # small: 1 device, EP over all, DP over all
  python experiments/bench_scaling.py --meshes='data:1;expert:2;data:2' --moe_dispatch=padded

Weak scaling: every device gets --batch_per_device sequences, so a mesh of n devices trains on n times the
batch of one. Each mesh runs the real jitted train step (forward, backward, AdamW, router-bias update, MTP) of
dsjax.train.trainer on synthetic tokens: compile, one warm-up step, then --steps timed steps. A mesh that fails
(e.g. out of memory) prints its error and the table goes on.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("preset", "small", "ModelConfig preset to train.")
flags.DEFINE_string(
    "meshes",
    "data:1;expert:-1;data:-1",
    "Semicolon-separated meshes (sharding/mesh.py syntax); "
    "each uses the first devices it needs, -1 meaning every local device.",
)
flags.DEFINE_integer("batch_per_device", 8, "Sequences per device per step.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_integer("steps", 10, "Timed steps per mesh (after compilation and one warm-up step).")
flags.DEFINE_string("remat", "none", "Rematerialisation policy (none, full, dots, dots_no_batch).")
flags.DEFINE_float("mtp_lambda", 0.3, "MTP loss weight (0 leaves the MTP module out of the step).")
flags.DEFINE_string("moe_dispatch", "auto", "Expert-parallel all-to-all: auto (ragged on GPU/TPU), ragged, padded.")
flags.DEFINE_string("moe_backend", "auto", "Grouped matmul for the experts: auto, gmm, ragged_dot.")
flags.DEFINE_float("capacity_factor", 0.0, "moe_capacity_factor (0 = dropless).")
flags.DEFINE_float(
    "budget_s",
    420.0,
    "Skip a mesh when the slowest mesh so far would not finish within this many "
    "seconds of the start, so the table always prints inside a time-limited job.",
)
flags.DEFINE_string("out", "", "Optional JSON output path.")
FLAGS = flags.FLAGS


def mesh_for(flag: str):
    import math

    import jax

    from sharding.mesh import make_mesh, parse_mesh_flag

    sizes = parse_mesh_flag(flag)
    n = jax.local_device_count() if -1 in sizes.values() else math.prod(sizes.values())
    return make_mesh(sizes, jax.local_devices()[:n])


def bench(cfg, mesh, batch_per_device: int, seq_len: int, steps: int, mtp_lambda: float) -> dict:
    import jax

    from dsjax.train.loop import init_params
    from dsjax.train.optim import OptimConfig
    from dsjax.train.step import step_fns
    from experiments.bench_util import synthetic_batch, time_steps
    from sharding.state import shard_batch, state_shardings

    step_fn, _, _, tx = step_fns(
        cfg,
        OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000),
        mtp_lambda=mtp_lambda,
        balance_alpha=1e-4,
        bias_gamma=1e-3,
        mesh=mesh,
    )
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    pshard, oshard = state_shardings(mesh, shapes, jax.eval_shape(tx.init, shapes))
    params = init_params(cfg, 0, pshard)
    opt = jax.jit(tx.init, out_shardings=oshard)(params)
    b = batch_per_device * mesh.size
    batch = shard_batch(mesh, synthetic_batch(cfg.vocab_size, b, seq_len), batch_dim=1)
    step_s, compile_s, m, _ = time_steps(step_fn, params, opt, batch, steps)
    return {
        "devices": mesh.size,
        "global_batch": b,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": b * seq_len / step_s,
        "tokens_per_s_per_device": b * seq_len / step_s / mesh.size,
        "compile_s": compile_s,
        "loss": float(m["loss"]),
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from dsjax.config import ModelConfig
    from sharding.mesh import describe

    cfg = ModelConfig.preset(
        FLAGS.preset,
        dtype="bfloat16",
        remat=FLAGS.remat,
        moe_dispatch=FLAGS.moe_dispatch,
        moe_backend=FLAGS.moe_backend,
        moe_capacity_factor=FLAGS.capacity_factor,
    )
    print(
        f"{FLAGS.preset} on {jax.local_device_count()} x {jax.devices()[0].device_kind}; "
        f"{FLAGS.batch_per_device} x {FLAGS.seq_len} tokens per device; dispatch {FLAGS.moe_dispatch}",
        flush=True,
    )
    rows, start, slowest = [], time.perf_counter(), 0.0
    for flag in FLAGS.meshes.split(";"):
        mesh = mesh_for(flag)
        name = describe(mesh)
        t0 = time.perf_counter()
        if t0 - start + slowest > FLAGS.budget_s:
            r = {"devices": mesh.size, "error": f"skipped: --budget_s={FLAGS.budget_s:.0f} would be exceeded"}
        else:
            try:
                r = bench(cfg, mesh, FLAGS.batch_per_device, FLAGS.seq_len, FLAGS.steps, FLAGS.mtp_lambda)
            except Exception as e:  # noqa: BLE001 -- report and carry on with the other meshes
                r = {"devices": mesh.size, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            slowest = max(slowest, time.perf_counter() - t0)
        r["mesh"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = next((r["tokens_per_s_per_device"] for r in rows if r.get("devices") == 1 and "error" not in r), None)
    print(
        f"\n{'mesh':24s}{'devices':>8s}{'batch':>7s}{'step ms':>10s}{'tokens/s':>11s}{'tok/s/dev':>11s}"
        f"{'vs 1 dev':>10s}{'compile s':>11s}{'loss':>8s}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['mesh']:24s}{r['devices']:8d}  {r['error']}")
            continue
        rel = f"{r['tokens_per_s_per_device'] / base:9.2f}x" if base else f"{'-':>10s}"
        print(
            f"{r['mesh']:24s}{r['devices']:8d}{r['global_batch']:7d}{r['step_ms']:10.1f}{r['tokens_per_s']:11.0f}"
            f"{r['tokens_per_s_per_device']:11.0f}{rel}{r['compile_s']:11.1f}{r['loss']:8.3f}"
        )
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
