"""Synthetic SFT tasks with exact answers, for finetuning checks: reverse a word."""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_words(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """n prompt/response rows: "Reverse:\nc-a-t" -> "t-a-c". Dashes between the letters make a
    byte-level BPE tokenizer give one token per letter, and the same token for a letter in the
    prompt and in the answer (a space would glue itself to the letter after it, and not before
    the first): the task is to reverse a sequence of tokens, not to spell out merged pieces. A
    word never repeats a letter (each output letter then has one place in the prompt), and no
    word appears twice, so a held-out row is never a training row."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        word = rng.sample(LETTERS, rng.randint(min_len, max_len))
        if "".join(word) in seen:
            continue
        seen.add("".join(word))
        rows.append({"prompt": "Reverse:\n" + "-".join(word), "response": "-".join(reversed(word))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
