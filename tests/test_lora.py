"""LoRA finetuning: only adapters train and are saved, ddp and zero2 match single, a stopped
run resumes, export merges the adapters, bad options are refused before any worker."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import checkpoint, dcp, lora
from orchestrator.config import LoraConfig, compose
from orchestrator.errors import ConfigError
from orchestrator.export import export
from orchestrator.job import run_job
from orchestrator.models import Llama, llama_args
from orchestrator.synthetic import reverse_words, write_jsonl
from tests.conftest import assert_losses_close, parity_overrides, single_run

LORA = ("finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.target_modules=[wq,wv,w_up]",
        "optim.lr=1e-2")


@pytest.fixture(scope="module")
def base_run(ray_cluster, tmp_path_factory, data_cache):
    """A short single-process pretraining run to adapt."""
    return single_run(tmp_path_factory, data_cache, "lora-base", "trainer.max_steps=5", "optim.lr=3e-3")[0]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return write_jsonl(reverse_words(300, seed=3), tmp_path_factory.mktemp("lora-data") / "reverse.jsonl")


def lora_job(run_dir, data_cache, base_run, sft_file, *extra):
    return compose(parity_overrides(run_dir, data_cache, f"model.init_from={base_run}", "data=sft",
                                    f"data.paths=[{sft_file}]", "data.seq_len=32", *LORA, *extra))


_runs: dict = {}


def single_lora(tmp_path_factory, data_cache, base_run, sft_file):
    if "single" not in _runs:
        run_dir = tmp_path_factory.mktemp("lora-single")
        summary = run_job(lora_job(run_dir, data_cache, base_run, sft_file, "strategy=single",
                                   "cluster.num_workers=1"))
        assert summary["status"] == "succeeded", summary["error"]
        _runs["single"] = (run_dir, summary)
    return _runs["single"]


def test_only_adapters_train_and_are_saved(tmp_path_factory, data_cache, base_run, sft_file):
    run_dir, summary = single_lora(tmp_path_factory, data_cache, base_run, sft_file)
    # rank 4 on wq (64->64), wv (64->32) and w_up (64->172) in 2 layers: 2 * 4 * (128 + 96 + 236).
    assert summary["n_trainable_params"] == 3680
    assert summary["n_trainable_params"] < 0.05 * summary["n_params"]
    assert summary["losses"][-1] < summary["losses"][0]
    ckpt = checkpoint.latest(checkpoint.in_run(run_dir))
    saved = dcp.read_full(ckpt.root, {}, "model.")
    assert saved and all(lora.is_adapter(k) for k in saved)
    assert len(saved) == 2 * 3 * 2  # A and B of three modules in two layers
    moments = dcp.read_full(ckpt.root, {}, "optim.")
    assert {k.split(".", 1)[1] for k in moments} == set(saved)
    # The adapters moved: B starts at zero.
    assert all(saved[k].abs().sum() > 0 for k in saved if ".lora_B." in k)


def test_export_merges_adapters(tmp_path_factory, data_cache, base_run, sft_file, tmp_path):
    run_dir, _ = single_lora(tmp_path_factory, data_cache, base_run, sft_file)
    export(str(run_dir), tmp_path / "hf")
    job = json.loads((run_dir / "job.json").read_text())
    args = llama_args(job["model"])
    # The adapted model (base from the run's init_from, adapters from its checkpoint)...
    adapted = lora.apply(Llama(args), LoraConfig(**job["finetune"]["lora"]), seed=0)
    base = dcp.read_full(checkpoint.latest(checkpoint.in_run(base_run)).root, {}, "model.")
    adapters = dcp.read_full(checkpoint.latest(checkpoint.in_run(run_dir)).root, {}, "model.")
    adapted.load_state_dict(lora.to_model_names(adapted, {**base, **adapters}), strict=False)
    adapted.init_buffers()
    # ...computes what the exported plain model computes.
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adapted.eval()(tokens)
        theirs = hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    # Merging changed the weights: the export is not the base.
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["layers.0.attn.wq.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["layers.0.attn.wk.weight"])


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_lora_parity_and_resume(strategy, tmp_path_factory, data_cache, base_run, sft_file):
    """Two workers against single; zero2 also stops at step 5 and resumes from its adapters."""
    _, reference = single_lora(tmp_path_factory, data_cache, base_run, sft_file)
    run_dir = tmp_path_factory.mktemp(f"lora-{strategy}")
    if strategy == "zero2":
        first = run_job(lora_job(run_dir, data_cache, base_run, sft_file, f"strategy={strategy}",
                                 "cluster.num_workers=2", "trainer.exit_at_step=5"))
        assert first["status"] == "succeeded" and first["steps"] == 5, first["error"]
        summary = run_job(lora_job(run_dir, data_cache, base_run, sft_file, f"strategy={strategy}",
                                   "cluster.num_workers=2", "run.resume=true"))
        losses = first["losses"] + summary["losses"][-5:]
    else:
        summary = run_job(lora_job(run_dir, data_cache, base_run, sft_file, f"strategy={strategy}",
                                   "cluster.num_workers=2"))
        losses = summary["losses"]
    assert summary["status"] == "succeeded", summary["error"]
    assert_losses_close(losses, reference["losses"], 1e-5)


def test_bad_lora_options_are_refused(base_run, sft_file, tmp_path, data_cache):
    def attempt(*extra):
        with pytest.raises(ConfigError) as err:
            lora_job(tmp_path, data_cache, base_run, sft_file, *extra)
        return err.value

    err = attempt("finetune.lora.target_modules=[wq,q_proj]")
    assert err.key == "finetune.lora.target_modules" and "'q_proj' names no module" in err.message
    assert "w_gate" in err.message  # the allowed names are listed
    err = attempt("strategy=zero3")
    assert err.key == "finetune.lora" and "zero3" in err.message and "zero2" in err.message
    err = attempt("strategy=tp", "cluster.num_workers=2")
    assert err.key == "finetune.lora"
    with pytest.raises(ConfigError, match="set model.init_from"):
        compose(parity_overrides(tmp_path, data_cache, *LORA))
    err = attempt("finetune.lora.rank=-1")
    assert err.key == "finetune.lora.rank"
    err = attempt("finetune.lora.dropout=1.5")
    assert err.key == "finetune.lora.dropout"
