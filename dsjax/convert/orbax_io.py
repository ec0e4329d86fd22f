"""Orbax params checkpoints written and read one slice at a time, through TensorStore.

Orbax's own save takes whole jax.Arrays, and one stacked leaf of DeepSeek-V3 (the routed experts' gate|up of 58
layers) is 870 GB in bf16. So the converter writes the format Orbax writes itself — one zarr array per leaf inside
an OCDBT key-value store, plus the `_METADATA` tree file — a unit (one layer, or one expert of one layer) at a
time, and Orbax restores it like a checkpoint it wrote (`load_for_inference`, `ocp.StandardCheckpointer`).
Reading goes the same way in reverse: `ParamsReader.read(path, index)` pulls one slice of one leaf from any
Orbax params checkpoint, including the trainer's.

Chunks follow the target mesh: a leaf's chunk is its per-device shard under the rule table (sharding/rules.py)
with the unit axes (layer, expert) cut to 1, so every device of that mesh reads only its own chunks on restore
and every unit write covers whole chunks (no read-modify-write). Data is stored uncompressed: weights barely
compress (about 10% for bf16) and zstd would cost more CPU than the conversion itself.
"""

from __future__ import annotations

import ast
import collections
import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import tensorstore as ts

from dsjax.errors import CheckpointError
from dsjax.train.checkpoint_io import short_cause
from sharding.mesh import AXES
from sharding.rules import logical_spec, param_axes

METADATA = "_METADATA"
_KEY_TYPE_DICT = 2  # Orbax's tree key type for dict keys


def mesh_sizes(flag: str) -> dict[str, int]:
    """--mesh=fsdp:8,expert:8 -> axis sizes. The converter lays out for a mesh it does not have, so sizes are
    explicit (-1, 'the remaining devices', has no meaning here)."""
    from sharding.mesh import parse_mesh_flag

    sizes = parse_mesh_flag(flag) if flag else dict.fromkeys(AXES, 1)
    if any(v == -1 for v in sizes.values()):
        raise ValueError(f"--mesh={flag!r}: give every axis size explicitly when converting (no -1)")
    return sizes


def chunk_shape(path: str, shape: tuple[int, ...], sizes: dict[str, int], unit_axes: int) -> tuple[int, ...]:
    """The per-device shard of leaf `path` on a mesh of `sizes`, with the first `unit_axes` dims cut to 1."""
    axes = param_axes(tuple(path.split("/")), len(shape))
    spec = logical_spec(axes, SimpleNamespace(shape=sizes), shape)  # only the axis sizes are needed, no devices
    chunk = []
    for dim, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        chunk.append(max(1, dim // math.prod(sizes[a] for a in names)))
    chunk += list(shape[len(chunk) :])
    return tuple(1 if i < unit_axes else c for i, c in enumerate(chunk))


def _name(path: str) -> str:
    return ".".join(path.split("/"))  # Orbax names a leaf's array by its keys joined with dots


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


class ParamsWriter:
    """Creates every leaf's array up front, then takes slices (`write(path, index, value)`) in any order."""

    def __init__(
        self,
        directory: str,
        leaves: dict[str, tuple[tuple[int, ...], np.dtype]],
        chunks: dict[str, tuple[int, ...]],
        max_inflight_bytes: int = 1 << 30,
    ):
        self.dir = os.path.abspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self._ctx = ts.Context({"file_io_concurrency": {"limit": 16}})
        kv = {"driver": "ocdbt", "base": f"file://{self.dir}/"}
        self.leaves = leaves
        self._arrays = {}
        for path, (shape, dtype) in leaves.items():
            spec = {
                "driver": "zarr",
                "kvstore": kv,
                "path": _name(path),
                "metadata": {
                    "shape": list(shape),
                    "chunks": list(chunks[path]),
                    "dtype": _zarr_dtype(np.dtype(dtype)),
                    "compressor": None,
                },
            }
            self._arrays[path] = ts.open(spec, create=True, open=True, context=self._ctx).result()
        self.chunks = chunks
        self._pending: collections.deque = collections.deque()
        self._inflight = 0
        self._max = max_inflight_bytes
        self._init_ns = time.time_ns()

    def write(self, path: str, index: tuple[int, ...], value: np.ndarray) -> None:
        """Starts writing `value` to leaf[index]. Returns once TensorStore has copied it (so the caller may drop
        it); disk writes overlap with the caller's next read, up to `max_inflight_bytes` outstanding."""
        arr = self._arrays[path]
        want = tuple(arr.shape[len(index) :])
        if tuple(value.shape) != want:
            raise ValueError(f"{self.dir}: slice {index} of {path} needs shape {want}, got {tuple(value.shape)}")
        fut = arr[index].write(value)
        fut.copy.result()
        self._pending.append((fut.commit, value.nbytes))
        self._inflight += value.nbytes
        while self._inflight > self._max:
            self._drain_one()

    def _drain_one(self):
        commit, n = self._pending.popleft()
        commit.result()
        self._inflight -= n

    def abort(self) -> None:
        """Waits out the writes in flight (ignoring their errors), so a failed conversion can delete its directory
        without TensorStore recreating files in it afterwards."""
        while self._pending:
            try:
                self._drain_one()
            except Exception:  # noqa: BLE001 - we are already failing; the first error is the one to report
                pass

    def close(self) -> None:
        """Waits for every write, then writes the tree metadata that makes the directory an Orbax checkpoint."""
        while self._pending:
            self._drain_one()
        tree = {}
        for path in self.leaves:
            keys = path.split("/")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": _KEY_TYPE_DICT} for k in keys],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": list(self.chunks[path]),
                },
            }
        meta = {
            "tree_metadata": tree,
            "use_ocdbt": True,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }
        with open(os.path.join(self.dir, METADATA), "w") as f:
            json.dump(meta, f)
        with open(os.path.join(self.dir, "_CHECKPOINT_METADATA"), "w") as f:
            json.dump(
                {
                    "item_handlers": None,
                    "metrics": {},
                    "performance_metrics": {},
                    "init_timestamp_nsecs": self._init_ns,
                    "commit_timestamp_nsecs": time.time_ns(),
                    "custom_metadata": {"written_by": "dsjax.convert"},
                },
                f,
            )


class ParamsReader:
    """Slices of the leaves of an Orbax params directory (ours, or the trainer's `<step>/params`)."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        meta_path = os.path.join(self.dir, METADATA)
        if not os.path.exists(meta_path):
            raise CheckpointError(f"{self.dir}: no {METADATA}; not an Orbax params checkpoint")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            tree_metadata = meta["tree_metadata"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # empty, truncated or not Orbax's
            raise CheckpointError(f"{meta_path}: not a readable Orbax tree metadata file ({short_cause(e)})") from None
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._ocdbt = os.path.exists(os.path.join(self.dir, "manifest.ocdbt"))
        self.paths = {}
        for key, entry in tree_metadata.items():
            keys = [str(k["key"]) for k in entry.get("key_metadata", [])] or [str(k) for k in ast.literal_eval(key)]
            self.paths["/".join(keys)] = ".".join(keys)
        self._ctx = ts.Context({"file_io_concurrency": {"limit": 16}})
        self._open: dict[str, ts.TensorStore] = {}

    def array(self, path: str) -> ts.TensorStore:
        if path not in self._open:
            if path not in self.paths:
                raise KeyError(f"{self.dir}: checkpoint has no parameter {path!r}")
            name = self.paths[path]
            kv = (
                {"driver": "ocdbt", "base": f"file://{self.dir}/"}
                if self._ocdbt
                else {"driver": "file", "path": os.path.join(self.dir, name) + "/"}
            )
            spec = {"driver": self._driver, "kvstore": kv, "open": True}
            if self._ocdbt:
                spec["path"] = name
            try:
                self._open[path] = ts.open(spec, context=self._ctx).result()
            except ValueError as e:  # TensorStore: missing or unreadable array metadata
                raise CheckpointError(f"{self.dir}: cannot open parameter {path!r} ({short_cause(e)})") from None
        return self._open[path]

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def dtype(self, path: str) -> np.dtype:
        return np.dtype(self.array(path).dtype.numpy_dtype)

    def read(self, path: str, index: tuple[int, ...] = ()) -> np.ndarray:
        """Slice `index` (leading axes) of leaf `path`, in its stored dtype; CheckpointError (one line) when the
        data cannot be read or decoded (a truncated, missing or damaged file)."""
        try:
            return np.asarray(self.array(path)[index].read().result())
        except ValueError as e:
            raise CheckpointError(
                f"{self.dir}: cannot read parameter {path!r}{list(index)} ({short_cause(e)})"
            ) from None
