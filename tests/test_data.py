"""Data pipeline: sources, split, packing, batches, resume, sharding, errors, bits-per-byte counts."""

import collections
import json
import re

import grain
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsjax import data
from dsjax.tokenizer import ByteTokenizer, load_tokenizer

BYTE_TABLE = ByteTokenizer().token_bytes()


def _pack(docs, row_len, pad_id=0):
    parent = grain.MapDataset.source([np.asarray(d, np.int32) for d in docs]).to_iter_dataset()
    return list(data.PackIterDataset(parent, row_len, pad_id))


def _write_docs(tmp_path, texts, name="doc{:03d}.txt"):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (d / name.format(i)).write_text(text, encoding="utf-8")
    return d


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _segments(batch):
    """Yields the input tokens of every segment of every row."""
    for row_ids, row_seg in zip(batch["inputs"], batch["segment_ids"]):
        for s in np.unique(row_seg[row_seg > 0]):
            yield row_ids[row_seg == s]


def test_packing_exact_rows():
    rows = _pack([[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30, 31]], row_len=5)
    got = [(r["tokens"].tolist(), r["segment_ids"].tolist(), r["positions"].tolist()) for r in rows]
    assert got == [
        ([10, 11, 12, 20, 21], [1, 1, 1, 2, 2], [0, 1, 2, 0, 1]),
        ([21, 22, 23, 24, 25], [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]),  # continuation repeats 21 as first input
        ([25, 26, 30, 31, 0], [1, 1, 2, 2, 0], [0, 1, 0, 1, 0]),  # only the final row is padded
    ]
    stack = lambda k: np.stack([r[k] for r in rows])
    b = data.make_batch(stack("tokens"), stack("segment_ids"), stack("positions"), BYTE_TABLE)
    np.testing.assert_array_equal(b["targets"], stack("tokens")[:, 1:])
    np.testing.assert_array_equal(b["inputs"], stack("tokens")[:, :-1])
    assert b["loss_mask"].tolist() == [[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 2, 2]]
    assert b["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert b["num_bytes"].tolist() == [3, 4, 2]
    assert {k: v.dtype for k, v in b.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
        "num_bytes": np.int32,
    }


@pytest.mark.parametrize("row_len", [2, 3, 7, 64])
def test_packing_trains_every_pair_once(row_len):
    rng = np.random.default_rng(row_len)
    docs = [rng.integers(1, 200, rng.integers(1, 40)) for _ in range(30)]
    rows = _pack(docs, row_len)
    b = data.make_batch(*(np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids", "positions")), BYTE_TABLE)
    m = b["loss_mask"] > 0
    trained = collections.Counter(zip(b["inputs"][m].tolist(), b["targets"][m].tolist()))
    expected = collections.Counter(p for d in docs for p in zip(d[:-1].tolist(), d[1:].tolist()))
    assert trained == expected  # no pair across documents, none lost at row boundaries, none twice
    assert (b["positions"] < row_len).all()
    seg, pos = b["segment_ids"], b["positions"]
    starts = np.concatenate([np.ones((len(seg), 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert ((pos == 0) == (starts | (seg == 0))).all()  # positions restart exactly at segment starts


def test_stdlib_corpus_and_split():
    corpus = data.build_corpus("stdlib")
    keys = corpus.sources[0].keys
    assert len(corpus) > 200 and "os.py" in keys and keys == sorted(keys)
    assert not any("site-packages" in k for k in keys)
    train, val = data.split_documents(corpus)
    train2, val2 = data.split_documents(data.build_corpus("stdlib"))
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(val) > 0 and not set(train) & set(val) and len(train) + len(val) == len(corpus)
    assert 0.005 < len(val) / len(corpus) < 0.05
    assert "import" in corpus.read(keys.index("os.py"))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_stdlib_resume_exact(num_threads):
    kw = dict(seq_len=64, batch_size=4, seed=3, shard_index=0, shard_count=1, num_threads=num_threads)
    it, _, info = data.make_datasets("stdlib", **kw)
    assert info.num_eval_docs > 0 and info.vocab_size == 259
    first = _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    after = _take(it, 5)
    it2, _, _ = data.make_datasets("stdlib", **kw)
    _assert_same(_take(it2, 7), first)  # deterministic
    it3, _, _ = data.make_datasets("stdlib", **kw)
    it3.set_state(state)
    _assert_same(_take(it3, 5), after)
    b = after[0]
    assert b["inputs"].shape == (4, 64) and b["num_bytes"].shape == (4,)
    it4, _, _ = data.make_datasets("stdlib", **{**kw, "seed": 4})
    assert not np.array_equal(next(it4)["inputs"], first[0]["inputs"])


def test_resume_across_epochs_and_reshuffle(tmp_path):
    d = _write_docs(tmp_path, [f"{chr(65 + i)} document " * (i % 5 + 1) for i in range(12)])
    kw = dict(seq_len=16, batch_size=2, seed=0, eval_spec=str(d / "doc000.txt"), shard_index=0, shard_count=1)
    it, _, info = data.make_datasets(str(d), **kw)
    assert info.num_train_docs == 12
    states, batches = [], []
    for _ in range(80):  # several epochs of a ~400-token corpus
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    for k in (5, 23, 41):
        fresh, _, _ = data.make_datasets(str(d), **kw)
        fresh.set_state(states[k])
        _assert_same(_take(fresh, 10), batches[k : k + 10])
    # The (bos -> first letter) pair is trained once per document start, so it reveals the document order.
    order = [int(t) - 65 for b in batches for t in b["targets"][(b["inputs"] == 257) & (b["loss_mask"] > 0)]]
    epochs = [tuple(order[i : i + 12]) for i in range(0, len(order) - 11, 12)]
    assert len(epochs) >= 3 and all(sorted(e) == list(range(12)) for e in epochs)
    assert len(set(epochs)) == len(epochs)  # a new permutation every epoch


def test_shards_disjoint(tmp_path):
    d = _write_docs(tmp_path, [f"<{i:02d}>" for i in range(20)])
    seen = []
    for shard in range(2):
        it, _, _ = data.make_datasets(
            str(d / "*.txt"), seq_len=8, batch_size=4, shard_index=shard, shard_count=2, eval_fraction=0.1
        )
        tok = ByteTokenizer()
        # Pieces of split documents are ignored; whole documents identify the shard's share.
        texts = (tok.decode(s) for b in _take(it, 20) for s in _segments(b))
        seen.append({t for t in texts if re.fullmatch(r"<\d\d>", t)})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    corpus = data.build_corpus(str(d / "*.txt"))
    train, _ = data.split_documents(corpus, 0.1)
    assert seen[0] | seen[1] == {corpus.read(int(i)) for i in train}


def test_text_jsonl_glob_sources(tmp_path):
    d = _write_docs(tmp_path, ["alpha", "beta", ""])
    (d / "skip.md").write_text("gamma")
    assert len(data.build_corpus(str(d / "*.txt"))) == 2  # the empty file is no document
    # Split keys are paths below the glob's fixed directories, so they survive moving the data.
    assert data.build_corpus(str(d / "*.txt")).sources[0].keys == ["doc000.txt", "doc001.txt"]
    assert data.build_corpus(str(tmp_path / "*" / "doc001.txt")).sources[0].keys == ["corpus/doc001.txt"]
    assert len(data.build_corpus(f"text:{d}")) == 3  # a directory: every file under it
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n{"text": ""}\n')
    c = data.build_corpus(str(jl))
    assert [c.read(i) for i in range(len(c))] == ["one", "two"]
    jl2 = tmp_path / "b.jsonl"
    jl2.write_text('{"body": "three"}\n')
    c = data.build_corpus(f"jsonl:{jl2}:body, {d}/*.txt")
    assert [c.read(i) for i in range(len(c))] == ["three", "alpha", "beta"]
    it, ev, info = data.make_datasets(f"{jl},{d}/*.txt", seq_len=4, batch_size=2, shard_index=0, shard_count=1)
    assert info.num_train_docs + info.num_eval_docs == 4 and next(it)["inputs"].shape == (2, 4)


def test_array_record_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    raw, js = tmp_path / "raw.array_record-00000-of-00001", tmp_path / "js.array_record"
    for path, records in (
        (raw, [b"first doc", "zweites D\xf6k".encode()]),
        (js, [json.dumps({"text": "json doc", "id": 1}).encode()]),
    ):
        w = ArrayRecordWriter(str(path), "group_size:1")
        for r in records:
            w.write(r)
        w.close()
    c = data.build_corpus(str(raw))
    assert [c.read(i) for i in range(len(c))] == ["first doc", "zweites D\xf6k"]
    c = data.build_corpus(f"array_record:{js}:text")
    assert c.read(0) == "json doc"
    with pytest.raises(ValueError, match="record 0 has no string field 'body'"):
        data.build_corpus(f"array_record:{js}:body").read(0)
    it, _, _ = data.make_datasets(str(raw), seq_len=8, batch_size=2, shard_index=0, shard_count=1)
    assert next(it)["loss_mask"].sum() > 0


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data: no such file: '.*missing\.txt'"):
        data.build_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"--eval_data: glob matches no files: '.*\*\.nope'"):
        data.make_datasets(
            "stdlib", seq_len=8, batch_size=1, eval_spec=str(tmp_path / "*.nope"), shard_index=0, shard_count=1
        )
    d = _write_docs(tmp_path, ["", ""])
    with pytest.raises(ValueError, match="corpus is empty"):
        data.build_corpus(str(d / "*.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: line has no string field 'text'"):
        data.build_corpus(str(bad))
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        data.build_corpus(str(bad))
    for seq_len in (0, -3):
        with pytest.raises(ValueError, match="seq_len must be >= 1"):
            data.make_datasets("stdlib", seq_len=seq_len, batch_size=1, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_documents(data.build_corpus("stdlib"), eval_fraction=0.0)


def test_empty_tokenized_corpus_raises_instead_of_hanging(tmp_path):
    jl = tmp_path / "ws.jsonl"
    jl.write_text('{"text": " "}\n{"text": "  "}\n')
    tok = load_tokenizer(str(_word_level_dir(tmp_path)))  # whitespace encodes to no ids at all
    it, _, _ = data.make_datasets(str(jl), tok, seq_len=4, batch_size=1, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="corpus is empty"):
        next(it)


def _word_level_dir(tmp_path):
    d = tmp_path / "wl"
    d.mkdir()
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def test_eval_batches_fixed_and_padded(tmp_path):
    texts = ["ünïcödé text " * 3, "short", "x" * 50, "déjà vu 🚀"]
    d = _write_docs(tmp_path, texts)
    _, ev, _ = data.make_datasets("stdlib", seq_len=16, batch_size=3, eval_spec=str(d), shard_index=0, shard_count=1)
    full = ev()
    assert full is ev() and len(full) >= 2
    fixed = ev(40)
    assert len(fixed) == 40 and fixed is ev(40)
    _assert_same(fixed[: len(full)], full)
    assert fixed[-1]["loss_mask"].sum() == 0 and (fixed[-1]["segment_ids"] == 0).all()
    # Bits per byte: with bos every byte of every validation document is a masked target exactly once.
    assert sum(int(b["num_bytes"].sum()) for b in full) == sum(len(t.encode()) for t in texts)
    # Byte tokenizer: bytes == masked targets that are bytes (< 256).
    for b in full:
        assert ((b["targets"] < 256) * b["loss_mask"]).sum(axis=1).tolist() == b["num_bytes"].tolist()


def test_hf_tokenizer_pipeline_byte_counts(tmp_path):
    texts = ["héllo wörld, 世界!", "def f(x):\n    return x\n", "naïve café " * 4]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts * 10,
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            show_progress=False,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    d = _write_docs(tmp_path, texts)
    _, ev, info = data.make_datasets(
        str(d), str(tmp_path / "tok"), seq_len=8, batch_size=2, eval_spec=str(d), shard_index=0, shard_count=1
    )
    assert info.vocab_size == tok.get_vocab_size()
    full = ev()
    assert sum(int(b["num_bytes"].sum()) for b in full) == sum(len(t.encode()) for t in texts)
    hf = load_tokenizer(str(tmp_path / "tok"))
    decoded = "".join(hf.decode(s) for b in full for s in _segments(b))
    assert "世界" in decoded
