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


def reversal_score(prompts, completions, references) -> list[float]:
    """A GRPO reward for the reversal task with partial credit: the fraction of the answer's
    characters in their right place, over the longer of answer and completion (1.0 exactly when
    the completion is the answer). Denser than exact match, so that a weak model's samples
    differ in reward long before any of them is right."""
    out = []
    for c, r in zip(completions, references):
        c, r = c.strip(), r.strip()
        longest = max(len(c), len(r), 1)
        out.append(sum(a == b for a, b in zip(c, r)) / longest)
    return out


def reverse_pairs(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """n preference rows for the reversal task: the prompt, the right answer as ``chosen``, and as
    ``rejected`` a wrong one: the same letters in another order (half of the time the word as
    given, the commonest mistake)."""
    rng = random.Random(seed + 1)
    rows = []
    for row in reverse_words(n, seed, min_len, max_len):
        letters = row["response"].split("-")
        given = list(reversed(letters))
        wrong = given if rng.random() < 0.5 else letters[:]
        while wrong == letters:
            rng.shuffle(wrong)
        rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": "-".join(wrong)})
    return rows
