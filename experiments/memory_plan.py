"""Per-device memory of a training run on a mesh we do not have: parameters, gradients, optimizer state and
activations under sharding/rules.py, from shapes alone (jax.eval_shape; nothing is allocated).

  python experiments/memory_plan.py                                   # DeepSeek-V3 671B on 256 chips
  python experiments/memory_plan.py --mesh=data:2,fsdp:8,expert:16 --batch_size=512 --remat=dots
  python experiments/memory_plan.py --job=generate --preset=deepseek-r1 --mesh=fsdp:32,expert:8 --seq_len=32768

Activations are the residuals jax keeps for the backward pass under the remat policy (traced on one device,
then divided by the batch shards; per-head tensors are not divided by the tensor axis, so that part is an upper
bound), plus one MoE layer's expert-parallel buffers (send, receive at the owner, expert FFN intermediates,
return), which exist while that layer runs: "balanced" when every device receives what it sends, "worst" at the
dropless bound (every source sends every pair to one owner) or the capacity bound; and FSDP's transients: two
layers' weights gathered (the running one and the prefetched next), one layer's whole gradient before its
reduce-scatter, the output head gathered with its whole gradient. --job=generate: weights, latent cache, gathers.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("preset", "deepseek-v3-671b", "dsjax.ModelConfig preset.")
flags.DEFINE_string(
    "mesh",
    "fsdp:4,expert:-1",
    "Mesh as for the training scripts (AXIS:SIZE over data, fsdp, expert, tensor; one size may be -1).",
)
flags.DEFINE_integer("num_devices", 256, "Devices in the planned mesh (fills a -1 size).")
flags.DEFINE_integer("batch_size", 256, "Global batch, in sequences per optimizer step (one micro-batch).")
flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence (--job=generate: cached positions per row).")
flags.DEFINE_enum("job", "pretrain", ["pretrain", "generate"], "A training step, or generation's decode step.")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_string("param_dtype", "float32", "Parameter (master weight) dtype; gradients and AdamW moments match.")
flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"], "Rematerialisation policy per block.")
flags.DEFINE_bool("mtp", True, "Train with the MTP loss (runs the MTP modules).")
flags.DEFINE_float("capacity_factor", 0.0, "moe_capacity_factor (0 = dropless).")

GB = 1e9


def local_bytes(shape, dtype, spec, mesh_sizes) -> int:
    """Bytes of one device's shard of an array with PartitionSpec `spec`."""
    n = 1
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        n *= -(-dim // math.prod(mesh_sizes[a] for a in axes))
    return n * np.dtype(dtype).itemsize


def plan(cfg, mesh_sizes: dict, batch_size: int, seq_len: int, use_mtp: bool = True) -> dict:
    """{row: (total bytes, per-device bytes)} for one training step of `cfg` on a mesh of `mesh_sizes`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType

    from dsjax.model import DeepSeekV3, head_weight
    from dsjax.train.losses import lm_loss
    from dsjax.train.optim import OptimConfig, make_optimizer
    from sharding.mesh import AXES
    from sharding.rules import batch_shards, like_params_specs, param_specs

    mesh = AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    model = DeepSeekV3(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    pspecs = param_specs(params, mesh)
    opt = jax.eval_shape(make_optimizer(OptimConfig()).init, params)
    ospecs = like_params_specs(opt, params, pspecs)
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"--batch_size={batch_size} does not split over {shards} batch shards")

    def total_and_local(tree, specs, where=lambda path: True):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        chosen = [(x, s) for (p, x), s in zip(leaves, jax.tree.leaves(specs, is_leaf=_is_spec)) if where(p)]
        return (
            sum(x.size * x.dtype.itemsize for x, _ in chosen),
            sum(local_bytes(x.shape, x.dtype, s, mesh_sizes) for x, s in chosen),
        )

    experts = lambda p: "experts_" in jax.tree_util.keystr(p)  # noqa: E731
    rows = {
        "parameters": total_and_local(params, pspecs),
        "  routed experts": total_and_local(params, pspecs, experts),
        "  everything else": total_and_local(params, pspecs, lambda p: not experts(p)),
        "gradients": total_and_local(params, pspecs),
        "AdamW moments": total_and_local(opt, ospecs),
    }

    tok = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)

    def residuals(p, tok):
        def loss(p):
            aux = model.apply({"params": p}, tok, mtp=use_mtp).aux
            return lm_loss(
                aux["hidden"], head_weight(p, cfg), tok, jnp.ones(tok.shape), aux, mtp_lambda=0.3 if use_mtp else 0.0
            )[0]

        ids = {id(x) for x in jax.tree.leaves(p)}
        return [r for r in jax.tree.leaves(jax.vjp(loss, p)[1]) if id(r) not in ids]  # params are counted above

    by_shape = {x.shape: s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(pspecs, is_leaf=_is_spec))}
    act_total = act_local = 0
    for r in jax.eval_shape(residuals, params, tok):
        size = r.size * r.dtype.itemsize
        act_total += size
        if batch_size in r.shape or any(n % (batch_size * seq_len) == 0 for n in r.shape):  # per token (or per
            # flattened token x expert choice): split with the batch
            act_local += size // shards
        else:  # e.g. a compute-dtype copy of a weight: laid out like that weight
            act_local += local_bytes(r.shape, r.dtype, by_shape.get(r.shape, ()), mesh_sizes)
    rows[f"activations saved (remat {cfg.remat})"] = (act_total, act_local)

    rows.update(_moe_buffer_rows(cfg, mesh_sizes, batch_size * seq_len // shards, shards))
    gathered = _gathered_rows(cfg, params, pspecs, mesh_sizes)
    rows.update(gathered)
    steady = sum(
        rows[r][1] for r in ("parameters", "gradients", "AdamW moments", f"activations saved (remat {cfg.remat})")
    )
    steady += sum(local for _, local in gathered.values())
    rows["total, balanced"] = (None, steady + rows["MoE buffers, one layer (balanced)"][1])
    rows["total, worst"] = (None, steady + rows["MoE buffers, one layer (worst)"][1])
    return rows


def _gathered_bytes(tree, specs, dtype, mesh_sizes: dict, layer_axis: bool) -> int:
    """One device's bytes of `tree` all-gathered for use: split only over `tensor` (and `expert` for routed
    experts); every other axis of each weight's spec is undone. layer_axis: drop the leading (scan) axis."""
    import jax
    from jax.sharding import PartitionSpec

    total = 0
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(specs, is_leaf=_is_spec)):
        keep = {"tensor", "expert"} if "experts_" in jax.tree_util.keystr(path) else {"tensor"}
        entries = [(e,) if isinstance(e, str) else (e or ()) for e in tuple(spec)]
        spec = PartitionSpec(*[tuple(a for a in e if a in keep) or None for e in entries])
        shape, spec = (x.shape[1:], PartitionSpec(*spec[1:])) if layer_axis else (x.shape, spec)
        total += local_bytes(shape, dtype, spec, mesh_sizes)
    return total


def _gathered_rows(cfg, params, pspecs, mesh_sizes: dict, gradients: bool = True) -> dict:
    """FSDP's transients: the widest layer's weights all-gathered in the compute dtype, twice (XLA gathers the next
    layer's while one runs), with `gradients` that layer's gradient whole in the parameter dtype before its
    reduce-scatter, and the output head gathered (and its whole gradient, which the loss forms first)."""
    import jax.numpy as jnp

    seg = "moe_layers" if "moe_layers" in params else "dense_layers"
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    head = "lm_head" if "lm_head" in params else "embed_tokens"
    layer = lambda dtype: _gathered_bytes(params[seg], pspecs[seg], dtype, mesh_sizes, True)  # noqa: E731
    whole_head = lambda dtype: _gathered_bytes(params[head], pspecs[head], dtype, mesh_sizes, False)  # noqa: E731
    rows = {f"two {seg[:-7]} layers' weights gathered ({dt.name})": (None, 2 * layer(dt))}
    if gradients:
        rows[f"one {seg[:-7]} layer's gradient before reduce-scatter ({pdt.name})"] = (None, layer(pdt))
        rows[f"output head gathered ({dt.name}) + its gradient ({pdt.name})"] = (None, whole_head(dt) + whole_head(pdt))
    else:
        rows[f"output head gathered ({dt.name})"] = (None, whole_head(dt))
    return rows


def plan_decode(cfg, mesh_sizes: dict, batch: int, context: int) -> dict:
    """{row: (total, per-device bytes)} of generation's decode step: weights in the compute dtype, the latent
    cache of `batch` rows x `context` positions split with the batch (MLA's latent has no head axis), and the
    gathered transients as in training (no gradients)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType

    from dsjax.model import DeepSeekV3
    from sharding.mesh import AXES
    from sharding.rules import batch_shards, param_specs

    mesh = AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    dt = jnp.dtype(cfg.dtype)
    params = jax.eval_shape(lambda: DeepSeekV3(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params)
    pspecs = param_specs(params, mesh)
    shards = batch_shards(mesh)
    if batch % shards:
        raise ValueError(f"--batch_size={batch} does not split over {shards} batch shards")
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(pspecs, is_leaf=_is_spec))
    weights = sum(local_bytes(x.shape, dt, s, mesh_sizes) for x, s in leaves)
    cache = cfg.num_hidden_layers * batch * context * cfg.cache_width * dt.itemsize
    rows = {
        f"weights ({dt.name})": (sum(x.size for x in jax.tree.leaves(params)) * dt.itemsize, weights),
        f"latent cache ({batch} x {context} positions)": (cache, cache // shards),
        **_gathered_rows(cfg, params, pspecs, mesh_sizes, gradients=False),
    }
    rows["total"] = (None, sum(local for _, local in rows.values()))
    return rows


def _moe_buffer_rows(cfg, mesh_sizes: dict, local_tokens: int, shards: int) -> dict:
    """The transient buffers of one expert-parallel MoE layer: balanced routing and the dropless worst case."""
    import jax.numpy as jnp

    out = {}
    ep = mesh_sizes["expert"]
    d, inter, k, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    dt = jnp.dtype(cfg.dtype).itemsize
    pairs = local_tokens * k
    recv_worst = ep * pairs
    if cfg.moe_capacity_factor:
        recv_worst = min(recv_worst, ep * (e // ep) * math.ceil(cfg.moe_capacity_factor * pairs / e))
    tp = mesh_sizes["tensor"]

    def buffers(recv):  # send + receive + gate|up (f32) + SwiGLU + expert output + returned rows
        return 2 * pairs * d * dt + recv * (d * dt + 2 * inter // tp * 4 + inter // tp * dt + d * dt)

    out["MoE buffers, one layer (balanced)"] = (buffers(pairs) * shards, buffers(pairs))
    out["MoE buffers, one layer (worst)"] = (buffers(recv_worst) * shards, buffers(recv_worst))
    return out


def _is_spec(x) -> bool:
    from jax.sharding import PartitionSpec

    return isinstance(x, PartitionSpec)


def report(
    name: str, cfg, mesh_sizes: dict, batch_size: int, seq_len: int, use_mtp: bool, job: str = "pretrain"
) -> str:
    from sharding.mesh import describe
    from sharding.rules import RULES

    n = math.prod(mesh_sizes.values())
    counts = cfg.param_counts()
    lines = [
        f"{name}: {counts['total'] / 1e9:.1f}B parameters ({counts['active_per_token'] / 1e9:.1f}B "
        f"active per token); mesh {describe(mesh_sizes)} = {n} devices",
    ]
    if job == "generate":
        rows = plan_decode(cfg, mesh_sizes, batch_size, seq_len)
        lines.append(f"decode: {batch_size} rows x {seq_len} cached positions; weights and cache in {cfg.dtype}")
    else:
        rows = plan(cfg, mesh_sizes, batch_size, seq_len, use_mtp)
        lines.append(
            f"global batch {batch_size} x {seq_len} tokens; compute {cfg.dtype}, parameters/gradients/moments "
            f"{cfg.param_dtype}; MTP {'on' if use_mtp else 'off'}; capacity factor "
            f"{cfg.moe_capacity_factor or 'none (dropless)'}"
        )
    lines += ["rule table: " + ", ".join(f"{k}->{v}" for k, v in RULES if v), ""]
    width = max(map(len, rows)) + 2
    lines.append(f"{'':{width}s}{'total':>12s}{'per device':>14s}")
    for row, (total, local) in rows.items():
        tot = "" if total is None else f"{total / GB:10.2f} GB"
        lines.append(f"{row:{width}s}{tot:>12s}{local / GB:11.2f} GB")
    lines.append(
        "Compare a compiled step's per-chip total (experiments/compile.py) with 'total, worst': its MoE buffers have "
        "static,\nworst-case (dropless) shapes. Left out: fusion temporaries, a decode loop's copies of its carried "
        "state, and\nthe padding and fragmentation of the compiler's buffer assignment (experiments/BENCHMARKS.md "
        "'TPU compile')."
    )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dsjax
    from sharding.mesh import AXES, parse_mesh_flag

    f = flags.FLAGS
    sizes = parse_mesh_flag(f.mesh)
    fixed = math.prod(s for s in sizes.values() if s != -1)
    sizes = {a: (f.num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
    if math.prod(sizes.values()) != f.num_devices:
        raise app.UsageError(f"--mesh={f.mesh} does not use --num_devices={f.num_devices} devices")
    cfg = dsjax.ModelConfig.preset(
        f.preset, dtype=f.dtype, param_dtype=f.param_dtype, remat=f.remat, moe_capacity_factor=f.capacity_factor
    )
    print(report(f.preset, cfg, {a: sizes[a] for a in AXES}, f.batch_size, f.seq_len, f.mtp, f.job))


if __name__ == "__main__":
    app.run(main)
