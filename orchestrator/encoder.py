"""Token ids of many texts, the same as ``tokenizer.encode(text).ids`` and several times faster,
for the byte-level BPE this project trains (GPT-2's pre-tokenization, no normalizer).

The `tokenizers` library spends most of an encode on its per-character bookkeeping (offsets,
alignments), at about 3 MB/s per core here. A byte-level BPE treats each pre-token ("word")
independently, so the ids of a text are the concatenation of its words' ids: this splits the
text with the same pattern (Python's ``re`` for ASCII text, the ``regex`` module otherwise),
asks the tokenizer once for each word it has not seen, and concatenates. Exact by construction
where the split is the same; it is used only where that is known:

- the tokenizer is a plain byte-level BPE (checked from its JSON: no normalizer, GPT-2's
  split, no dropout, no post-processor adding tokens, no truncation or padding);
- the text holds none of the tokenizer's added tokens (those are matched before splitting);
- every character lies in ranges where both regex engines' Unicode tables agree
  (``SAFE_RANGES``: Latin, Greek, Cyrillic, general punctuation, currency signs, kana, CJK
  ideographs, Hangul; checked code point by code point in tests/test_encoder.py). Characters
  assigned in recent Unicode versions are classified differently by the two engines.

Any other text, or any other tokenizer, is handed to the tokenizer itself.
"""
from __future__ import annotations

import hashlib
import json
import re
from itertools import chain

import numpy as np

_WS = "\\t\\n\\x0b\\x0c\\r "  # what \s matches among ASCII characters, in both engines
_ASCII_SPLIT = re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"
                          rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SAFE_RANGES = ((0x0000, 0x052F), (0x2000, 0x206F), (0x20A0, 0x20BF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
               (0xAC00, 0xD7A3))
_UNSAFE = re.compile("[^" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in SAFE_RANGES) + "]")
MAX_WORDS = 1 << 20  # words remembered; past this the memory starts again


def plain_byte_level(spec: dict) -> bool:
    """Whether a tokenizer's JSON is a byte-level BPE whose ids are its GPT-2 words' ids end to end."""
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    post = spec.get("post_processor")
    return (spec.get("normalizer") is None and spec.get("truncation") is None and spec.get("padding") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and model.get("type") == "BPE" and model.get("dropout") is None
            and (post is None or post.get("type") == "ByteLevel"))


class Encoder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        spec = json.loads(tokenizer.to_str())
        self.fast = plain_byte_level(spec)
        self.added = [a["content"] for a in spec.get("added_tokens") or []]
        self._unicode = None
        self._forget()

    def _forget(self) -> None:
        self.index: dict = {}  # word -> its number; the ids of word k are flat[starts[k]:][:counts[k]]
        self.flat = self.starts = self.counts = np.zeros(0, dtype=np.int64)

    def _split(self, text: str) -> list[str] | None:
        """The text's words, or None where only the tokenizer can say."""
        if any(a in text for a in self.added):
            return None
        if text.isascii():
            return _ASCII_SPLIT.findall(text)
        if _UNSAFE.search(text):
            return None
        if self._unicode is None:
            import regex

            self._unicode = regex.compile(GPT2_SPLIT)
        return self._unicode.findall(text)

    def _with(self, lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat, starts, counts) of the known words followed by ``lists``."""
        c = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        f = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(c.sum()))
        return (np.concatenate([self.flat, f]), np.concatenate([self.starts, len(self.flat) + np.cumsum(c) - c]),
                np.concatenate([self.counts, c]))

    def _learn(self, words: set) -> None:
        new = [w for w in words if w not in self.index]
        if len(self.index) + len(new) > MAX_WORDS:
            self._forget()
            new = list(words)
        if new:
            base = len(self.counts)
            self.index.update((w, base + k) for k, w in enumerate(new))
            self.flat, self.starts, self.counts = self._with([e.ids for e in self.tok.encode_batch(new)])

    def encode_arrays(self, texts: list[str], tail: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids end to end, each text followed by ``tail`` (an EOS, say), as one int32
        array, and each text's token count (tail included)."""
        split = [self._split(t) for t in texts] if self.fast else [None] * len(texts)
        self._learn(set().union(*(w for w in split if w)))
        # The tail and the texts only the tokenizer can encode are words of this call alone,
        # numbered after the known ones and forgotten at the end.
        extra = [list(tail)] + [self.tok.encode(t).ids for t, w in zip(texts, split) if w is None]
        base = len(self.counts)
        flat, starts, counts = self._with(extra)
        tail_word = [base] if tail else []
        numbers, k = [], base + 1
        get = self.index.__getitem__
        for w in split:
            if w is None:
                numbers.append([k] + tail_word)
                k += 1
            else:
                numbers.append(list(map(get, w)) + tail_word)
        per_text = np.fromiter(map(len, numbers), dtype=np.int64, count=len(numbers))
        at = np.fromiter(chain.from_iterable(numbers), dtype=np.int64, count=int(per_text.sum()))
        n = counts[at]
        ends = np.cumsum(n)
        tokens = flat[np.repeat(starts[at] - (ends - n), n) + np.arange(int(ends[-1]) if len(ends) else 0)]
        tokens_before = np.concatenate([[0], ends])  # at each word boundary
        words_before = np.concatenate([[0], np.cumsum(per_text)])  # at each text boundary
        return tokens.astype(np.int32), tokens_before[words_before[1:]] - tokens_before[words_before[:-1]]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        tokens, lengths = self.encode_arrays(texts)
        return [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] if len(texts) else []

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


_BY_JSON: dict[str, Encoder] = {}


def encoder_of(tokenizer_json: str) -> Encoder:
    """This process's encoder for a tokenizer's JSON, kept with its word memory: a worker process
    that encodes batch after batch learns each word once."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _BY_JSON:
        from tokenizers import Tokenizer

        _BY_JSON.clear()
        _BY_JSON[key] = Encoder(Tokenizer.from_str(tokenizer_json))
    return _BY_JSON[key]
