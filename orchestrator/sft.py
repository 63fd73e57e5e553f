"""Supervised finetuning data: prompt/response pairs or chat messages, rendered through one
chat template, one example per row padded to seq_len + 1, with the loss on response
tokens only.

Padding (rather than packing) keeps examples apart: no example ever attends to another.
The loss of a micro-batch is the mean over its trained tokens; every strategy averages
the same micro-batches (the sampler cuts the global batch into the same micro-batches
whatever the data-parallel size), so the loss is the same in every layout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.errors import ConfigError
from orchestrator.tokens import IGNORE_INDEX as IGNORE

# The chat template: each turn is "<|role|>\n" + content + "\n"; the assistant's turns (their
# content and the EOS that ends the example) are what the model learns to produce.
ROLES = ("system", "user", "assistant")


def turns_of(row: dict, cfg, where: str) -> list[tuple[str, str]]:
    """(role, content) turns of one row, or a ConfigError naming the missing field."""
    messages = row.get(cfg.messages_field)
    if messages:
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError("data.messages_field", f"{where}: each message needs a role in {ROLES} and a "
                                  f"string content, got {m!r}")
            turns.append((m["role"], m["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise ConfigError("data.messages_field", f"{where}: no assistant message to learn from")
        return turns
    for field, key in ((cfg.prompt_field, "data.prompt_field"), (cfg.response_field, "data.response_field")):
        if not isinstance(row.get(field), str):
            raise ConfigError(key, f"{where} has no string field {field!r} (nor {cfg.messages_field!r} messages); "
                              f"its fields: {sorted(k for k, v in row.items() if v is not None)}")
    return [("user", row[cfg.prompt_field]), ("assistant", row[cfg.response_field])]


def segments(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The rendered text in pieces, each marked trained or not."""
    out = []
    for role, content in turns:
        out.append((f"<|{role}|>\n", False))
        out.append((content + "\n", role == "assistant"))
    return out


def load_rows(paths: list[Path], cache_dir: Path) -> list[tuple[str, dict]]:
    import datasets

    datasets.disable_progress_bars()
    rows = []
    for p in paths:
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix.lower())
        if builder is None:
            raise ConfigError("data.paths", f"{p}: SFT data is .jsonl, .json or .parquet")
        ds = datasets.load_dataset(builder, data_files=[str(p)], split="train", cache_dir=str(cache_dir / "hf"))
        rows += [(f"row {i + 1} of {p.name}", row) for i, row in enumerate(ds)]
    if not rows:
        raise ConfigError("data.paths", "the SFT files hold no rows")
    return rows


def build(paths: list[Path], cfg, vocab_size: int, tokenizer_path: str | None, cache_root: Path):
    """tokens (N, seq_len + 1) padded with EOS, and mask (N, seq_len + 1): True where the token
    at that position is a training target (assistant content and the closing EOS)."""
    from orchestrator.data import tokenizer_for
    from orchestrator.tokens import EOS

    examples = [segments(turns_of(row, cfg, where)) for where, row in load_rows(paths, cache_root)]
    tok = tokenizer_for(["".join(text for text, _ in ex) for ex in examples], vocab_size, tokenizer_path)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise ConfigError("model.init_from", f"the tokenizer has no {EOS} token to end examples with")
    width = cfg.seq_len + 1
    tokens = np.full((len(examples), width), eos_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.bool_)
    truncated = 0
    for i, ex in enumerate(examples):
        ids, trained = [], []
        for text, learn in ex:
            piece = tok.encode(text).ids
            ids += piece
            trained += [learn] * len(piece)
        ids.append(eos_id)
        trained.append(True)
        if len(ids) > width:
            truncated += 1
            ids, trained = ids[:width], trained[:width]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = trained
    keep = mask[:, 1:].any(axis=1)  # an example whose response was cut away entirely teaches nothing
    if not keep.any():
        raise ConfigError("data.seq_len", f"no response token fits in data.seq_len={cfg.seq_len}")
    return ({"tokens": tokens[keep], "mask": mask[keep]}, tok,
            {"examples": int(keep.sum()), "truncated": truncated, "dropped": int((~keep).sum())})


class Examples:
    """SFT examples with the TokenBlocks interface: ``batch(ids, split)`` -> (inputs, targets),
    targets IGNORE where the position is not trained (prompt, padding)."""

    def __init__(self, tokens_path: str, mask_path: str, val_fraction: float = 0.0):
        self.tokens = np.load(tokens_path, mmap_mode="r")
        self.mask = np.load(mask_path, mmap_mode="r")
        total = len(self.tokens)
        self.n_val = int(total * val_fraction)
        self.n_train = total - self.n_val
        if self.n_train < 1:
            raise ConfigError("data.val_fraction", f"no training row left of {total}")

    def batch(self, ids: np.ndarray, split: str = "train"):
        rows = np.asarray(ids) + (0 if split == "train" else self.n_train)
        return inputs_and_targets(self.tokens[rows], self.mask[rows])


def inputs_and_targets(tokens: np.ndarray, mask: np.ndarray):
    """Padded rows (N, seq_len + 1) and their trained positions -> (inputs, targets) tensors,
    targets IGNORE where the position is not trained."""
    import torch

    tokens = torch.from_numpy(np.asarray(tokens).astype(np.int64))
    targets = tokens[:, 1:].clone()
    targets[~torch.from_numpy(np.ascontiguousarray(mask[:, 1:]))] = IGNORE
    return tokens[:, :-1], targets
