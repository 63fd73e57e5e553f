"""Supervised finetuning data: chat rendering, prompt masking, bad rows; parity of ddp and
zero2 with single under masking."""
from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config import compose
from orchestrator.data import open_blocks, prepare
from orchestrator.errors import ConfigError
from orchestrator.job import run_job
from orchestrator.sft import IGNORE
from orchestrator.synthetic import reverse_words, write_jsonl
from tests.conftest import assert_losses_close, parity_overrides


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(reverse_words(600, seed=1), tmp_path_factory.mktemp("sft") / "reverse.jsonl")


def sft_overrides(path) -> list[str]:
    return ["data=sft", f"data.paths=[{path}]", "data.seq_len=32"]


def test_only_response_tokens_are_targets(sft_file, tmp_path, data_cache):
    job = compose(["model=tiny", f"run.dir={tmp_path}", f"data.cache_dir={data_cache}", *sft_overrides(sft_file)])
    data = prepare(job.data, job.model.vocab_size)
    examples = open_blocks(data, job.data.seq_len, 0.0)
    assert examples.n_train == 600
    x, y = examples.batch([0, 1])
    assert x.shape == y.shape == (2, 32)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(data.tokenizer_path)
    row = json.loads(sft_file.read_text().splitlines()[0])
    trained = y[0][y[0] != IGNORE].tolist()
    # What is learned is the response, its line end and the EOS; nothing of the prompt.
    assert tok.decode(trained[:-1]).strip() == row["response"]
    assert trained[-1] == data.eos_id
    prompt_part = tok.decode(x[0][: (y[0] != IGNORE).nonzero()[0, 0] + 1].tolist())
    assert "Reverse:\n" in prompt_part and "<|assistant|>" in prompt_part
    # Padding after the EOS is never a target.
    assert (y[0][(y[0] == data.eos_id).nonzero()[0, 0] + 1:] == IGNORE).all()


def test_messages_rows_and_bad_rows(tmp_path, data_cache):
    good = write_jsonl([{"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}]}] * 4, tmp_path / "chat.jsonl")
    job = compose(["model=tiny", f"run.dir={tmp_path}", f"data.cache_dir={data_cache}", *sft_overrides(good)])
    data = prepare(job.data, job.model.vocab_size)
    x, y = open_blocks(data, 32, 0.0).batch([0])
    assert int((y != IGNORE).sum()) < int((x != data.eos_id).sum())  # system and user turns are not trained

    bad = write_jsonl([{"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}], tmp_path / "bad.jsonl")
    job = compose(["model=tiny", f"run.dir={tmp_path}", f"data.cache_dir={data_cache}", *sft_overrides(bad)])
    with pytest.raises(ConfigError) as err:
        prepare(job.data, job.model.vocab_size)
    assert err.value.key == "data.response_field" and "row 2 of bad.jsonl" in str(err.value)


_runs: dict = {}


def sft_run(tmp_path_factory, data_cache, sft_file, strategy: str, workers: int) -> dict:
    if strategy not in _runs:
        run_dir = tmp_path_factory.mktemp(f"sft-{strategy}")
        _runs[strategy] = run_job(compose(parity_overrides(run_dir, data_cache, f"strategy={strategy}",
                                                           f"cluster.num_workers={workers}", *sft_overrides(sft_file))))
        assert _runs[strategy]["status"] == "succeeded", _runs[strategy]["error"]
    return _runs[strategy]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_sft_parity_with_masking(sft_file, ray_cluster, tmp_path_factory, data_cache, strategy):
    single = sft_run(tmp_path_factory, data_cache, sft_file, "single", 1)
    other = sft_run(tmp_path_factory, data_cache, sft_file, strategy, 2)
    assert torch.isfinite(torch.tensor(single["losses"])).all()
    assert_losses_close(other["losses"], single["losses"], 1e-5)
