"""Placing a training run on a mesh: state shardings from the rule table, global batches, bound step functions.

Any training loop (the pretraining trainer, RL) needs the same four calls:
  pshard, oshard = state_shardings(mesh, params, opt_state)    # NamedSharding trees (concrete or abstract)
  params, opt_state = shard_train_state(mesh, params, opt_state)
  step = bind(mesh, jax.jit(step_fn, out_shardings=(pshard, oshard, replicated(mesh))))
  batch = shard_batch(mesh, host_batch)                         # this process's rows -> one global array
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.rules import activate, batch_spec, like_params_specs, named, param_specs


def state_shardings(mesh: Mesh, params, opt_state=None):
    """(params shardings, optimizer-state shardings or None): moments follow their parameter, counts replicate."""
    pspecs = param_specs(params, mesh)
    ospecs = None if opt_state is None else like_params_specs(opt_state, params, pspecs)
    return named(mesh, pspecs), None if ospecs is None else named(mesh, ospecs)


def shard_train_state(mesh: Mesh, params, opt_state=None):
    """Moves (or reshards) params and optimizer state to their rule-table layout on `mesh`."""
    pshard, oshard = state_shardings(mesh, params, opt_state)
    params = jax.device_put(params, pshard)
    return params if opt_state is None else (params, jax.device_put(opt_state, oshard))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh | None, batch, batch_dim: int = 0):
    """Host arrays holding this process's share of the batch (rows along `batch_dim`) -> global jax.Arrays split
    over the rule table's batch axes. Without a mesh: plain device arrays."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, batch)

    def put(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, batch_spec(mesh, x.ndim, batch_dim))
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def bind(mesh: Mesh | None, fn):
    """`fn` (typically jitted) called with `mesh` and the rule table bound, so it traces with logical sharding
    constraints and the per-device MoE path whoever calls it."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        with activate(mesh):
            return fn(*args, **kwargs)

    return bound
