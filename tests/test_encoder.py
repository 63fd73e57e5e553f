"""The fast encoder gives the tokenizer's own ids: on the sample corpus, on every code point it
claims to split like the tokenizer, on text holding added tokens, and for a foreign tokenizer."""
from __future__ import annotations

import json
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from orchestrator.config import SAMPLES_DIR
from orchestrator.data import train_tokenizer
from orchestrator.encoder import SAFE_RANGES, Encoder, plain_byte_level
from orchestrator.tokens import EOS



def _sample_texts() -> list[str]:
    """The shipped corpus in paragraphs, and a few of them in other scripts and typography."""
    texts = [t for t in (SAMPLES_DIR / "tinyshakespeare.txt").read_text().split("\n\n") if t.strip()]
    accents = str.maketrans("aeiouAEIOU'-", "áéíóúÀÉÎÕÜ’—")
    return texts + [t.translate(accents) + " Привет, мир! 東京 ソウル 서울 €5" for t in texts[:300]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(_sample_texts()), 512)


def test_same_ids_as_the_tokenizer_on_the_sample(tok):
    texts = _sample_texts()
    enc = Encoder(tok)
    assert enc.fast
    assert enc.encode_batch(texts) == [e.ids for e in tok.encode_batch(texts)]
    assert len(enc.index) > 100  # it did use its word memory


def test_every_safe_code_point_splits_as_the_tokenizer_does(tok):
    """Each character of SAFE_RANGES in contexts that exercise every branch of GPT-2's pattern
    (letters, digits, other, whitespace before a word, trailing whitespace, contractions)."""
    texts = []
    for lo, hi in SAFE_RANGES:
        for cp in range(lo, hi + 1):
            if 0xD800 <= cp < 0xE000:
                continue
            c = chr(cp)
            texts.append(f"a{c}b {c}{c} 1{c}2 {c}x{c}'s  {c}\n{c} ")
    enc = Encoder(tok)
    ours = enc.encode_batch(texts)
    theirs = [e.ids for e in tok.encode_batch(texts)]
    wrong = [hex(ord(t[1])) for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not wrong, wrong[:20]


def test_added_tokens_and_unsafe_characters_go_to_the_tokenizer(tok):
    enc = Encoder(tok)
    texts = [f"one {EOS} two", "new letter \U0001E5D0 here", "plain text", ""]
    assert enc.encode_batch(texts) == [e.ids for e in tok.encode_batch(texts)]
    assert tok.token_to_id(EOS) in enc.encode(texts[0])


def test_other_tokenizers_are_not_split_here(tok):
    spec = json.loads(tok.to_str())
    assert plain_byte_level(spec)
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert not plain_byte_level(json.loads(other.to_str()))
    assert not plain_byte_level(dict(spec, normalizer={"type": "NFKC"}))
    assert not plain_byte_level(dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], add_prefix_space=True)))
    enc = Encoder(Tokenizer.from_str(json.dumps(dict(spec, normalizer={"type": "Lowercase"}))))
    assert not enc.fast
    assert enc.encode("Hello World") == tok.encode("hello world").ids


def test_arrays_with_a_tail_and_empty_texts(tok):
    enc = Encoder(tok)
    eos = tok.token_to_id(EOS)
    texts = ["first text", "", f"has {EOS} inside", "é and \U0001E5D0", "last"]
    tokens, lengths = enc.encode_arrays(texts, tail=(eos,))
    want = [e.ids + [eos] for e in tok.encode_batch(texts)]
    assert lengths.tolist() == [len(w) for w in want]
    assert tokens.tolist() == [i for w in want for i in w]
    assert enc.encode_arrays([])[0].size == 0
    assert enc.encode_batch(["", ""]) == [[], []]
