"""Tokenizers: a byte-level default and HF `tokenizer.json` files, behind one interface.

Interface (both classes):
  encode(text) -> list[int]        never adds special tokens; the data pipeline adds bos/eos itself
  encode_array(text) -> np.int32[] the same ids as an array (vectorised for the byte tokenizer)
  decode(ids) -> str               special ids are skipped
  vocab_size, bos_id, eos_id, pad_id
  token_bytes() -> np.int32[vocab_size]   UTF-8 bytes each id stands for (0 for specials), for bits per byte

ByteTokenizer: ids 0..255 are the raw UTF-8 bytes, then pad=256, bos=257, eos=258, so `vocab_size` is 259.
A model's embedding table may be larger (e.g. rounded up to a multiple of 128); the extra rows are never fed.
Decoding replaces invalid UTF-8 (a sequence cut mid-character) with U+FFFD instead of raising.

HFTokenizer: any `tokenizer.json` the `tokenizers` library reads. Special tokens are found in this order:
explicit constructor arguments; `tokenizer_config.json` next to the file (`bos_token`, `eos_token`, `pad_token`,
as strings or {"content": ...}); the first of a list of well-known names that exists in the vocabulary
(DeepSeek's "<｜begin▁of▁sentence｜>", "<s>", "<|endoftext|>", "</s>", "<pad>", ...). Fallbacks: no bos -> eos
(GPT-2 style, one token plays both roles); no pad -> eos (pad positions are always loss-masked, so any id
works). No eos at all is an error, because packed documents need a terminator the model can learn to emit.
`token_bytes` is exact for byte-level BPE (the decoder is `ByteLevel`, as in DeepSeek/GPT-2/Llama-3): each
token string maps back to bytes through the GPT-2 byte<->unicode table. For other models it is an estimate
from the token string ("▁" counts as a space, "<0xAB>" byte-fallback tokens as one byte).

load_tokenizer(None | "byte") -> ByteTokenizer; load_tokenizer(path to tokenizer.json or a directory
containing one) -> HFTokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens; see the module docstring for the id layout."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int32)
        table[:256] = 1
        return table

    def __repr__(self):
        return "ByteTokenizer(vocab_size=259)"


_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[CLS]")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 table that gives every byte a printable stand-in character."""
    # Printable latin-1 bytes stand for themselves; the rest are moved to code points 256, 257, ... in order.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(node) -> set[str]:
    """All decoder "type" names in a tokenizer.json decoder tree (Sequence decoders nest)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= _decoder_types(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_decoder_types, node)) if node else set()
    return set()


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json; see the module docstring."""

    def __init__(
        self, path: str, *, bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None
    ):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(path)
        with open(path, encoding="utf-8") as f:
            self._byte_level = "ByteLevel" in _decoder_types(json.load(f).get("decoder"))
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)

        def find(explicit, key, names):
            for name in (explicit, _config_token(config, key), *names):
                if name is not None and self._tok.token_to_id(name) is not None:
                    return self._tok.token_to_id(name)
            if explicit is not None:
                raise ValueError(f"tokenizer {path}: {key}={explicit!r} is not in the vocabulary")
            return None

        self.eos_id = find(eos_token, "eos_token", _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {path}: no end-of-sequence token found; add one of {_EOS_NAMES} "
                "or set eos_token in tokenizer_config.json next to it"
            )
        bos = find(bos_token, "bos_token", _BOS_NAMES)
        pad = find(pad_token, "pad_token", _PAD_NAMES)
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Added tokens may sit above the base vocab with gaps, so size by the largest id, not the count.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int32)
        to_byte = _unicode_to_byte()
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            if self._byte_level:
                table[i] = sum(1 if ch in to_byte else len(ch.encode("utf-8")) for ch in token)
            elif _BYTE_FALLBACK.match(token):
                table[i] = 1
            else:
                table[i] = len(token.replace("▁", " ").encode("utf-8"))
        for i, added in self._tok.get_added_tokens_decoder().items():
            table[i] = 0 if added.special else len(added.content.encode("utf-8"))
        return table

    def token_bytes(self) -> np.ndarray:
        return self._token_bytes

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | None = None, **special_tokens) -> ByteTokenizer | HFTokenizer:
    """None/"byte" -> ByteTokenizer; else a tokenizer.json path or a directory holding tokenizer.json."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--tokenizer={spec!r}: no tokenizer file at {path!r} "
            "(give 'byte', a tokenizer.json, or a directory containing tokenizer.json)"
        )
    return HFTokenizer(path, **special_tokens)
