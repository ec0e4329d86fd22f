"""A small, strict safetensors reader/writer on NumPy (bf16 and FP8 through ml_dtypes), memory-mapped.

Our own so that every error names the file and the tensor, reads are lazy (one tensor at a time, for streaming
conversion), and FP8 e4m3 works without torch. Format: u64 little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
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
            raise SafetensorsError(f"{self.path}: header length {n} does not fit in the {size}-byte file "
                                   "(truncated or not a safetensors file)")
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
                raise SafetensorsError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape "
                                       f"{e['shape']} {e['dtype']} ({want} expected)")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: tensor {name!r} ends at byte {self._base + end} but the "
                                       f"file has {size} bytes (truncated file)")
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
        arr = np.frombuffer(self._mm, dtype=DTYPES[e["dtype"]], count=(end - begin) // DTYPES[e["dtype"]].itemsize,
                            offset=self._base + begin)
        return arr.reshape(e["shape"])

    def close(self):
        # Arrays handed out by get() are views of the map; dropping our reference (not mmap.close()) keeps
        # them valid, and the map is unmapped once the last view is gone.
        self._mm = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write (name, array) pairs to `path`; returns bytes written. Arrays are consumed one at a time."""
    items = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, a in items:
        if a.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {a.dtype} that safetensors cannot store")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, a in items:
            f.write(a.tobytes())
    return 8 + len(raw) + offset


def iter_tensors(f: SafetensorsFile) -> Iterator[tuple[str, np.ndarray]]:
    for name in f.keys():
        yield name, f.get(name)
