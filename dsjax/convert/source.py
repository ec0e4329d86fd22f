"""The tensors of a Hugging Face checkpoint directory, by name, with FP8 block scales applied on the way in.

Safetensors only by default: a single `model.safetensors`, an index-sharded set (`model.safetensors.index.json`),
or several `*.safetensors` files without an index. Pickled PyTorch files (`*.bin`, `*.pt`) can run code when
unpickled, so they are refused unless the caller passes `allow_pickle=True`, and even then they are read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only.

Every file's header is read when the source opens, so a missing shard, a truncated file or an index that
names a tensor its file lacks fails before any output is written.
"""

from __future__ import annotations

import glob
import json
import os

import ml_dtypes
import numpy as np

from dsjax.convert import fp8
from dsjax.convert import safetensors_io as st
from dsjax.errors import CheckpointError

INDEX = st.INDEX
PICKLE_INDEX = "pytorch_model.bin.index.json"
FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), fp8.E4M3}


class _PickleFile:
    """One torch pickle, loaded with weights_only=True and memory-mapped, behind the SafetensorsFile interface."""

    def __init__(self, path: str):
        import torch

        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "not a safe tensor pickle"
            raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True): {e}") from None
        if not isinstance(self._sd, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(self._sd).__name__}")
        self._order = {k: i for i, k in enumerate(self._sd)}

    def keys(self):
        return list(self._sd)

    def __contains__(self, name):
        return name in self._sd

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def dtype(self, name):
        return _numpy_dtype(self._sd[name].dtype, self.path, name)

    def nbytes(self, name):
        t = self._sd[name]
        return t.numel() * t.element_size()

    def offset(self, name):
        return self._order[name]

    def read(self, name):
        import torch

        t = self._sd[name].contiguous()
        dt = self.dtype(name)
        if dt.itemsize == 1 and dt != np.dtype(np.uint8):
            return t.view(torch.uint8).numpy().view(dt).copy()
        if dt == np.dtype(ml_dtypes.bfloat16):
            return t.view(torch.int16).numpy().view(dt).copy()
        return t.numpy().copy()

    def close(self):
        self._sd = None


def _numpy_dtype(torch_dtype, path, name):
    import torch

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.uint8: np.uint8,
    }
    if torch_dtype not in table:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {torch_dtype}")
    return np.dtype(table[torch_dtype])


class HFSource:
    """Name -> tensor over an HF checkpoint directory. `read(name, dtype)` dequantizes FP8 with its scale."""

    def __init__(self, hf_dir: str, allow_pickle: bool = False):
        self.dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"{hf_dir}: not a directory")
        files, weight_map, index = self._layout(hf_dir, allow_pickle)
        self._files: dict[str, object] = {}
        self._rank = {f: i for i, f in enumerate(files)}
        try:
            for fname in files:
                self._files[fname] = self._open(fname, index, weight_map)
            if weight_map is None:
                weight_map = {k: f for f in files for k in self._files[f].keys()}
            for name, fname in weight_map.items():
                if fname not in self._files:
                    raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, which the index does not list")
                if name not in self._files[fname]:
                    raise CheckpointError(
                        f"{os.path.join(hf_dir, fname)}: tensor {name!r} is listed in {INDEX} but not in the file"
                    )
        except BaseException:
            self.close()
            raise
        self.weight_map: dict[str, str] = weight_map

    @staticmethod
    def _layout(hf_dir, allow_pickle):
        """(files in order, name -> file or None (read the headers), index path or None)."""
        for idx_name in (INDEX, PICKLE_INDEX):
            idx = os.path.join(hf_dir, idx_name)
            if os.path.exists(idx):
                if idx_name == PICKLE_INDEX and not allow_pickle:
                    raise CheckpointError(_pickle_refusal(idx))
                with open(idx) as f:
                    try:
                        weight_map = json.load(f)["weight_map"]
                    except (json.JSONDecodeError, KeyError) as e:
                        raise CheckpointError(f"{idx}: not a valid index ({e})") from None
                return sorted(set(weight_map.values())), weight_map, idx
        safe = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if safe:
            return safe, None, None
        pickles = sorted(
            os.path.basename(p) for e in ("*.bin", "*.pt", "*.pth") for p in glob.glob(os.path.join(hf_dir, e))
        )
        if pickles and not allow_pickle:
            raise CheckpointError(_pickle_refusal(os.path.join(hf_dir, pickles[0])))
        if pickles:
            return pickles, None, None
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors, {INDEX} or other *.safetensors file")

    def _open(self, fname, index, weight_map):
        path = os.path.join(self.dir, fname)
        if not os.path.exists(path):
            held = [k for k, v in (weight_map or {}).items() if v == fname]
            more = f" and {len(held) - 1} more" if len(held) > 1 else ""
            raise FileNotFoundError(f"{path}: shard listed in {index} is missing (it holds tensor {held[0]!r}{more})")
        if fname.endswith(".safetensors"):
            return st.SafetensorsFile(path)
        return _PickleFile(path)

    # ---------------------------------------------------------------- lookups
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> str:
        return os.path.join(self.dir, self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self.weight_map[name]].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._files[self.weight_map[name]].dtype(name)

    def nbytes(self, name: str) -> int:
        return self._files[self.weight_map[name]].nbytes(name)

    def location(self, name: str) -> tuple[int, int]:
        """(file rank, position in the file): reading in this order streams the checkpoint shard by shard."""
        fname = self.weight_map[name]
        return self._rank[fname], self._files[fname].offset(name)

    def is_fp8(self, name: str) -> bool:
        return self.dtype(name) == fp8.E4M3

    def read_raw(self, name: str) -> np.ndarray:
        return self._files[self.weight_map[name]].read(name)

    def read(self, name: str, dtype) -> np.ndarray:
        """The tensor in `dtype`: FP8 weights times their block scales, other floats cast (no copy when equal)."""
        a = self.read_raw(name)
        if a.dtype == fp8.E4M3:
            scale = fp8.scale_name(name)
            if scale not in self.weight_map:
                raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale!r}")
            return fp8.dequantize(a, self.read_raw(scale), dtype, name=f"{self.file_of(name)}: {name}")
        return fp8.cast(a, dtype)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pickle_refusal(path: str) -> str:
    return (
        f"{path}: pickled PyTorch checkpoints can run arbitrary code when loaded, so they are refused; convert "
        "the model to safetensors, or pass --allow_pickle (allow_pickle=True) to read it with "
        "torch.load(weights_only=True)"
    )
