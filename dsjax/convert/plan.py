"""The one mapping between dsjax params and Hugging Face tensor names, shared by load (hf.py), save (export.py)
and the streaming converter (stream.py), so they cannot drift apart.

One table (`_block_rules`) says how each parameter of a transformer block maps to HF tensor names; everything
else (stacking scanned layers, the MTP layers at `model.layers.{num_hidden_layers + k}`, per-expert keys,
transposes) is derived from it.

The unit of work is a `Unit`: one slice of one dsjax leaf (a layer of a scanned segment, one routed expert of
it) and the few HF tensors it comes from. `load_hf` assembles units in memory; the streaming converter writes
each one to disk as it is read, so its memory is a few units, never a whole stacked leaf.
"""

from __future__ import annotations

import collections
import functools
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig

ROUTER = ("gate/kernel", "e_score_correction_bias")  # kept float32 whatever the dtype (router math is float32)


def transpose(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a.T, contiguous (or written into `out`). Every Linear weight is transposed between torch [out, in] and Flax
    [in, out], and numpy's strided copy of 2-byte elements is the slowest step of a conversion. So k = 8 / itemsize
    consecutive rows are first packed into one uint64 word per column (contiguous, vectorised shifts), the uint64
    matrix is transposed in cache-sized blocks (k times fewer elements to move), and its bytes are already in the
    transposed order: about 2x faster. Slabs of rows bound the scratch memory to ~2 x 16 MB."""
    if out is None and any(st == 0 and n > 1 for st, n in zip(a.strides, a.shape)):
        return a.T  # a broadcast stand-in (hf_shapes): only its shape matters, never copy it
    if a.ndim != 2:
        t = np.ascontiguousarray(a.T)
        if out is None:
            return t
        out[...] = t
        return out
    r, c = a.shape
    out = np.empty((c, r), a.dtype) if out is None else out
    size = a.dtype.itemsize
    bits = np.dtype(f"u{size}")
    src = a.view(bits)
    k = 8 // size if size in (1, 2, 4) and sys.byteorder == "little" else 1
    main = r - r % k if k > 1 else 0
    slab = max(k, (16 << 20) // max(1, c * size) // k * k)
    for r0 in range(0, main, slab):
        r1 = min(main, r0 + slab)
        words = src[r0:r1:k].astype(np.uint64)
        for j in range(1, k):
            part = src[r0 + j : r1 : k].astype(np.uint64)
            part <<= np.uint64(8 * size * j)
            words |= part
        t = np.empty((c, words.shape[0]), np.uint64)
        for i in range(0, words.shape[0], 32):
            t[:, i : i + 32] = words[i : i + 32].T
        out.view(bits)[:, r0:r1] = t.view(bits)  # little-endian: word j holds row r0 + k*i + j at bytes 8i..
    for i in range(main, r, 256):  # leftover rows (and 8-byte dtypes): plain blocked copy
        out.view(bits)[:, i : min(r, i + 256)] = src[i : i + 256].T
    return out


@dataclass(frozen=True)
class Rule:
    """One dsjax leaf slice <-> one or more HF tensors. `names(prefix)`; `join` HF arrays -> slice; `split` back.

    experts > 0: the leaf has an experts axis after the layer axis; the rule describes one expert, whose HF prefix
    is `{layer prefix}.mlp.experts.{j}`.
    """

    names: Callable[[str], list[str]]
    join: Callable[[list[np.ndarray]], np.ndarray]
    split: Callable[[np.ndarray], list[np.ndarray]]
    experts: int = 0


def _same(suffix):
    return Rule(lambda p: [f"{p}.{suffix}"], lambda a: a[0], lambda x: [x])


def _linear(suffix):  # torch Linear weight [out, in] <-> kernel [in, out]
    return Rule(lambda p: [f"{p}.{suffix}"], lambda a: transpose(a[0]), lambda x: [transpose(x)])


def _join_gate_up(a):  # gate [I, D], up [I, D] -> [D, 2I] = [gate.T | up.T]
    i = a[0].shape[0]
    out = np.empty((a[0].shape[1], 2 * i), a[0].dtype)
    transpose(a[0], out[:, :i])
    transpose(a[1], out[:, i:])
    return out


def _experts_gate_up(e):
    return Rule(
        lambda p: [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"],
        _join_gate_up,
        lambda x: [transpose(x[:, : x.shape[1] // 2]), transpose(x[:, x.shape[1] // 2 :])],
        experts=e,
    )


def _experts_down(e):
    return Rule(lambda p: [f"{p}.down_proj.weight"], lambda a: transpose(a[0]), lambda x: [transpose(x)], experts=e)


def _block_rules(cfg: ModelConfig, moe: bool) -> dict[str, Rule]:
    r = {
        "input_layernorm/weight": _same("input_layernorm.weight"),
        "post_attention_layernorm/weight": _same("post_attention_layernorm.weight"),
    }
    projs = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] + (
        ["q_a_proj", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"]
    )
    for name in projs:
        r[f"self_attn/{name}/kernel"] = _linear(f"self_attn.{name}.weight")
    for name in ["kv_a_layernorm"] + (["q_a_layernorm"] if cfg.q_lora_rank else []):
        r[f"self_attn/{name}/weight"] = _same(f"self_attn.{name}.weight")
    if not moe:
        for w in ("gate", "up", "down"):
            r[f"mlp/{w}_proj/kernel"] = _linear(f"mlp.{w}_proj.weight")
        return r
    r["mlp/gate/kernel"] = _linear("mlp.gate.weight")
    if cfg.topk_method == "noaux_tc":
        r["mlp/gate/e_score_correction_bias"] = _same("mlp.gate.e_score_correction_bias")
    r["mlp/experts_gate_up_proj"] = _experts_gate_up(cfg.n_routed_experts)
    r["mlp/experts_down_proj"] = _experts_down(cfg.n_routed_experts)
    if cfg.n_shared_experts:
        for w in ("gate", "up", "down"):
            r[f"mlp/shared_experts/{w}_proj/kernel"] = _linear(f"mlp.shared_experts.{w}_proj.weight")
    return r


@dataclass(frozen=True)
class Entry:
    path: str  # "/"-joined dsjax param path
    prefixes: list[str]  # HF name prefix per stacked layer ([one] when not stacked)
    rule: Rule
    stacked: bool


def plan(cfg: ModelConfig) -> list[Entry]:
    """Every dsjax parameter with the HF tensors it comes from."""
    out = [
        Entry("embed_tokens/embedding", ["model"], _same("embed_tokens.weight"), False),
        Entry("norm/weight", ["model"], _same("norm.weight"), False),
    ]
    if not cfg.tie_word_embeddings:
        out.append(
            Entry(
                "lm_head",
                [""],
                Rule(lambda p: ["lm_head.weight"], lambda a: transpose(a[0]), lambda x: [transpose(x)]),
                False,
            )
        )
    segs = (
        ("dense_layers", range(cfg.num_dense_layers), False),
        ("moe_layers", range(cfg.first_k_dense_replace, cfg.num_hidden_layers), True),
    )
    for seg, layers, moe in segs:
        if len(layers):
            for rel, rule in _block_rules(cfg, moe).items():
                out.append(Entry(f"{seg}/{rel}", [f"model.layers.{i}" for i in layers], rule, True))
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}"
        out += [
            Entry(f"mtp_{k}/enorm/weight", [p], _same("enorm.weight"), False),
            Entry(f"mtp_{k}/hnorm/weight", [p], _same("hnorm.weight"), False),
            Entry(f"mtp_{k}/eh_proj/kernel", [p], _linear("eh_proj.weight"), False),
            Entry(f"mtp_{k}/norm/weight", [p], _same("shared_head.norm.weight"), False),
        ]
        for rel, rule in _block_rules(cfg, cfg.num_moe_layers > 0).items():
            out.append(Entry(f"mtp_{k}/block/{rel}", [p], rule, False))
    return out


@dataclass(frozen=True)
class Unit:
    path: str  # the dsjax leaf
    index: tuple[int, ...]  # which slice of it: (layer,), (layer, expert), (expert,) or ()
    names: tuple[str, ...]  # the HF tensors it is made of
    rule: Rule
    layer: float  # HF layer number, for ordering output files like the released checkpoint

    @property
    def router(self) -> bool:
        return self.path.endswith(ROUTER)


def _layer_number(prefix: str, cfg: ModelConfig, path: str) -> float:
    if prefix.startswith("model.layers."):
        return int(prefix.split(".")[2])
    return -1 if path.startswith("embed_tokens") else cfg.num_hidden_layers - 0.5  # embed first; norm, head last


def units(cfg: ModelConfig) -> list[Unit]:
    """Every slice of every leaf, ordered by HF layer (the order tensors sit in released checkpoints)."""
    out = []
    for entry in plan(cfg):
        for i, p in enumerate(entry.prefixes):
            lead = (i,) if entry.stacked else ()
            layer = _layer_number(p, cfg, entry.path)
            if entry.rule.experts:
                for j in range(entry.rule.experts):
                    q = f"{p}.mlp.experts.{j}"
                    out.append(Unit(entry.path, lead + (j,), tuple(entry.rule.names(q)), entry.rule, layer))
            else:
                out.append(Unit(entry.path, lead, tuple(entry.rule.names(p)), entry.rule, layer))
    return sorted(out, key=lambda u: u.layer)  # stable: plan order within a layer


def ordered_map(fn: Callable, items, workers: int = 1) -> Iterator:
    """fn(item) for each item, in order, computed by up to `workers` threads with as many results in flight: the
    NumPy work (reads, FP8 scaling, transposes) releases the GIL, so units overlap with each other and with disk
    writes, and memory stays at `workers` units."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The MTP layers' copies of the shared embedding / head in released checkpoints: (HF name, source name)."""
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}"
        out += [
            (f"{p}.embed_tokens.weight", "model.embed_tokens.weight"),
            (
                f"{p}.shared_head.head.weight",
                "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
            ),
        ]
    return out


@functools.lru_cache(maxsize=8)
def leaf_specs(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype (cfg.param_dtype; the router float32) of every leaf, without allocating anything (cached:
    tracing the model's init takes a second or two; treat the result as read-only)."""
    from dsjax.model import DeepSeekV3

    tok = jax.ShapeDtypeStruct((1, max(8, cfg.num_nextn_predict_layers + 2)), jnp.int32)  # MTP depth k needs t+k
    shapes = jax.eval_shape(lambda t: DeepSeekV3(cfg).init(jax.random.key(0), t), tok)["params"]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in leaf_specs(cfg).items()}


def hf_shapes(unit: Unit, leaf_shape) -> list[tuple[int, ...]]:
    """The HF tensor shapes of a unit, from splitting a zero-stride stand-in (no memory touched)."""
    stand_in = np.broadcast_to(np.zeros((), np.float32), tuple(leaf_shape)[len(unit.index) :])
    return [tuple(a.shape) for a in unit.rule.split(stand_in)]


def set_leaf(tree: dict, path: str, value) -> None:
    """Put `value` at a "/"-joined dsjax param path ("moe_layers/mlp/gate/kernel") of a nested dict, creating the
    dicts on the way."""
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def get_leaf(tree, path: str):
    """The leaf at a "/"-joined dsjax param path of a nested params dict (the inverse of `set_leaf`)."""
    for k in path.split("/"):
        tree = tree[k]
    return tree
