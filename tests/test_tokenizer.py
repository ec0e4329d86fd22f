"""Byte tokenizer and HF tokenizer.json loading."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsjax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "héllo wörld, 世界! 🚀", "def f(x):\n    return x + 1\n", "naïve café"]


def _byte_level_bpe(path, special=("<pad>", "<s>", "</s>")):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        show_progress=False,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok.save(str(path))
    return path


def _word_level(path, vocab):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.encode_array(text).dtype == np.int32
    assert tok.encode("") == []


def test_byte_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = [tok.bos_id] + tok.encode("é") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "é"
    assert tok.decode(np.array(ids)) == "é"
    # A character cut in half is replaced, not an exception.
    assert tok.decode(tok.encode("é")[:1] + tok.encode("a")) == "\ufffda"
    table = tok.token_bytes()
    assert table.shape == (259,) and table[:256].tolist() == [1] * 256 and table[256:].tolist() == [0] * 3


def test_load_tokenizer_byte_and_missing(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))  # a directory without tokenizer.json


def test_hf_byte_level_bpe(tmp_path):
    _byte_level_bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tmp_path))  # the directory form
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()) > 259
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids  # encode never adds specials
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
        # Byte-level BPE: token byte lengths add up to the exact UTF-8 length.
        assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes()[[0, 1, 2]].tolist() == [0, 0, 0]
    same = load_tokenizer(str(tmp_path / "tokenizer.json"))  # the file form
    assert same.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_hf_deepseek_names_and_fallbacks(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    _byte_level_bpe(ds / "tokenizer.json", special=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"))
    tok = load_tokenizer(str(ds))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    _byte_level_bpe(gpt2 / "tokenizer.json", special=("<|endoftext|>",))
    tok = load_tokenizer(str(gpt2))
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0  # one token plays every role


def test_hf_tokenizer_config_wins(tmp_path):
    _word_level(tmp_path / "tokenizer.json", ["[UNK]", "<s>", "</s>", "<a>", "<b>", "hello", "world"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<a>", "eos_token": {"content": "<b>"}, "pad_token": None})
    )
    tok = load_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 4, 4)
    assert tok.encode("hello world") == [5, 6]
    assert tok.decode([5, 6]) == "hello world"
    assert tok.token_bytes()[[5, 6]].tolist() == [5, 5]


def test_hf_without_eos_is_an_error(tmp_path):
    _word_level(tmp_path / "tokenizer.json", ["[UNK]", "hello"])
    with pytest.raises(ValueError, match="end-of-sequence"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(str(tmp_path / "tokenizer.json"), eos_token="</s>")
