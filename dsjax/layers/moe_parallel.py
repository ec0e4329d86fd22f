"""The MoE layer's routed experts under a mesh: shard_map, per-device routing, all-to-all to the experts' owners.

`dsjax.layers.moe.MoE` calls `routed_experts` whenever a mesh is bound (`sharding.rules.activate`). Every device
routes its own tokens (so sorting never spans devices). With the `experts` logical axis mapped to mesh axes of
total size ep > 1, each device owns E/ep experts and:

  1. sorts its (token, choice) pairs by expert; sends each expert's rows to the expert's owner with one
     all-to-all, laid out on the receiver expert-major (expert 0 from every source, then expert 1, ...);
  2. runs the local grouped matmul (the same `grouped_ffn` as one device) on that buffer;
  3. sends the results back with the mirror all-to-all, un-sorts and combines them with the routing weights.

Dropless by default: the receive buffer holds ep x (this device's pairs) rows, enough for every source to send
every pair to one owner. `moe_capacity_factor` c > 0 bounds each source's rows per expert by ceil(c*pairs/E)
(later tokens drop first; a dropped pair adds nothing) and shrinks the buffers to match. `moe_device_limit`
restricts each token to M owners (dsjax.layers.moe_ops.route). The all-to-all is `lax.ragged_all_to_all` (only real
rows travel) on GPU/TPU; XLA:CPU lacks it, so there `padded_all_to_all` sends fixed-size blocks with the same
contract (`moe_dispatch` overrides the choice). A tensor axis on `expert_mlp` splits every expert's width;
partial outputs are summed over it. Expert counts come out summed over every token shard (the global load the
router-bias update needs); the balance loss is averaged over them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.config import ModelConfig
from dsjax.layers.moe_ops import (
    combine_pairs,
    expert_counts,
    expert_matmul,
    gather_pairs,
    grouped_ffn,
    pair_order,
    route,
    routed_experts_local,
    router_logits,
    sequence_balance_loss,
    word_gathers,
)
from sharding.rules import logical_spec


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def routed_experts(x, kernel, bias, gate_up, down, cfg: ModelConfig, shared=None):
    """x [B, T, D] (global) -> (routed-expert output [B, T, D], expert counts [E] summed over all tokens,
    balance loss averaged over all sequences, whether the output includes `shared`). Needs a bound mesh and rule
    table (`sharding.rules.activate`). shared (moe_ops.shared_in_routed: FP8): the shared experts' stacked weights
    (gate_up [S, D, 2I], down [S, I, D]), run inside the routed experts' grouped GEMMs where every device holds
    all experts whole (no expert or tensor split: e.g. one GPU's trainer mesh); otherwise left to the caller."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    e, d = gate_up.shape[:2]
    gu = gate_up.reshape(e, d, 2, -1)  # gate and up halves split alike over the tensor axis
    x_spec = logical_spec(("batch", "seq", "act_embed"), mesh, x.shape, rules)
    if x_spec[1] is not None or x_spec[2] is not None:
        raise NotImplementedError(
            f"expert parallelism needs whole sequences and hidden vectors per device; the "
            f"rules split activations as {x_spec}"
        )
    w_spec = logical_spec(("experts", None, None, "expert_mlp"), mesh, gu.shape, rules)
    token_axes, ep_axes, tp_axes = _axes(x_spec[0]), _axes(w_spec[0]), _axes(w_spec[3])
    ep = math.prod(mesh.shape[a] for a in ep_axes)

    fold = shared is not None and ep == 1 and not tp_axes

    def body(x, kernel, bias, gate_up, down, *shared_weights):
        b, t, _ = x.shape
        flat = x.reshape(b * t, d)
        routing = route(router_logits(flat, kernel), bias, cfg, ep)
        gate_up = gate_up.reshape(gate_up.shape[0], d, -1)
        if ep == 1:
            y = routed_experts_local(flat, routing, gate_up, down, cfg, tuple(shared_weights) or None)
        else:
            y = dispatch_and_combine(flat, routing, gate_up, down, cfg, ep_axes, ep)
        if tp_axes:
            y = jax.lax.psum(y, tp_axes)
        counts = expert_counts(routing.indices, e)
        balance = sequence_balance_loss(routing.scores, routing.indices, b, cfg)
        if token_axes:
            counts, balance = jax.lax.psum(counts, token_axes), jax.lax.pmean(balance, token_axes)
        return y.reshape(b, t, d), counts, balance

    in_specs = (x_spec, P(), P(), w_spec, P(w_spec[0], w_spec[3], None)) + ((P(), P()) if fold else ())
    # check_vma=False: the Pallas grouped-matmul kernels declare outputs without manual-axis types, which the
    # check rejects; gradients through the psums are the same either way (tests/test_sharding.py compares them).
    args = (x, kernel, bias, gu, down) + (tuple(shared) if fold else ())
    y, counts, balance = jax.shard_map(body, in_specs=in_specs, out_specs=(x_spec, P(), P()), check_vma=False)(*args)
    return y, counts, balance, fold


class Plan(NamedTuple):
    """Offsets and sizes (ragged_all_to_all's four arrays) for the trip to the owners and the trip back."""

    there: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    back: tuple[jax.Array, jax.Array, jax.Array, jax.Array]
    local_sizes: jax.Array  # [E/ep] rows of each local expert in the receive buffer


def exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def plan(held: jax.Array, sent: jax.Array, me: jax.Array) -> Plan:
    """held, sent [ep, E] int32: the rows each source holds per expert (its sorted buffer) and sends (at most
    `held`; fewer under a capacity). Slice j of a trip is (peer j // (E/ep), local expert j % (E/ep)), which on
    the way out is just global expert j."""
    ep, e = sent.shape
    el = e // ep
    start = exclusive_cumsum(held, 1)  # [src, E] expert e's first row in src's buffer
    by_owner = sent.reshape(ep, ep, el)  # [src, owner, local expert]
    expert_base = exclusive_cumsum(by_owner.sum(0), 1)  # [owner, l] local expert l's first row at the owner
    slot = expert_base[None] + exclusive_cumsum(by_owner, 0)  # [src, owner, l] where src's rows land
    mine = by_owner[:, me].reshape(-1)  # [src * l] rows each source sends me
    there = (start[me], sent[me], slot[me].reshape(-1), mine)
    back = (slot[:, me].reshape(-1), mine, start.reshape(ep, ep, el)[:, me].reshape(-1), sent[me])
    return Plan(there, back, by_owner.sum(0)[me])


def padded_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, peer_rows: int
):
    """`lax.ragged_all_to_all`'s contract on a dense all_to_all: each peer's slices travel in one block of
    `peer_rows` rows (at least what any peer can receive from one sender) with the output row of each; padding
    rows carry an out-of-range row and are dropped. recv_sizes is implied by those rows."""
    del recv_sizes
    ep = jax.lax.axis_size(axis_name)
    sizes = send_sizes.reshape(ep, -1)
    spd = sizes.shape[1]
    ends = jnp.cumsum(sizes, 1)
    r = jnp.arange(peer_rows, dtype=ends.dtype)
    j = (r[None, :, None] >= ends[:, None, :]).sum(-1)  # [peer, row] slice of each block row
    valid = j < spd
    j = jnp.minimum(j, spd - 1)
    within = r[None] - jnp.take_along_axis(ends - sizes, j, 1)
    src = jnp.take_along_axis(input_offsets.reshape(ep, spd), j, 1) + within
    dst = jnp.where(valid, jnp.take_along_axis(output_offsets.reshape(ep, spd), j, 1) + within, output.shape[0])
    block = jnp.where(valid[..., None], operand[jnp.where(valid, src, 0)], 0).reshape(ep * peer_rows, -1)
    rows = jax.lax.all_to_all(block, axis_name, 0, 0, tiled=True)
    dst = jax.lax.all_to_all(dst.reshape(-1), axis_name, 0, 0, tiled=True)
    return output.at[dst].set(rows.astype(output.dtype), mode="drop")


def capacity(cfg: ModelConfig, pairs: int) -> int | None:
    """Rows per (source device, expert) under `moe_capacity_factor`, None when dropless."""
    if not cfg.moe_capacity_factor:
        return None
    return max(1, math.ceil(cfg.moe_capacity_factor * pairs / cfg.n_routed_experts))


def dispatch_and_combine(flat, routing, gate_up, down, cfg: ModelConfig, axes, ep: int):
    """Inside shard_map. flat [n, D] local tokens; gate_up/down hold this device's E/ep experts; cfg is resolved
    (dsjax.runtime). Returns the combined routed output [n, D]."""
    n, k = routing.indices.shape
    e, d = cfg.n_routed_experts, flat.shape[-1]
    dt = jnp.dtype(cfg.dtype)
    pairs = n * k
    po = pair_order(routing.indices, e)
    held = po.sizes
    cap = capacity(cfg, pairs)
    sent = held if cap is None else jnp.minimum(held, cap)
    both = jax.lax.all_gather(jnp.stack([held, sent]), axes)  # [ep, 2, E]: every source's loads
    p = plan(both[:, 0], both[:, 1], jax.lax.axis_index(axes))
    peer_rows = pairs if cap is None else min(pairs, (e // ep) * cap)
    if cfg.moe_dispatch == "ragged":
        a2a = jax.lax.ragged_all_to_all
    else:

        def a2a(*args, axis_name):
            return padded_all_to_all(*args, axis_name=axis_name, peer_rows=peer_rows)

    rows = gather_pairs(flat.astype(dt), po.order, po.inverse, k, word_gathers(cfg))
    recv = a2a(rows, jnp.zeros((ep * peer_rows, d), dt), *p.there, axis_name=axes)
    out = grouped_ffn(recv, p.local_sizes, gate_up, down, dt, expert_matmul(cfg), fp8=cfg.fp8_experts).astype(dt)
    back = a2a(out, jnp.zeros((pairs, d), dt), *p.back, axis_name=axes)
    return combine_pairs(back, po.order, po.inverse, routing.weights)
