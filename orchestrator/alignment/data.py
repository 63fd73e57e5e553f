"""Alignment data: preference pairs for DPO, and GRPO's prompts with their reference answers.

Preference rows hold a prompt and two answers, ``chosen`` and ``rejected``: strings (the prompt
is the user's turn, each answer the assistant's), or lists of {role, content} messages (the
prompt's turns; each answer's assistant turns). Both answers are rendered after the same prompt
with the SFT chat template and trained on their assistant tokens (and the closing EOS) only.
A pair is stored as two padded rows side by side: tokens and mask of shape (pairs, 2, seq_len + 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.errors import ConfigError
from orchestrator.sft import ROLES, Examples, inputs_and_targets, load_rows, segments


def _turns(value, role: str, key: str, where: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(role, value)]
    if isinstance(value, list) and value:
        turns = []
        for m in value:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(key, f"{where}: each message needs a role in {ROLES} and a string content, "
                                       f"got {m!r}")
            turns.append((m["role"], m["content"]))
        return turns
    raise ConfigError(key, f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def pair_turns(row: dict, cfg, where: str) -> tuple[list, list]:
    """(prompt + chosen turns, prompt + rejected turns) of one row; ConfigError naming the field."""
    fields = {"data.prompt_field": cfg.prompt_field, "data.chosen_field": cfg.chosen_field,
              "data.rejected_field": cfg.rejected_field}
    for key, name in fields.items():
        if row.get(name) is None:
            raise ConfigError(key, f"{where} has no field {name!r}; its fields: "
                                   f"{sorted(k for k, v in row.items() if v is not None)}")
    prompt = _turns(row[cfg.prompt_field], "user", "data.prompt_field", where)
    chosen = _turns(row[cfg.chosen_field], "assistant", "data.chosen_field", where)
    rejected = _turns(row[cfg.rejected_field], "assistant", "data.rejected_field", where)
    for key, answer in (("data.chosen_field", chosen), ("data.rejected_field", rejected)):
        if not any(role == "assistant" for role, _ in answer):
            raise ConfigError(key, f"{where}: no assistant turn to learn from")
    return prompt + chosen, prompt + rejected


def _encode(tok, turns, eos_id: int) -> tuple[list[int], list[bool]]:
    ids, trained = [], []
    for text, learn in segments(turns):
        piece = tok.encode(text).ids
        ids += piece
        trained += [learn] * len(piece)
    return ids + [eos_id], trained + [True]


def build_preference(paths: list[Path], cfg, vocab_size: int, tokenizer_path: str | None, cache_root: Path):
    """tokens and mask (pairs, 2, seq_len + 1): [:, 0] the chosen answer, [:, 1] the rejected one."""
    from orchestrator.data import tokenizer_for
    from orchestrator.tokens import EOS

    pairs = [pair_turns(row, cfg, where) for where, row in load_rows(paths, cache_root)]
    texts = ["".join(text for text, _ in segments(t)) for pair in pairs for t in pair]
    tok = tokenizer_for(texts, vocab_size, tokenizer_path)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise ConfigError("model.init_from", f"the tokenizer has no {EOS} token to end answers with")
    width = cfg.seq_len + 1
    tokens = np.full((len(pairs), 2, width), eos_id, dtype=np.int64)
    mask = np.zeros((len(pairs), 2, width), dtype=np.bool_)
    truncated = 0
    for i, pair in enumerate(pairs):
        for j, turns in enumerate(pair):
            ids, trained = _encode(tok, turns, eos_id)
            if len(ids) > width:
                truncated += 1
                ids, trained = ids[:width], trained[:width]
            tokens[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = trained
    keep = mask[:, :, 1:].any(axis=2).all(axis=1)  # both answers keep a trained token
    if not keep.any():
        raise ConfigError("data.seq_len", f"no pair keeps a response token in data.seq_len={cfg.seq_len}")
    return ({"tokens": tokens[keep], "mask": mask[keep]}, tok,
            {"pairs": int(keep.sum()), "truncated": truncated, "dropped": int((~keep).sum())})


class Pairs(Examples):
    """Preference pairs with the TokenBlocks interface: ``batch(ids, split)`` -> (inputs, targets,
    reference log-probabilities): the chosen rows, then the rejected ones. ``reference`` (pairs, 2)
    holds the frozen reference's summed response log-probabilities; the trainer fills it."""

    def __init__(self, tokens_path: str, mask_path: str, val_fraction: float = 0.0):
        import torch

        super().__init__(tokens_path, mask_path, val_fraction)
        self.reference = torch.zeros((len(self.tokens), 2), dtype=torch.float32)

    @property
    def n_total(self) -> int:
        return self.n_train + self.n_val

    def rows(self, rows: np.ndarray):
        """(inputs, targets) of whole rows (absolute indices): chosen rows, then rejected ones."""
        rows = np.asarray(rows)
        return inputs_and_targets(np.concatenate([self.tokens[rows, 0], self.tokens[rows, 1]]),
                                  np.concatenate([self.mask[rows, 0], self.mask[rows, 1]]))

    def batch(self, ids: np.ndarray, split: str = "train"):
        rows = np.asarray(ids) + (0 if split == "train" else self.n_train)
        x, y = self.rows(rows)
        return x, y, self.reference[rows].t().reshape(-1)  # chosen values, then rejected ones


class Prompts:
    """GRPO's prompts from SFT examples: each row's tokens before its first trained position (the
    chat template up to the assistant's turn), and its reference answer (the trained tokens before
    the closing EOS, decoded)."""

    def __init__(self, examples, tokenizer, eos_id: int):
        self.examples = examples
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    def get(self, row: int, split: str = "train") -> tuple[list[int], str, str]:
        """(prompt ids, prompt text, reference answer) of a row."""
        r = row + (0 if split == "train" else self.examples.n_train)
        tokens = np.asarray(self.examples.tokens[r], dtype=np.int64)
        mask = np.asarray(self.examples.mask[r])
        start = int(np.argmax(mask))
        answer = [int(t) for t, m in zip(tokens[start:], mask[start:]) if m and t != self.eos_id]
        prompt = [int(t) for t in tokens[:start]]
        return prompt, self.tokenizer.decode(prompt), self.tokenizer.decode(answer)
