"""Ahead-of-time compilation of the project's real steps for a TPU slice described by `jax.experimental.topologies`
(experiments/compile.py is the command line; tests/test_tpu_aot.py uses these too): the pretraining step, the GRPO
update, and the generation engine's prefill and decode loop over a paged latent cache (weights in their rule-table
layout; cache rows and their pages split over the batch axes). Defines no flags.

    devices = topology_devices("v5p:2x2x1")
    compiled = compile_job("pretrain", config, devices, "data:2,expert:2")   # {name: jax.stages.Compiled}
    fits = report(compiled, devices[0].device_kind, seconds, dump_dir="")
"""

from __future__ import annotations

import collections
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.errors import UserError

JOBS = ("pretrain", "grpo", "generate")
# HBM per chip in GiB, by jax device_kind: what the chip reports (libtpu says 15.75G for v5e; v5p 95.74 GiB, the
# datasheet's 95 GB of HBM2e); v6e and older chips: the datasheet.
HBM_GIB = {
    "TPU v5 lite": 16.0,
    "TPU v5e": 16.0,
    "TPU v6 lite": 32.0,
    "TPU v5": 95.74,
    "TPU v5p": 95.74,
    "TPU v4": 32.0,
    "TPU v3": 16.0,
}
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute", "ragged-all-to-all")


def default_config(job: str):
    from experiments.configs import grpo, tiny

    return (grpo if job == "grpo" else tiny).get_config()


def topology_devices(name: str):
    """The devices of TPU slice `name` (e.g. "v5p:8x8x8"), from libtpu's topology description."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError(
            f'compiling for TPU needs libtpu: pip install "jax[tpu]=={jax.__version__}" (it installs on a CPU-only '
            "host too)"
        ) from None
    from jax.experimental import topologies

    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):
        raise UserError(f"--topology={name!r}: expected <chip>:<shape>, e.g. v5p:2x2x1, v5e:4x4, v6e:16x16")
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's message names what it does not know
        raise UserError(f"--topology={name!r}: {str(e).splitlines()[0][:300]}") from None


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _state(cfg, tx, mesh):
    from dsjax.train.loop import init_params
    from sharding.state import state_shardings

    params = jax.eval_shape(lambda: init_params(cfg, 0))
    opt = jax.eval_shape(tx.init, params)
    pshard, oshard = state_shardings(mesh, params, opt)
    return abstract(params, pshard), abstract(opt, oshard)


def compile_uncached(lowered):
    """lowered.compile() with JAX's persistent compilation cache off: an executable compiled for a topology has no
    client to be loaded into, so a cached one can never be read back (JAX warns "PjRtCompiler must be constructed
    with a Client" and compiles again); writing it would only fill the cache directory."""
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", was)


class DoesNotFit(NamedTuple):
    """A step the TPU compiler refused for memory (its own message says how much it needed)."""

    message: str


def lower_bound(step, mesh, *args):
    """Lower and compile a (mesh-bound) jitted step as its trainer calls it: traced with the mesh and rules bound.
    A step whose temporaries exceed the chip's HBM comes back as DoesNotFit (libtpu refuses to compile it)."""
    from sharding.rules import activate

    with activate(mesh):
        jitted = step if hasattr(step, "lower") else step.__wrapped__  # sharding.state.bind wraps the jit
        lowered = jitted.lower(*args)
    try:
        return compile_uncached(lowered)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return DoesNotFit(str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0])


def _batch(mesh, shapes: dict, batch_dim: int):
    from sharding.rules import batch_spec

    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, batch_spec(mesh, len(shape), batch_dim)))
        for k, (shape, dtype) in shapes.items()
    }


def compile_pretrain(config, devices, mesh_flag: str) -> dict:
    from dsjax.runtime import resolve
    from dsjax.train.loop import check_counts, model_config
    from dsjax.train.step import make_step_fns
    from sharding.mesh import make_mesh

    check_counts(config, "train", positive=("grad_accum",))
    mesh = make_mesh(mesh_flag or {"data": -1}, devices)
    cfg = resolve(model_config(config), devices)
    step, _, _, tx = make_step_fns(cfg, config, mesh)
    params, opt = _state(cfg, tx, mesh)
    accum, b, t = config.train.grad_accum, config.data.batch_size, config.data.seq_len
    shape = (accum, b // accum, t)
    batch = _batch(
        mesh,
        {
            k: (shape, jnp.float32 if k == "loss_mask" else jnp.int32)
            for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")
        },
        batch_dim=1,
    )
    return {"train_step": lower_bound(step, mesh, params, opt, jax.ShapeDtypeStruct((), jnp.int32), batch)}


def compile_grpo(config, devices, mesh_flag: str) -> dict:
    from dsjax.rl.run import GrpoRun
    from sharding.mesh import make_mesh

    mesh = make_mesh(mesh_flag or {"data": -1}, devices)
    run = GrpoRun(config, devices)
    r = config.rollout
    update, _, tx = run.update_fns(mesh)
    params, opt = _state(run.cfg, tx, mesh)
    rows, n = r.num_prompts * r.num_samples, run.max_new_tokens
    shapes = {
        "sequences": ((rows, run.max_prompt_length + n), jnp.int32),
        "prompt_lengths": ((rows,), jnp.int32),
        "advantages": ((rows,), jnp.float32),
    }
    shapes.update({k: ((rows, n), jnp.float32) for k in ("mask", "valid", "sampler_logprobs", "old_logprobs")})
    if config.grpo.beta:
        shapes["ref_logprobs"] = ((rows, n), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return {
        "grpo_update": lower_bound(
            update, mesh, params, opt, scalar, _batch(mesh, shapes, 0), jax.ShapeDtypeStruct((), jnp.bool_)
        )
    }


def _shard_state(state, mesh, batch: int, rows):
    """The decode state's abstract arrays with shardings: per-row arrays and the cache's pages over the batch axes
    (`rows`), the rest (layer axis, scalars, the key) replicated."""

    def place(x):
        shape = getattr(x, "shape", ())
        if len(shape) >= 1 and shape[0] == batch:  # per-row arrays, the block table
            spec = P(rows)
        elif len(shape) == 4:  # stacked pages [L, num_pages, page, width]
            spec = P(None, rows)
        elif len(shape) == 3:  # one MTP depth's pages
            spec = P(rows)
        else:
            spec = P()
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(place, state)


def compile_generate(config, devices, mesh_flag: str, batch: int, context: int, prompt_len: int = 128) -> dict:
    """{"prefill": ..., "decode": ...} compiled for `batch` rows: a paged cache of `context` positions per row, a
    prompt bucket of `prompt_len` tokens prefilled, the rest decoded."""
    from dsjax.cache import contiguous_block_table
    from dsjax.generate import engine
    from dsjax.runtime import resolve
    from dsjax.sampling import SamplingConfig
    from dsjax.train.loop import init_params, model_config
    from sharding.mesh import make_mesh
    from sharding.rules import batch_shards, batch_spec
    from sharding.state import state_shardings

    mesh = make_mesh(mesh_flag or {"data": -1}, devices)
    cfg = resolve(model_config(config), devices)
    if cfg.decode_attention_impl == "contiguous":
        raise UserError("--job=generate compiles the paged latent cache; drop decode_attention_impl=contiguous")
    if batch % batch_shards(mesh) or not 0 < prompt_len < context:
        raise UserError(
            f"--batch={batch} must divide by the mesh's {batch_shards(mesh)} batch shards, and "
            f"--prompt_len={prompt_len} lie in [1, --context={context})"
        )
    prompt, new = prompt_len, context - prompt_len
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new)
    eng = engine(cfg, sampling.program, new, context, jnp.dtype(cfg.dtype).name, False, 8)
    shapes = jax.eval_shape(lambda: init_params(cfg, 0))
    params = abstract(
        jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.dtype)), shapes),
        state_shardings(mesh, shapes)[0],
    )  # weights in the compute dtype, as generate() is given them
    row_axes = batch_spec(mesh, 1)[0]
    rows = NamedSharding(mesh, P(row_axes))
    table = jax.ShapeDtypeStruct((batch, contiguous_block_table(1, context).shape[1]), jnp.int32, sharding=rows)
    per_row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows)
    dyn = {**sampling.traced(), "stop": np.full((4,), -1, np.int32), "pad": np.int32(0)}
    dyn = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), dyn)
    key = jax.eval_shape(lambda: jax.random.key(0))
    prefill = lower_bound(eng.prefill, mesh, params, tokens, per_row, per_row, key, dyn, table)
    state = jax.eval_shape(eng.prefill, params, tokens, per_row, per_row, key, dyn, table)
    decode = lower_bound(eng.decode, mesh, params, _shard_state(state, mesh, batch, row_axes), dyn)
    return {"prefill": prefill, "decode": decode}


def compile_job(
    job: str, config, devices, mesh_flag: str, *, batch: int = 64, context: int = 4096, prompt_len: int = 128
) -> dict:
    """{step name: compiled} for `job` on `devices` under `mesh_flag` (see experiments/compile.py)."""
    if job == "pretrain":
        return compile_pretrain(config, devices, mesh_flag)
    if job == "grpo":
        return compile_grpo(config, devices, mesh_flag)
    if job == "generate":
        return compile_generate(config, devices, mesh_flag, batch, context, prompt_len)
    raise UserError(f"--job={job!r} is not one of {', '.join(JOBS)}")


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{collective: (count, bytes of its results)} of one compiled step's HLO (async starts counted once; a
    while-loop body's collectives once per appearance, not per iteration)."""
    sizes = {
        "pred": 1,
        "s8": 1,
        "u8": 1,
        "bf16": 2,
        "f16": 2,
        "s16": 2,
        "u16": 2,
        "f32": 4,
        "s32": 4,
        "u32": 4,
        "f64": 8,
        "s64": 8,
        "u64": 8,
        "f8e4m3fn": 1,
        "f8e5m2": 1,
    }
    out = collections.defaultdict(lambda: [0, 0])
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(.*?)\s+([a-z\-]+?)(-start)?\(", line)
        if not m or m.group(2) not in COLLECTIVES or "-done(" in line:
            continue
        nbytes = 0
        for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", m.group(1)):
            if dtype in sizes:
                nbytes += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += nbytes
    return {k: tuple(v) for k, v in out.items()}


def memory(compiled) -> dict[str, float]:
    """Per-chip GiB: arguments, outputs (less those aliased to donated arguments), temporaries, total."""
    ma = compiled.memory_analysis()
    gib = 2.0**30
    args, temps = ma.argument_size_in_bytes / gib, ma.temp_size_in_bytes / gib
    outs = (ma.output_size_in_bytes - ma.alias_size_in_bytes) / gib
    return {"arguments": args, "outputs": outs, "temporaries": temps, "total": args + outs + temps}


def report(compiled: dict, device_kind: str, seconds: float, dump_dir: str = "") -> bool:
    """Prints the memory table, compile time and collectives; True when every step fits the chip's HBM."""
    hbm = next((v for k, v in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])) if device_kind.startswith(k)), None)
    fits = True
    print(f"{device_kind}: HBM {hbm if hbm else '?'} GiB per chip; compiled in {seconds:.1f} s")
    for name, c in compiled.items():
        if isinstance(c, DoesNotFit):
            fits = False
            print(f"{name}: DOES NOT FIT (the TPU compiler: {c.message})")
            continue
        m = memory(c)
        ok = hbm is None or m["total"] <= hbm
        fits &= ok
        print(
            f"{name}: arguments {m['arguments']:.2f} + outputs {m['outputs']:.2f} + temporaries "
            f"{m['temporaries']:.2f} = {m['total']:.2f} GiB per chip -> {'fits' if ok else 'DOES NOT FIT'}"
        )
        text = c.as_text()
        coll = collectives(text)
        print(
            "  collectives per step: "
            + (", ".join(f"{k} {n} x, {b / 2**20:.1f} MiB" for k, (n, b) in sorted(coll.items())) or "none")
        )
        print(f"  Mosaic TPU kernels: {text.count('tpu_custom_call')} custom calls")
        if dump_dir:
            os.makedirs(dump_dir, exist_ok=True)
            with open(os.path.join(dump_dir, f"{name}.hlo.txt"), "w") as f:
                f.write(text)
    return fits
