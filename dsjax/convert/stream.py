"""Streaming conversion between HF safetensors directories and Orbax checkpoints, at DeepSeek-V3 scale.

  hf_to_orbax(hf_dir, out, dtype="bfloat16", mesh="fsdp:8,expert:8")   # the released 641 GB FP8 checkpoint in
  orbax_to_hf(checkpoint, out, fp8=True)                              # a trained model back to PyTorch

Memory: `workers` units at a time (plan.Unit: one layer of a leaf, or one routed expert of it; the threads overlap
reads, FP8 scaling and transposes, which release the GIL), read with positional reads rather than mmap so pages do
not pile up in the resident set, plus TensorStore's bounded write-behind (`max_inflight_bytes`). For DeepSeek-V3
the largest unit is the embedding / lm_head (129280 x 7168: 1.85 GB in bf16, 3.7 GB in float32); an expert's
gate|up is 58 MB. Units are visited in the order their tensors sit in the input files, so an HF checkpoint is
read shard by shard, front to back.

The Orbax output is a checkpoint step directory: `<out>/params` (see orbax_io.py; chunked for `mesh`) and
`<out>/config/metadata` (the model config, as the trainer writes it), which `load_for_inference(out)`,
`experiments/generate.py --checkpoint=out` and `experiments/grpo.py --config.init_checkpoint=out` read.
Both directions write into a temporary directory next to `out` and rename it at the end, and refuse an `out`
that is, contains or lies inside their input (before anything is written). Orbax -> HF checks every leaf against
the params fingerprints a trainer's step records (`LeafVerifier`): a corrupt step leaves no output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from dsjax.config import ModelConfig
from dsjax.convert import export, hf, plan
from dsjax.convert import fp8 as fp8_lib
from dsjax.convert.orbax_io import ParamsReader, ParamsWriter, chunk_shape, mesh_sizes
from dsjax.convert.source import HFSource
from dsjax.errors import CheckpointError, ConfigError
from dsjax.train.fingerprint import StreamingFingerprint

# Small files that travel with the weights (generate.py finds tokenizer.json next to its checkpoint).
WORKERS = min(4, os.cpu_count() or 1)  # units converted at once (threads; NumPy releases the GIL)
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


class Progress:
    """Bytes done / total with rate and ETA, printed at most every `every` seconds (and once at the end)."""

    def __init__(self, total: int, label: str, log: Callable[[str], None] | None = None, every: float = 10.0):
        self.total, self.label, self.every = max(total, 1), label, every
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.done = 0
        self.start = self._last = time.perf_counter()

    def update(self, nbytes: int, where: str = "") -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(
                f"{self.label}: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB "
                f"({100 * self.done / self.total:.1f}%), {rate / 1e9:.3f} GB/s, ETA {_hms(eta)}"
                + (f"  [{where}]" if where else "")
            )

    def finish(self) -> dict:
        secs = time.perf_counter() - self.start
        stats = {"bytes": self.done, "seconds": secs, "gb_per_s": self.done / 1e9 / max(secs, 1e-9)}
        self.log(f"{self.label}: done, {self.done / 1e9:.2f} GB in {_hms(secs)} ({stats['gb_per_s']:.3f} GB/s)")
        return stats


def _hms(s: float) -> str:
    if not np.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _copy_side_files(src_dirs, dst):
    for d in src_dirs:
        for name in SIDE_FILES:
            path = os.path.join(d, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(dst, name)):
                shutil.copy2(path, os.path.join(dst, name))


def _unit_bytes(source: HFSource, unit: plan.Unit) -> int:
    n = 0
    for name in unit.names:
        n += source.nbytes(name)
        if source.is_fp8(name):
            n += source.nbytes(fp8_lib.scale_name(name))
    return n


def refuse_overlap(out: str, flag: str, source: str) -> None:
    """ConfigError when `out` is `source`, lies inside it or contains it (real paths, so symlinks count): the
    output is built next to `out` and renamed over it, so with --overwrite the input would be deleted."""
    o, s = os.path.realpath(out), os.path.realpath(source)
    common = os.path.commonpath([o, s])
    if common not in (o, s):
        return
    how = "is" if o == s else "lies inside" if common == s else "contains"
    raise ConfigError(
        f"--out={out} {how} the input {flag}={source}; give an --out outside it (nothing was written or deleted)"
    )


def hf_to_orbax(
    hf_dir: str,
    out: str,
    dtype: str = "bfloat16",
    mesh: str = "",
    allow_pickle: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    every: float = 10.0,
    max_inflight_bytes: int = 256 << 20,
    workers: int = WORKERS,
) -> dict:
    """HF directory (bf16 / float32 / FP8 with block scales; sharded or not) -> Orbax checkpoint at `out`.

    `dtype` is the stored parameter dtype (bfloat16 or float32; the router stays float32); `mesh` the layout the
    chunks follow (`fsdp:8,expert:8`; empty = one device). Returns stats: bytes read, seconds, GB/s.
    """
    refuse_overlap(out, "--hf_dir", hf_dir)
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    sizes = mesh_sizes(mesh)
    cfg = ModelConfig.from_hf(hf_dir, dtype=dtype, param_dtype=dtype)
    with HFSource(hf_dir, allow_pickle) as source:
        cfg = hf.resolve_mtp(cfg, source)
        todo = hf.check_source(cfg, source)  # every header checked before anything is written
        todo.sort(key=lambda u: source.location(u.names[0]))  # shard by shard, front to back
        specs = plan.leaf_specs(cfg)
        unit_axes = {u.path: len(u.index) for u in todo}
        leaves = {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in specs.items()}
        chunks = {p: chunk_shape(p, leaves[p][0], sizes, unit_axes[p]) for p in leaves}
        progress = Progress(sum(_unit_bytes(source, u) for u in todo), "hf->orbax", log, every)
        with export.atomic_dir(out, overwrite) as tmp:
            os.makedirs(os.path.join(tmp, "config"))
            writer = ParamsWriter(os.path.join(tmp, "params"), leaves, chunks, max_inflight_bytes)
            values = plan.ordered_map(lambda u: hf.read_unit(source, u, leaves[u.path][1]), todo, workers)
            try:
                for u, value in zip(todo, values):
                    writer.write(u.path, u.index, value)
                    progress.update(_unit_bytes(source, u), os.path.basename(source.file_of(u.names[0])))
                writer.close()
            except BaseException:
                values.close()  # stop the readers and
                writer.abort()  # let in-flight writes land before the temporary directory is removed
                raise
            _write_config(tmp, cfg, {"source": os.path.abspath(hf_dir), "dtype": dtype, "mesh": sizes})
            _copy_side_files([hf_dir], tmp)
            stats = progress.finish()
    return {**stats, "config": cfg}


def _write_config(step_dir, cfg, conversion):
    from dsjax.train.checkpoint_io import model_config_dict

    with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
        json.dump({"model": model_config_dict(cfg), "conversion": conversion}, f, indent=2)


def open_orbax(checkpoint: str) -> tuple[str, ModelConfig, ParamsReader]:
    """(step dir, config, reader) for a converted checkpoint, a pretraining workdir or one of its step dirs."""
    from dsjax.train.checkpoint_io import model_config_from_dict, read_step_config, step_dir

    step = step_dir(checkpoint)
    cfg = model_config_from_dict(read_step_config(step)["model"])
    reader = ParamsReader(os.path.join(step, "params"))
    for path, spec in plan.leaf_specs(cfg).items():
        if path not in reader.paths:
            raise CheckpointError(f"{step}/params: missing parameter {path!r}, which its config needs")
        if reader.shape(path) != tuple(spec.shape):
            raise CheckpointError(
                f"{step}/params: parameter {path!r} has shape {reader.shape(path)}, but its "
                f"config needs {tuple(spec.shape)}"
            )
    return step, cfg, reader


def orbax_to_hf(
    checkpoint: str,
    out: str,
    dtype: str = "bfloat16",
    fp8: bool = False,
    max_shard_bytes: int = 4 << 30,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    every: float = 10.0,
    workers: int = WORKERS,
) -> dict:
    """Orbax checkpoint (converted, or a pretraining workdir / step) -> HF safetensors directory at `out`.

    Reads one unit at a time from disk; with `fp8`, quantizes the weights the released format stores in FP8
    (128x128 block scales, `quantization_config` in config.json). Returns stats: bytes written, seconds, GB/s.
    """
    refuse_overlap(out, "--checkpoint", checkpoint)
    step, cfg, reader = open_orbax(checkpoint)
    verifier = LeafVerifier(step, reader)
    leaf_dtypes = {p: reader.dtype(p) for p in reader.paths}
    specs = export.export_specs(cfg, leaf_dtypes, np.dtype(_np_dtype(dtype)), fp8)
    total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
    progress = Progress(total, "orbax->hf", log, every)
    tensors = export.export_tensors(cfg, verifier.read, specs, workers)
    with export.atomic_dir(out, overwrite) as tmp:
        try:
            export.write_hf(
                tmp,
                cfg,
                tensors,
                specs,
                _np_dtype(dtype),
                fp8,
                max_shard_bytes,
                on_tensor=lambda name, n: progress.update(n, name),
            )
        finally:
            tensors.close()  # on failure, stop the reader threads
        parent = os.path.dirname(step)  # a trainer's <workdir>/checkpoints/<step>: side files live in the workdir
        _copy_side_files([step] + ([os.path.dirname(parent)] if os.path.basename(parent) == "checkpoints" else []), tmp)
        stats = progress.finish()
    return {**stats, "config": cfg}


class LeafVerifier:
    """Reads units for the HF export and checks each leaf, once all its units have streamed by, against the
    params fingerprint the trainer saved with the step (dsjax/train/fingerprint.py). A step without them (what
    `--to=orbax` writes, or one saved before fingerprints) is read unchecked. Thread-safe: units arrive from the
    export's worker threads in any order."""

    def __init__(self, step: str, reader: ParamsReader):
        from dsjax.train.checkpoint_io import params_fingerprints

        self.step, self.reader = step, reader
        self.expected = params_fingerprints(step) or {}
        self._sums: dict[str, StreamingFingerprint] = {}
        self._seen: set = set()
        self._lock = threading.Lock()

    def read(self, unit: plan.Unit) -> np.ndarray:
        value = self.reader.read(unit.path, unit.index)
        want = self.expected.get(unit.path)
        if want is None:
            return value
        with self._lock:
            if (unit.path, unit.index) in self._seen:  # the MTP layers' copies re-read the embedding and head
                return value
            self._seen.add((unit.path, unit.index))
            if unit.path not in self._sums:
                self._sums[unit.path] = StreamingFingerprint(self.reader.shape(unit.path), self.reader.dtype(unit.path))
            acc = self._sums[unit.path]
        acc.add(value, _flat_offset(unit.index, acc.shape))
        if acc.complete and acc.value() != list(want):
            raise CheckpointError(f"checkpoint {self.step} is corrupt: params/{unit.path} does not match its checksum")
        return value


def _flat_offset(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Row-major flat index of element index + (0, ...) of an array of `shape` (Python ints: no overflow)."""
    offset = 0
    for i, dim in enumerate(shape):
        offset = offset * dim + (int(index[i]) if i < len(index) else 0)
    return offset


def _np_dtype(name: str):
    import jax.numpy as jnp

    if name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {name!r}")
    return np.dtype(jnp.bfloat16 if name == "bfloat16" else jnp.float32)
