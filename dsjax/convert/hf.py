"""Hugging Face safetensors <-> dsjax params.

One table (`_block_rules`) says how each parameter of a transformer block maps to HF tensor names; everything
else (stacking scanned layers, the MTP layers at `model.layers.{num_hidden_layers + k}`, per-expert keys,
transposes) is derived from it, so load and save cannot drift apart.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.convert import safetensors_io as st

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Rule:
    """One dsjax leaf <-> one or more HF tensors. `names(prefix)`; `join` HF arrays -> leaf; `split` the reverse."""
    names: Callable[[str], list[str]]
    join: Callable[[list[np.ndarray]], np.ndarray]
    split: Callable[[np.ndarray], list[np.ndarray]]


def _same(suffix):
    return Rule(lambda p: [f"{p}.{suffix}"], lambda a: a[0], lambda x: [x])


def _linear(suffix):  # torch Linear weight [out, in] <-> kernel [in, out]
    return Rule(lambda p: [f"{p}.{suffix}"], lambda a: a[0].T, lambda x: [x.T])


def _experts_gate_up(e):
    def names(p):
        return [f"{p}.mlp.experts.{j}.{w}_proj.weight" for w in ("gate", "up") for j in range(e)]
    def join(a):  # per expert: [gate.T | up.T] -> [E, D, 2I]
        return np.stack([np.concatenate([a[j].T, a[e + j].T], axis=1) for j in range(e)])
    def split(x):
        i = x.shape[-1] // 2
        return [x[j, :, :i].T for j in range(e)] + [x[j, :, i:].T for j in range(e)]
    return Rule(names, join, split)


def _experts_down(e):
    return Rule(lambda p: [f"{p}.mlp.experts.{j}.down_proj.weight" for j in range(e)],
                lambda a: np.stack([x.T for x in a]), lambda x: [x[j].T for j in range(e)])


def _block_rules(cfg: ModelConfig, moe: bool) -> dict[str, Rule]:
    r = {"input_layernorm/weight": _same("input_layernorm.weight"),
         "post_attention_layernorm/weight": _same("post_attention_layernorm.weight")}
    projs = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"] + (["q_a_proj", "q_b_proj"] if cfg.q_lora_rank else ["q_proj"])
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
    path: str                 # "/"-joined dsjax param path
    prefixes: list[str]       # HF name prefix per stacked layer ([one] when not stacked)
    rule: Rule
    stacked: bool


def plan(cfg: ModelConfig) -> list[Entry]:
    """Every dsjax parameter with the HF tensors it comes from."""
    out = [Entry("embed_tokens/embedding", ["model"], _same("embed_tokens.weight"), False),
           Entry("norm/weight", ["model"], _same("norm.weight"), False)]
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head", [""], Rule(lambda p: ["lm_head.weight"], lambda a: a[0].T, lambda x: [x.T]), False))
    segs = (("dense_layers", range(cfg.num_dense_layers), False),
            ("moe_layers", range(cfg.first_k_dense_replace, cfg.num_hidden_layers), True))
    for seg, layers, moe in segs:
        if len(layers):
            for rel, rule in _block_rules(cfg, moe).items():
                out.append(Entry(f"{seg}/{rel}", [f"model.layers.{i}" for i in layers], rule, True))
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}"
        out += [Entry(f"mtp_{k}/enorm/weight", [p], _same("enorm.weight"), False),
                Entry(f"mtp_{k}/hnorm/weight", [p], _same("hnorm.weight"), False),
                Entry(f"mtp_{k}/eh_proj/kernel", [p], _linear("eh_proj.weight"), False),
                Entry(f"mtp_{k}/norm/weight", [p], _same("shared_head.norm.weight"), False)]
        for rel, rule in _block_rules(cfg, cfg.num_moe_layers > 0).items():
            out.append(Entry(f"mtp_{k}/block/{rel}", [p], rule, False))
    return out


def _mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """The MTP layers' copies of the shared embedding / head in released checkpoints: (HF name, source name)."""
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}"
        out += [(f"{p}.embed_tokens.weight", "model.embed_tokens.weight"),
                (f"{p}.shared_head.head.weight", "model.embed_tokens.weight" if cfg.tie_word_embeddings
                 else "lm_head.weight")]
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from dsjax.model import DeepSeekV3
    tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: DeepSeekV3(cfg).init(jax.random.key(0), t), tok)["params"]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _set(tree: dict, path: str, value):
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


class _Shards:
    """Name -> file lookup over a single-file or index-sharded HF directory."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            weight_map = None
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or {INDEX}")
        self._files: dict[str, st.SafetensorsFile] = {}
        if weight_map is None:
            f = self._open("model.safetensors")
            weight_map = {k: "model.safetensors" for k in f.keys()}
        self.weight_map = weight_map

    def _open(self, fname):
        if fname not in self._files:
            path = os.path.join(self.dir, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing")
            self._files[fname] = st.SafetensorsFile(path)
        return self._files[fname]

    def file_of(self, name):
        return os.path.join(self.dir, self.weight_map[name])

    def get(self, name) -> np.ndarray:
        f = self._open(self.weight_map[name])
        if name not in f:
            raise KeyError(f"{f.path}: tensor {name!r} is listed in {INDEX} but not in the file")
        return f.get(name)

    def close(self):
        for f in self._files.values():
            f.close()


def load_hf(hf_dir: str, dtype=jnp.float32, cfg: ModelConfig | None = None, **runtime):
    """Load an HF DeepSeek-V2/V3 safetensors directory -> (ModelConfig, params). bf16 or float32 tensors.

    Router weights and the correction bias stay float32 (as transformers keeps them); everything else is cast
    to `dtype`. Missing, unexpected and wrongly shaped tensors are errors that name the tensor and file.
    """
    cfg = cfg or ModelConfig.from_hf(hf_dir, **runtime)
    shards = _Shards(hf_dir)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    if cfg.num_nextn_predict_layers and not any(k.startswith(mtp_prefix) for k in shards.weight_map):
        warnings.warn(f"{hf_dir}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP layer (transformers' save_pretrained drops it); loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    want = expected_shapes(cfg)
    params: dict = {}
    used = set()
    try:
        for entry in plan(cfg):
            leaf_shape = want[entry.path][1:] if entry.stacked else want[entry.path]
            # the HF shapes this leaf needs, from splitting a zero-stride stand-in (no memory touched)
            hf_shapes = [a.shape for a in entry.rule.split(np.broadcast_to(np.zeros((), np.float32), leaf_shape))]
            layers = []
            for prefix in entry.prefixes:
                arrays = []
                for name, shape in zip(entry.rule.names(prefix), hf_shapes):
                    if name not in shards.weight_map:
                        raise KeyError(f"{hf_dir}: checkpoint is missing tensor {name!r} (needed for {entry.path})")
                    a = shards.get(name)
                    if a.shape != shape:
                        raise ValueError(f"{shards.file_of(name)}: tensor {name!r} has shape {a.shape}, but the "
                                         f"config needs {shape}")
                    arrays.append(a)
                    used.add(name)
                layers.append(entry.rule.join(arrays))
            value = np.stack(layers) if entry.stacked else layers[0]
            keep32 = entry.path.endswith(("gate/kernel", "e_score_correction_bias"))
            _set(params, entry.path, jnp.asarray(value, jnp.float32 if keep32 else dtype))
        copies = dict(_mtp_copies(cfg))
        unexpected = sorted(set(shards.weight_map) - used - set(copies))
        if unexpected:
            more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
            raise ValueError(f"{hf_dir}: unexpected tensors for this config: {unexpected[:5]}{more} "
                             f"(first in {shards.file_of(unexpected[0])})")
    finally:
        shards.close()
    return cfg, params


def hf_tensors(cfg: ModelConfig, params, dtype=None):
    """Yield (HF name, numpy array) for every tensor of the checkpoint, MTP copies of embed/head included."""
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    produced: dict[str, np.ndarray] = {}
    for entry in plan(cfg):
        leaf = np.asarray(jax.device_get(_get(params, entry.path)))
        keep32 = entry.path.endswith(("gate/kernel", "e_score_correction_bias"))
        if np_dtype is not None and not keep32:
            leaf = leaf.astype(np_dtype)
        for i, prefix in enumerate(entry.prefixes):
            parts = entry.rule.split(leaf[i] if entry.stacked else leaf)
            for name, arr in zip(entry.rule.names(prefix), parts):
                arr = np.ascontiguousarray(arr)
                if name in ("model.embed_tokens.weight", "lm_head.weight"):
                    produced[name] = arr
                yield name, arr
    for name, src in _mtp_copies(cfg):
        yield name, produced[src]


def save_hf(out_dir: str, cfg: ModelConfig, params, dtype=None, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`), atomically.

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained` (MTP layers are written at
    `model.layers.{num_hidden_layers + k}`, which transformers' causal LM ignores and its MtpLayer reads).
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        shards: list[list[tuple[str, np.ndarray]]] = [[]]
        size = 0
        for name, arr in hf_tensors(cfg, params, dtype):
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, arr))
            size += arr.nbytes
        hf_cfg = cfg.to_hf()
        if dtype is not None:
            hf_cfg["torch_dtype"] = "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        if len(shards) == 1:
            st.write(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                st.write(os.path.join(tmp, fname), shard)
                total += sum(a.nbytes for _, a in shard)
                weight_map.update({name: fname for name, _ in shard})
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
