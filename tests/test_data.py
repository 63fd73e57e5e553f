"""Data: local files through datasets, a local tokenizer, packing and the sharded sampler."""
from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.config import DataConfig
from orchestrator.data import BlockSampler, TokenBlocks, prepare


def test_sampler_shards_cover_the_global_batch():
    ref = BlockSampler(100, global_batch=12, micro_batch=3, dp_rank=0, dp_size=1, seed=7)
    shards = [BlockSampler(100, 12, 2, r, 3, seed=7) for r in range(3)]
    for _ in range(20):  # crosses several epochs
        whole = np.concatenate(ref.next_step())
        parts = np.concatenate([np.concatenate(s.next_step()) for s in shards])
        assert np.array_equal(whole, parts)


def test_sampler_epoch_is_a_permutation_and_seeded():
    s = BlockSampler(50, 10, 5, 0, 1, seed=1)
    epoch = np.concatenate([np.concatenate(s.next_step()) for _ in range(5)])
    assert sorted(epoch) == list(range(50))
    other = BlockSampler(50, 10, 5, 0, 1, seed=2)
    assert not np.array_equal(epoch[:10], np.concatenate(other.next_step()))


def test_sampler_resumes_from_its_state():
    a = BlockSampler(40, 8, 4, 1, 2, seed=3)
    for _ in range(7):
        a.next_step()
    b = BlockSampler(40, 8, 4, 1, 2, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert all(np.array_equal(x, y) for x, y in zip(a.next_step(), b.next_step()))


def test_jsonl_and_parquet_are_tokenized_and_packed(tmp_path):
    import datasets

    rows = [{"text": f"document number {i} says hello to the world. " * 3, "id": i} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]))
    datasets.Dataset.from_list(rows[20:]).to_parquet(str(tmp_path / "b.parquet"))
    cfg = DataConfig(name="t", paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], seq_len=16,
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare(cfg, vocab_size=300)
    assert prepared.vocab_size <= 300
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(prepared.tokenizer_path)
    ids = np.load(prepared.tokens_path)
    # Every document ends with the end-of-text token; round trip of the first one.
    assert int((ids == prepared.eos_id).sum()) == 40
    first = ids[: int(np.argmax(ids == prepared.eos_id))]
    assert tok.decode(first.tolist()) == rows[0]["text"]
    blocks = TokenBlocks(prepared.tokens_path, 16)
    x, y = blocks.batch(np.array([0, 1]))
    assert x.shape == (2, 16) and np.array_equal(x[0, 1:].numpy(), y[0, :-1].numpy())
    # A second call hits the cache: same files, no retraining.
    assert prepare(cfg, vocab_size=300) == prepared


def test_wrong_text_field_names_the_key(tmp_path):
    from orchestrator.errors import ConfigError

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    cfg = DataConfig(name="t", paths=[str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError) as err:
        prepare(cfg, vocab_size=300)
    assert err.value.key == "data.text_field" and "body" in str(err.value)
