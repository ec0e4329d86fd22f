"""Writing HF checkpoints: from params in memory (`save_hf`) or one unit at a time from disk (stream.py).

The layout of the output (names, shapes, dtypes, shards) is fixed before any data is produced (`export_specs`),
so safetensors headers are written up front and tensors stream straight to disk. Tensors are ordered by HF layer
like the released checkpoint; the MTP layers carry copies of the embedding and head, as the release does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.convert import fp8 as fp8_lib
from dsjax.convert import safetensors_io as st
from dsjax.convert.plan import Unit, expected_shapes, get_leaf, hf_shapes, mtp_copies, ordered_map, units


def export_specs(cfg: ModelConfig, leaf_dtypes: dict[str, np.dtype], dtype=None, fp8: bool = False):
    """The HF tensors of an export in write order: [(name, shape, dtype)], MTP copies and FP8 scales included.

    Each tensor takes `dtype` (None: its leaf's dtype), except the router (float32) and, with `fp8`, the weights
    the released format quantizes (float8_e4m3fn, followed by their float32 `_scale_inv`)."""
    shapes = expected_shapes(cfg)
    out = []
    for u in units(cfg):
        dt = np.dtype(jnp.float32) if u.router else np.dtype(dtype or leaf_dtypes[u.path])
        for name, shape in zip(u.names, hf_shapes(u, shapes[u.path])):
            if fp8 and fp8_lib.is_fp8_weight(name):
                out += [
                    (name, shape, fp8_lib.E4M3),
                    (fp8_lib.scale_name(name), fp8_lib.scale_shape(shape), np.dtype(np.float32)),
                ]
            else:
                out.append((name, shape, dt))
    seen = {name: (shape, dt) for name, shape, dt in out}
    for copy, src in mtp_copies(cfg):  # right after the rest of their MTP layer
        layer = copy[: copy.index(".", len("model.layers.")) + 1]
        last = max(i for i, (name, _, _) in enumerate(out) if name.startswith(layer))
        out.insert(last + 1, (copy, *seen[src]))
    return out


def export_tensors(cfg: ModelConfig, read_value: Callable[[Unit], np.ndarray], specs, workers: int = 1) -> Iterator:
    """(name, array) in `specs` order; `read_value(unit)` gives that unit's slice of its leaf (from memory, or
    from an Orbax checkpoint on disk). Units are produced by up to `workers` threads (in order). The MTP copies
    re-read the embedding / head when their turn comes, so nothing is held for them."""
    want = {name: dt for name, _, dt in specs}
    by_name = {n: u for u in units(cfg) for n in u.names}
    copies = dict(mtp_copies(cfg))
    groups, done = [], set()  # ("copy", name) or ("unit", unit), in specs order
    for name, _, _ in specs:
        if name in copies:
            groups.append(("copy", name))
        elif name in by_name and name not in done:
            groups.append(("unit", by_name[name]))
            done.update(by_name[name].names)

    def produce(group) -> list[tuple[str, np.ndarray]]:
        kind, x = group
        if kind == "copy":
            u = by_name[copies[x]]
            parts = dict(zip(u.names, u.rule.split(read_value(u))))
            return [(x, fp8_lib.cast(parts[copies[x]], want[x]))]
        out = []
        for name, part in zip(x.names, x.rule.split(read_value(x))):
            if want[name] == fp8_lib.E4M3:
                q, s = fp8_lib.quantize(part, name=name)
                out += [(name, q), (fp8_lib.scale_name(name), s)]
            else:
                out.append((name, fp8_lib.cast(part, want[name])))
        return out

    for items in ordered_map(produce, groups, workers):
        yield from items


def hf_tensors(cfg: ModelConfig, params, dtype=None):
    """Yield (HF name, numpy array) for every tensor of the checkpoint, MTP copies of embed/head included."""
    leaf_dtypes = {p: np.dtype(x.dtype) for p, x in _flat(params).items()}
    specs = export_specs(cfg, leaf_dtypes, dtype)
    yield from export_tensors(cfg, lambda u: np.asarray(jax.device_get(get_leaf(params, u.path)))[u.index], specs)


def _flat(params) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def hf_config_dict(cfg: ModelConfig, dtype=None, fp8: bool = False) -> dict:
    d = cfg.to_hf()
    if dtype is not None:
        d["torch_dtype"] = "bfloat16" if np.dtype(dtype) == np.dtype(jnp.bfloat16) else "float32"
    if fp8:
        d["torch_dtype"] = "bfloat16"
        d["quantization_config"] = dict(fp8_lib.QUANTIZATION_CONFIG)
    return d


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = True):
    """Yields a temporary directory next to `out_dir`, renamed to it only when the block succeeds: a failed or
    interrupted conversion leaves no half-written checkpoint at `out_dir` (and removes its temporary)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint's permissions
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))  # out of the way first, then the new one in, then delete
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf(
    tmp_dir: str,
    cfg: ModelConfig,
    tensors,
    specs,
    dtype=None,
    fp8: bool = False,
    max_shard_bytes: int = 4 << 30,
    on_tensor=None,
) -> int:
    """config.json + safetensors shards (+ index) into `tmp_dir`, streaming `tensors`; returns bytes written."""
    with open(os.path.join(tmp_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype, fp8), f, indent=2)
    writer = st.ShardedWriter(tmp_dir, specs, max_shard_bytes)
    for name, arr in tensors:
        writer.write(name, arr)
        if on_tensor is not None:
            on_tensor(name, arr.nbytes)
    writer.close()
    return writer.bytes_written


def save_hf(
    out_dir: str, cfg: ModelConfig, params, dtype=None, max_shard_bytes: int = 4 << 30, fp8: bool = False
) -> None:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`), atomically.

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained` (MTP layers are written at
    `model.layers.{num_hidden_layers + k}`, which transformers' causal LM ignores and its MtpLayer reads). With
    `fp8`, the weights the released checkpoints quantize are written as e4m3 with 128x128 block scales.
    """
    leaf_dtypes = {p: np.dtype(x.dtype) for p, x in _flat(params).items()}
    specs = export_specs(cfg, leaf_dtypes, dtype, fp8)
    host: dict[str, np.ndarray] = {}  # zero-copy views of CPU arrays; one host copy per leaf otherwise

    def read(u: Unit) -> np.ndarray:
        if u.path not in host:
            host[u.path] = np.asarray(jax.device_get(get_leaf(params, u.path)))
        return host[u.path][u.index]

    with atomic_dir(out_dir) as tmp:
        write_hf(tmp, cfg, export_tensors(cfg, read, specs), specs, dtype, fp8, max_shard_bytes)
