"""model.init_from: start a job from one of our runs or from a local Hugging Face Llama
directory (our export), with the pretrained tokenizer; mismatches are refused up front."""
from __future__ import annotations

import json

import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.export import export
from orchestrator.job import run_job
from tests.conftest import parity_overrides, single_run


@pytest.fixture(scope="module")
def source(ray_cluster, tmp_path_factory, data_cache):
    """A short single-process run and its Hugging Face export."""
    run_dir, summary = single_run(tmp_path_factory, data_cache, "source", "trainer.max_steps=10", "optim.lr=3e-3")
    hf_dir = tmp_path_factory.mktemp("hf")
    export(run_dir, hf_dir)
    return run_dir, hf_dir, summary


def short_job(run_dir, data_cache, *extra):
    return compose(parity_overrides(run_dir, data_cache, "strategy=single", "cluster.num_workers=1",
                                    "trainer.max_steps=2", *extra))


def test_run_and_exported_directory_start_from_the_same_weights(source, tmp_path, data_cache):
    run_dir, hf_dir, src = source
    ours = run_job(short_job(tmp_path / "ours", data_cache, f"model.init_from={run_dir}"))
    hf = run_job(short_job(tmp_path / "hf", data_cache, f"model.init_from={hf_dir}"))
    fresh = run_job(short_job(tmp_path / "fresh", data_cache))
    for s in (ours, hf, fresh):
        assert s["status"] == "succeeded", s["error"]
    # Same weights and the same (pretrained) tokenizer: the same losses from either source.
    for a, b in zip(ours["losses"], hf["losses"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (ours["losses"], hf["losses"])
    # They start where the source run ended, well below a fresh model.
    assert ours["losses"][0] < fresh["losses"][0] - 0.3, (ours["losses"], fresh["losses"])
    assert abs(ours["losses"][0] - src["losses"][-1]) < 0.3
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text()) == json.loads(
        (run_dir / "tokenizer.json").read_text())


def test_mismatches_are_refused_before_any_worker(source, tmp_path):
    run_dir, hf_dir, _ = source
    base = ["run.dir=/tmp/unused", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"]
    with pytest.raises(ConfigError, match=r"dim=64 but model.dim=384") as err:
        compose(base + ["model=small", "model.vocab_size=512", f"model.init_from={run_dir}"])
    assert err.value.key == "model.init_from"
    with pytest.raises(ConfigError, match="not a run directory"):
        compose(base + ["model=tiny", f"model.init_from={tmp_path}"])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="only Llama-architecture"):
        compose(base + ["model=tiny", f"model.init_from={gpt2}"])
    with pytest.raises(ConfigError, match="more than the embedding"):
        # A checkpoint of the same shapes but a larger tokenizer than the embedding holds.
        big = tmp_path / "big"
        big.mkdir()
        cfg = json.loads((hf_dir / "config.json").read_text())
        (big / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
        (big / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        (big / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
        compose(base + ["model=tiny", "model.vocab_size=300", f"model.init_from={big}"])
