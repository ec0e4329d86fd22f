"""A small, strict safetensors reader/writer on NumPy (bf16 and FP8 through ml_dtypes).

Our own so that every error names the file and the tensor, reads are lazy (one tensor at a time: `get` is a view
of a memory map, `read` a positional read into a fresh buffer, for streaming conversion), writes can stream
into shards whose layout is planned up front (`ShardedWriter`), and FP8 e4m3 works without torch. Format: u64
little-endian header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the raw bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from dsjax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
INDEX = "model.safetensors.index.json"


class SafetensorsError(UserError):
    pass


class SafetensorsFile:
    """Lazy reader: `keys()`, `shape(name)`, `dtype(name)`, `get(name)` (a read-only mmap view)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: file not found") from None
        size = os.fstat(self._f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", self._f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{self.path}: header length {n} does not fit in the {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._entries = header
        data_size = size - self._base
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != want:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                    f"{e['shape']} {e['dtype']} ({want} expected)"
                )
            if end > data_size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ends at byte {self._base + end} but the "
                    f"file has {size} bytes (truncated file)"
                )
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self._entries[name]["data_offsets"]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        if name not in self._entries:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
        e = self._entries[name]
        begin, end = e["data_offsets"]
        arr = np.frombuffer(
            self._mm,
            dtype=DTYPES[e["dtype"]],
            count=(end - begin) // DTYPES[e["dtype"]].itemsize,
            offset=self._base + begin,
        )
        return arr.reshape(e["shape"])

    def offset(self, name: str) -> int:
        """Byte position of the tensor's data in the file (streaming reads go in file order)."""
        return self._base + self._entries[name]["data_offsets"][0]

    def read(self, name: str) -> np.ndarray:
        """The tensor copied into a fresh array (a positional read, no mmap): when it is dropped, its memory is
        gone, so a streaming converter's resident set stays one tensor, not every page of every file it read."""
        if name not in self._entries:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r}")
        e = self._entries[name]
        out = np.empty(e["shape"], DTYPES[e["dtype"]])
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self.offset(name), 0
        while done < len(view):
            n = _pread_into(self._f, view[done:], pos + done)
            if not n:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r}: file ended after {done} of {len(view)} bytes (truncated file)"
                )
            done += n
        return out

    def close(self):
        # Arrays handed out by get() are views of the map; dropping our reference (not mmap.close()) keeps
        # them valid, and the map is unmapped once the last view is gone.
        self._mm = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SEEK_LOCK = threading.Lock()


def _pread_into(f, view: memoryview, pos: int) -> int:
    """Positional read into `view`: thread-safe, so converter threads can read one file at once."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [view], pos)
    with _SEEK_LOCK:
        f.seek(pos)
        return f.readinto(view)


def _header(entries: list[tuple[str, np.dtype, tuple[int, ...]]], metadata: dict[str, str] | None, path: str) -> bytes:
    """The length-prefixed JSON header for tensors laid out back to back in `entries` order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype} that safetensors cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _raw(a: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write (name, array) pairs to `path`; returns bytes written."""
    items = [(name, np.asarray(a)) for name, a in tensors]
    head = _header([(n, a.dtype, a.shape) for n, a in items], metadata, path)
    with open(path, "wb") as f:
        f.write(head)
        for _, a in items:
            f.write(_raw(a))
    return len(head) + sum(a.nbytes for _, a in items)


class ShardedWriter:
    """Streams tensors into (sharded) safetensors files whose layout is fixed before any data arrives.

    The names, shapes and dtypes come first (`specs`, in write order), so every file's header is known up front and
    each tensor goes straight to disk when `write` is called: nothing is held back to assemble a shard. Past
    `max_shard_bytes` the files are `model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`
    (what transformers and the released checkpoints use), else one `model.safetensors`.
    """

    def __init__(
        self,
        directory: str,
        specs: list[tuple[str, tuple[int, ...], np.dtype]],
        max_shard_bytes: int = 4 << 30,
        metadata: dict[str, str] | None = None,
    ):
        self.dir, self._metadata = directory, metadata
        self._shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if self._shards[-1] and size + n > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += n
        k = len(self._shards)
        self.files = (
            ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        )
        self._order = [(i, spec) for i, shard in enumerate(self._shards) for spec in shard]
        self._next = 0
        self._f = None
        self.bytes_written = 0

    def write(self, name: str, a: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise SafetensorsError(f"{self.dir}: tensor {name!r} written after the last planned tensor")
        i, (want, shape, dtype) = self._order[self._next]
        path = os.path.join(self.dir, self.files[i])
        if name != want or tuple(a.shape) != shape or a.dtype != dtype:
            raise SafetensorsError(
                f"{path}: expected tensor {want!r} {shape} {dtype} next, got {name!r} {tuple(a.shape)} {a.dtype}"
            )
        if self._f is None:
            self._f = open(path, "wb")
            self._f.write(_header([(n, d, s) for n, s, d in self._shards[i]], self._metadata, path))
        self._f.write(_raw(a))
        self.bytes_written += a.nbytes
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != i:
            self._f.close()
            self._f = None

    def close(self) -> None:
        """Checks that every planned tensor arrived; writes the index of a sharded checkpoint."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._next != len(self._order):
            raise SafetensorsError(
                f"{self.dir}: only {self._next} of {len(self._order)} planned tensors were "
                f"written (next: {self._order[self._next][1][0]!r})"
            )
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, (name, _, _) in self._order}
            total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, (_, s, d) in self._order)
            with open(os.path.join(self.dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def iter_tensors(f: SafetensorsFile) -> Iterator[tuple[str, np.ndarray]]:
    for name in f.keys():
        yield name, f.get(name)
