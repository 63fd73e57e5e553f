"""Synthetic SFT tasks with exact answers, for finetuning checks: reverse a word."""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def reverse_words(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """n prompt/response rows: "Reverse: abc" -> "cba"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        rows.append({"prompt": f"Reverse: {word}", "response": word[::-1]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
