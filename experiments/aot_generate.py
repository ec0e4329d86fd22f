"""AOT compile of the generation engine for a TPU slice: its prefill and its decode loop over a paged latent cache,
with weights in their rule-table layout and the batch (cache rows and their pages) split over the batch axes.
Used by experiments/aot.py (`--job=generate`). Defines no flags."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax.errors import UserError


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


def compile_generate(config, devices, mesh_flag: str, batch: int, context: int) -> dict:
    """{"prefill": ..., "decode": ...} compiled for `batch` rows of `context` tokens (half prompt, half new)."""
    from dsjax.cache import contiguous_block_table
    from dsjax.generate import engine
    from dsjax.runtime import resolve
    from dsjax.sampling import SamplingConfig
    from dsjax.train.loop import init_params, model_config
    from experiments.aot import abstract, lower_bound
    from sharding.mesh import make_mesh
    from sharding.rules import batch_shards, batch_spec
    from sharding.state import state_shardings

    mesh = make_mesh(mesh_flag or {"data": -1}, devices)
    cfg = resolve(model_config(config), devices)
    if cfg.decode_attention_impl == "contiguous":
        raise UserError("--job=generate compiles the paged latent cache; drop decode_attention_impl=contiguous")
    if batch % batch_shards(mesh) or context < 2:
        raise UserError(f"--batch={batch} must divide by the mesh's {batch_shards(mesh)} batch shards; --context >= 2")
    prompt, new = context // 2, context - context // 2
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
