"""Pretraining data on grain: text/JSONL/ArrayRecord sources -> tokenize -> pack -> batch.

  train_iter, eval_batches, info = make_datasets("stdlib", tokenizer=None, seq_len=T, batch_size=B, seed=0)
  batch = next(train_iter)             # infinite; train_iter.get_state() / set_state(state)
  batches = eval_batches(num_batches)  # the same fixed list of batches on every call

Data spec (`--data`, `--eval_data`) and the validation split: dsjax/corpus.py (re-exported here).

Packing: a document is [bos] + ids + [eos] (bos when `add_bos`, so every byte is a target and bits per byte
covers all text); documents are concatenated into rows of T + 1 tokens. A document that overflows continues
in the next row as a new segment starting with the previous row's last token, so each next-token pair of a
document is trained exactly once. Positions restart at 0 per segment; only a finite stream's last row pads.

Batch (numpy; B per host):
  inputs, targets  [B, T] int32    row[:-1], row[1:]
  segment_ids      [B, T] int32    1-based segment of each input token in its row; 0 = padding
  positions        [B, T] int32    position of each input token in its segment
  loss_mask        [B, T] float32  1 where the target is the next token of the same segment, else 0
  num_bytes        [B]    int32    UTF-8 bytes of the masked targets (tokenizer.token_bytes(); specials 0)
bits per byte = sum(CE nats * loss_mask) / ln(2) / sum(num_bytes).

Checkpointing: `train_iter` is a grain DatasetIterator (so grain.checkpoint.CheckpointHandler works);
get_state() is a JSON-serialisable {"parent": {"next_index": n}, "offset": k} (documents taken by the packer,
token offset into the one being split); set_state() on a fresh iterator built with the same arguments resumes
bit-exactly. Sharding: host `shard_index` of `shard_count` (default jax.process_index()/process_count()) takes
every shard_count-th document of each split; training reshuffles each epoch from `seed`. eval_batches(n) pads
with empty rows so every host returns exactly n batches and multi-host eval stays in lockstep.
"""

from __future__ import annotations

import dataclasses
import itertools

import grain
import numpy as np

from dsjax.corpus import Corpus, build_corpus, split_documents
from dsjax.tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["Corpus", "DataInfo", "PackIterDataset", "build_corpus", "make_batch", "make_datasets", "split_documents"]
_ROW_KEYS = ("tokens", "segment_ids", "positions")  # one packed row, each [seq_len + 1] int32


def _tokenize_fn(corpus: Corpus, tokenizer, add_bos: bool):
    """Document index -> int32 [bos] + ids + [eos]; a document without ids gives an empty array."""
    encode = getattr(tokenizer, "encode_array", tokenizer.encode)
    head = np.array([tokenizer.bos_id] if add_bos else [], np.int32)
    tail = np.array([tokenizer.eos_id], np.int32)

    def tokenize(index) -> np.ndarray:
        ids = np.asarray(encode(corpus.read(int(index))), dtype=np.int32)
        return np.concatenate([head, ids, tail]) if ids.size else ids

    return tokenize


class PackIterDataset(grain.IterDataset):
    """Packs 1-D token arrays into rows {"tokens", "segment_ids", "positions"} of `row_len` (docstring above).

    Not grain's ConcatThenSplitIterDataset: in grain 0.2.18 its state breaks on a JSON round trip (the (-1, -1)
    "no remainder" tuple returns as a list and is taken for a remainder), and it drops the pair across rows.
    """

    def __init__(self, parent: grain.IterDataset, row_len: int, pad_id: int, max_empty: int | None = None):
        super().__init__(parent)
        self.row_len, self.pad_id, self.max_empty = row_len, pad_id, max_empty

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self.row_len, self.pad_id, self.max_empty)


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, row_len: int, pad_id: int, max_empty: int | None):
        super().__init__(parent)
        self.row_len, self.pad_id, self.max_empty = row_len, pad_id, max_empty
        self._doc, self._doc_state, self._offset = None, None, 0

    def __next__(self):
        n_row = self.row_len
        tokens, (segment_ids, positions) = np.full(n_row, self.pad_id, np.int32), np.zeros((2, n_row), np.int32)
        filled, segment, empty_run = 0, 0, 0
        while filled < n_row:
            if self._doc is None:
                state = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    break
                if len(doc) == 0:
                    empty_run += 1
                    # An infinite repeat of text-free documents would otherwise spin forever.
                    if self.max_empty is not None and empty_run > self.max_empty:
                        raise ValueError("the corpus is empty: a whole epoch of documents produced no tokens")
                    continue
                self._doc, self._doc_state, self._offset = doc, state, 0
            n = min(n_row - filled, len(self._doc) - self._offset)
            segment += 1
            tokens[filled : filled + n] = self._doc[self._offset : self._offset + n]
            segment_ids[filled : filled + n] = segment
            positions[filled : filled + n] = np.arange(n)
            filled += n
            if self._offset + n == len(self._doc):
                self._doc, self._offset = None, 0
            else:
                # The row's last token is only a target here; it opens the continuation as an input.
                self._offset += n - 1
        if filled == 0:
            raise StopIteration
        return dict(zip(_ROW_KEYS, (tokens, segment_ids, positions)))

    def get_state(self):  # the offset is 0 whenever no document is in progress
        return {"parent": self._parent.get_state() if self._doc is None else self._doc_state, "offset": self._offset}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._doc, self._doc_state, self._offset = None, None, 0
        if state["offset"] > 0:
            self._doc_state, self._doc, self._offset = state["parent"], next(self._parent), state["offset"]


def make_batch(
    tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray, token_bytes: np.ndarray
) -> dict[str, np.ndarray]:
    """Packed rows [B, T+1] -> the batch dict of the module docstring."""
    tokens, segment_ids, positions = (np.asarray(x, np.int32) for x in (tokens, segment_ids, positions))
    seg_in, targets = segment_ids[:, :-1], tokens[:, 1:]
    mask = (seg_in == segment_ids[:, 1:]) & (seg_in > 0)
    num_bytes = np.where(mask, token_bytes[targets], 0).sum(axis=1, dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": targets,
        "segment_ids": seg_in,
        "positions": positions[:, :-1],
        "loss_mask": mask.astype(np.float32),
        "num_bytes": num_bytes,
    }


@dataclasses.dataclass(frozen=True)
class DataInfo:
    spec: str
    eval_spec: str | None
    num_train_docs: int  # all hosts
    num_eval_docs: int  # all hosts
    shard_index: int
    shard_count: int
    seq_len: int
    batch_size: int  # per host
    vocab_size: int
    add_bos: bool


def _eval_batches_fn(rows: grain.IterDataset, row_len: int, pad_id: int, b: int, batch_fn):
    """Validation rows are packed lazily, once, and cached, so every call returns the same batches."""
    it, packed, cache = iter(rows), [], {}
    empty = dict(zip(_ROW_KEYS, (np.full(row_len, pad_id, np.int32), *np.zeros((2, row_len), np.int32))))

    def eval_batches(num_batches: int | None = None) -> list[dict[str, np.ndarray]]:
        """`num_batches` batches (padded with empty rows); None: all of this host's validation rows."""
        if num_batches not in cache:
            want = None if num_batches is None else max(0, num_batches * b - len(packed))
            packed.extend(itertools.islice(it, want))
            n = num_batches if num_batches is not None else max(1, -(-len(packed) // b))
            padded = packed[: n * b] + [empty] * max(0, n * b - len(packed))
            cache[num_batches] = [batch_fn(padded[i * b : (i + 1) * b]) for i in range(n)]
        return cache[num_batches]

    return eval_batches


def make_datasets(
    spec: str = "stdlib",
    tokenizer=None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    eval_spec: str | None = None,
    eval_fraction: float = 0.02,
    add_bos: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 0,
):
    """Returns (train_iter, eval_batches, info); see the module docstring.

    tokenizer: a tokenizer object, a `load_tokenizer` spec, or None (bytes). num_threads: grain threads reading
    and tokenizing ahead of the packer; 0 is fastest unless reads wait on slow storage (the work holds the GIL).
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = ByteTokenizer() if tokenizer is None else load_tokenizer(tokenizer)
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")

    corpus = build_corpus(spec, "--data")
    eval_corpus = build_corpus(eval_spec, "--eval_data") if eval_spec else corpus
    train_ids, eval_ids = (
        (np.arange(len(corpus)), np.arange(len(eval_corpus))) if eval_spec else split_documents(corpus, eval_fraction)
    )
    host_train = train_ids[shard_index::shard_count]
    if len(host_train) == 0:
        raise ValueError(f"--data={spec!r}: {len(train_ids)} training documents cannot feed {shard_count} hosts")

    row_len = seq_len + 1
    table = np.asarray(tokenizer.token_bytes(), np.int32)
    batch_fn = lambda rows: make_batch(*(np.stack([r[k] for r in rows]) for k in _ROW_KEYS), table)
    train = (
        grain.MapDataset.source(host_train)
        .shuffle(seed=seed % 2**32)
        .repeat()
        .map(_tokenize_fn(corpus, tokenizer, add_bos))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
    )
    train = PackIterDataset(train, row_len, tokenizer.pad_id, max_empty=len(host_train))
    train_iter = train.batch(batch_size, batch_fn=batch_fn).__iter__()

    evals = (
        grain.MapDataset.source(eval_ids[shard_index::shard_count])
        .map(_tokenize_fn(eval_corpus, tokenizer, add_bos))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
    )
    eval_batches = _eval_batches_fn(
        PackIterDataset(evals, row_len, tokenizer.pad_id), row_len, tokenizer.pad_id, batch_size, batch_fn
    )
    info = DataInfo(
        spec=spec,
        eval_spec=eval_spec,
        num_train_docs=len(train_ids),
        num_eval_docs=len(eval_ids),
        shard_index=shard_index,
        shard_count=shard_count,
        seq_len=seq_len,
        batch_size=batch_size,
        vocab_size=tokenizer.vocab_size,
        add_bos=add_bos,
    )
    return train_iter, eval_batches, info
