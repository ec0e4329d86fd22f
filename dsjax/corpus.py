"""Pretraining corpora: data spec -> Corpus (text documents under one global index) -> train/validation split.

Apart from the grain pipeline in dsjax/data.py (which re-exports these names) because finding, reading and
splitting documents needs neither grain nor a tokenizer.

  corpus = build_corpus("stdlib,data/*.jsonl")   # len(corpus) documents; corpus.read(i) -> str
  train_ids, eval_ids = split_documents(corpus, eval_fraction=0.02)

Data spec (`--data`, `--eval_data`), comma-separated items; globs are expanded recursively and sorted:
  "stdlib"                    the Python standard library's .py files: sysconfig.get_paths()["stdlib"] minus
                              site-packages, test suites kept (~1,800 files, ~30 MB on CPython 3.11)
  "path/*.txt", "text:GLOB"   one file = one document; a directory means every file under it
  "x.jsonl", "jsonl:GLOB[:F]" one JSON object per line, text in field F (default "text")
  "x.array_record*", "array_record:GLOB[:F]"  records are UTF-8 text, or JSON objects when F is given
Validation (split_documents): a document validates when a stable hash of its key (path below the glob's
fixed leading directories, plus the record index in JSONL/ArrayRecord) is in the lowest `eval_fraction`,
so moving the data or adding files never flips another document. An empty split gets the document with the
smallest hash; a 1-document corpus serves both. make_datasets uses this split unless given an `eval_spec`; then
all of `spec` trains and all of `eval_spec` validates.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig

import numpy as np

__all__ = ["Corpus", "build_corpus", "split_documents"]


def _hash_str(key: str) -> int:
    # blake2b rather than hash(): Python's str hash is salted per process.
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _mix(base: int, index: np.ndarray) -> np.ndarray:
    """splitmix64 of base + index, vectorised, so million-record files hash in milliseconds."""
    with np.errstate(over="ignore"):
        z = np.uint64(base) + (index.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class _Files:
    """One file = one document."""

    def __init__(self, paths: list[str], root: str):
        self.paths, self.keys = paths, [os.path.relpath(p, root) for p in paths]

    def __len__(self):
        return len(self.paths)

    def read(self, i: int) -> str:
        with open(self.paths[i], "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def hashes(self) -> np.ndarray:
        return np.array([_hash_str(k) for k in self.keys], dtype=np.uint64)


class _Records:
    key: str

    def hashes(self) -> np.ndarray:
        return _mix(_hash_str(self.key), np.arange(len(self)))


class _Jsonl(_Records):
    """One JSON object per line. Every line is parsed once up front so a bad one fails at startup."""

    def __init__(self, path: str, field: str | None, key: str, flag: str):
        field = field or "text"
        self.path, self.field, self.key = path, field, key
        offsets, lengths, offset = [], [], 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{flag}: {path}:{lineno}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: invalid JSON ({e})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(field), str):
                        raise ValueError(f"{where}: line has no string field {field!r}")
                    if record[field]:
                        offsets.append(offset)
                        lengths.append(len(line))
                offset += len(line)
        self.offsets, self.lengths = np.array(offsets, np.int64), np.array(lengths, np.int64)

    def __len__(self):
        return len(self.offsets)

    def read(self, i: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return json.loads(f.read(int(self.lengths[i])))[self.field]


class _ArrayRecord(_Records):
    """Records are UTF-8 text, or JSON objects with the text in `field` when a field is given."""

    def __init__(self, path: str, field: str | None, key: str, flag: str):
        try:
            from array_record.python.array_record_data_source import ArrayRecordDataSource
        except ImportError as e:
            raise ImportError(f"{flag}: reading {path} needs `pip install array-record`") from e
        self.path, self.field, self.key, self.flag = path, field, key, flag
        self.source = ArrayRecordDataSource([path])

    def __len__(self):
        return len(self.source)

    def read(self, i: int) -> str:
        record = self.source[i]
        if self.field is None:
            return record.decode("utf-8", errors="replace")
        obj = json.loads(record)
        if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
            raise ValueError(f"{self.flag}: {self.path} record {i} has no string field {self.field!r}")
        return obj[self.field]


class Corpus:
    """Documents of several sources under one global index."""

    def __init__(self, sources: list):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self):
        return int(self.starts[-1])

    def read(self, index: int) -> str:
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[s].read(index - int(self.starts[s]))

    def hashes(self) -> np.ndarray:
        return np.concatenate([s.hashes() for s in self.sources] + [np.zeros(0, np.uint64)])


def _stdlib() -> _Files:
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return _Files(sorted(paths), root)


def _expand(pattern: str, flag: str) -> tuple[list[str], str]:
    """Sorted files matching a glob (or under a directory) and the glob's directory before any wildcard."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        what = "glob matches no files" if glob.has_magic(pattern) else "no such file"
        raise FileNotFoundError(f"{flag}: {what}: {pattern!r}")
    parts = pattern.split(os.sep)
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return paths, os.sep.join(parts[:fixed]) or "."


def build_corpus(spec: str, flag: str = "--data") -> Corpus:
    """Parses a data spec (module docstring) into a Corpus; errors name `flag` and the offending path."""
    sources = []
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        if item == "stdlib":
            sources.append(_stdlib())
            continue
        kind, _, rest = item.partition(":")
        field = None
        if kind in ("jsonl", "array_record") and ":" in rest:
            rest, field = rest.rsplit(":", 1)
        elif kind not in ("text", "jsonl", "array_record"):
            name = os.path.basename(item)
            kind = "jsonl" if name.endswith(".jsonl") else "array_record" if ".array_record" in name else "text"
            rest = item
        paths, root = _expand(rest, flag)
        if kind == "text":
            sources.append(_Files([p for p in paths if os.path.getsize(p) > 0], root))
        else:
            cls = _Jsonl if kind == "jsonl" else _ArrayRecord
            sources += [cls(p, field, os.path.relpath(p, root), flag) for p in paths]
    corpus = Corpus(sources)
    if len(corpus) == 0:
        raise ValueError(f"{flag}={spec!r}: the corpus is empty (no document has any text)")
    return corpus


def split_documents(corpus: Corpus, eval_fraction: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices by stable hash; validation is never empty."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    h = corpus.hashes()
    if len(h) == 1:
        logging.warning("the corpus has a single document; it is used for both training and validation")
        return np.zeros(1, np.int64), np.zeros(1, np.int64)
    is_eval = (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction
    if not is_eval.any():
        is_eval[np.argmin(h)] = True
    if is_eval.all():
        is_eval[np.argmax(h)] = False
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
