"""Logical axis names -> mesh axes: the one table that decides every parallel layout.

Parameters get logical names from `PARAM_AXES` (keyed by their path in the params tree, so the params stay plain
arrays); activations get them inside the model through `nn.with_logical_constraint`, a no-op unless `activate`
has bound this table and a mesh. Changing a layout means editing `RULES`, nothing else.

Logical names
  batch, seq            activations' leading axes
  act_embed             the hidden width of activations (replicated: Megatron-style TP keeps it whole)
  embed                 the hidden width of weights (FSDP storage split; gathered before use)
  vocab, heads, mlp     vocabulary, attention heads (flattened head x dim), dense MLP width
  experts, expert_mlp   routed-expert index and each expert's width
  q_lora, kv_lora       MLA low-rank widths: the FSDP split of q_b_proj / kv_b_proj, which have no embed axis
  layers, norm          the nn.scan layer axis and RMSNorm weights (replicated)

Flax resolves a name by the first rule whose mesh axes are all still free in that array, so order matters:
`experts` takes `expert` before `embed` asks for it, and expert weights fall back to the second `embed` rule.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("experts", "expert"),
    ("embed", ("fsdp", "expert")),  # non-expert weights: ZeRO-3 over every batch axis but data
    ("embed", "fsdp"),  # expert weights: `expert` is taken by the experts axis
    ("q_lora", ("fsdp", "expert")),  # a weight with an embed axis splits that one instead (rules go in order)
    ("kv_lora", ("fsdp", "expert")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("seq", None),
    ("act_embed", None),
    ("layers", None),
    ("norm", None),
)

# Keyed by the last one or two components of a parameter's path; scanned segments (`*_layers`) prepend `layers`.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "weight": ("norm",),
    "q_a_proj/kernel": ("embed", "q_lora"),
    "q_b_proj/kernel": ("q_lora", "heads"),
    "q_proj/kernel": ("embed", "heads"),
    "kv_a_proj_with_mqa/kernel": ("embed", "kv_lora"),
    "kv_b_proj/kernel": ("kv_lora", "heads"),
    "o_proj/kernel": ("heads", "embed"),
    "gate_proj/kernel": ("embed", "mlp"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "gate/kernel": ("embed", None),  # router: every token needs every expert's logit
    "gate/e_score_correction_bias": (None,),
    "experts_gate_up_proj": ("experts", "embed", "expert_mlp"),
    "experts_down_proj": ("experts", "expert_mlp", "embed"),
    "eh_proj/kernel": (None, "embed"),  # its input is [embedding; hidden], twice the width
}


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_axes(path, ndim: int) -> tuple[str | None, ...]:
    keys = _keys(path)
    axes = PARAM_AXES.get("/".join(keys[-2:]), PARAM_AXES.get(keys[-1]))
    if axes is None:
        raise KeyError(f"parameter {'/'.join(keys)} has no entry in sharding.rules.PARAM_AXES")
    if keys[0].endswith("_layers"):
        axes = ("layers",) + axes
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(keys)}: PARAM_AXES gives {axes} for a {ndim}-d array")
    return axes


def param_logical_axes(params):
    """The logical names of every parameter (a tree of tuples shaped like `params`)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_axes(p, x.ndim), params)


def logical_spec(names, mesh: Mesh, shape=None, rules=RULES) -> P:
    """PartitionSpec for logical `names` on `mesh`. Axes of size 1 are left out; with `shape`, mesh axes that do
    not divide a dimension are dropped from the end of its group (that dimension is then less split)."""
    spec = nn.logical_to_mesh_axes(names, rules)
    out = []
    for i, entry in enumerate(spec):
        axes = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        axes = [a for a in axes if mesh.shape.get(a, 1) > 1]
        while shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def param_specs(params, mesh: Mesh, rules=RULES):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: logical_spec(param_axes(p, x.ndim), mesh, x.shape, rules), params
    )


def like_params_specs(tree, params, pspecs):
    """Specs for a tree that holds params-shaped subtrees (optimizer moments): a leaf whose path ends in a
    parameter's path and has its shape gets that parameter's spec; everything else (step counts) is replicated."""
    by_path = {
        _keys(p): (x.shape, s)
        for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(pspecs, is_leaf=_is_spec))
    }

    def spec(path, x):
        for i in range(len(path)):
            hit = by_path.get(_keys(path[i:]))
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def batch_spec(mesh: Mesh, ndim: int, batch_dim: int = 0, rules=RULES) -> P:
    names = [None] * ndim
    names[batch_dim] = "batch"
    return logical_spec(tuple(names), mesh, rules=rules)


def batch_shards(mesh: Mesh, rules=RULES) -> int:
    """How many ways the batch is split (global batch sizes must divide by it)."""
    axes = batch_spec(mesh, 1, rules=rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


@contextlib.contextmanager
def activate(mesh: Mesh | None, rules=RULES):
    """Bind `mesh` (jax.set_mesh) and the rule table while tracing: logical constraints take effect and the MoE
    layer runs its routed experts per device (with an all-to-all when the mesh's expert axis is > 1). A missing
    or one-device mesh binds nothing, so single-device code runs exactly as without sharding."""
    if mesh is None or mesh.size == 1:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
