"""The finetuning task, short (benchmarks/finetune.py runs it at length): a tiny model pretrained
on the sample corpus cannot reverse held-out words; after SFT it can, and after LoRA with under
5% of its parameters trainable it can too. Words of 3-4 letters, single process."""
from __future__ import annotations

import pytest

from orchestrator.config import compose
from orchestrator.evaluation import evaluate_init
from orchestrator.job import run_job

from tests.conftest import QUIET, SINGLE


@pytest.fixture(scope="module")
def task(reverse_task):
    return reverse_task


def finetune_job(kind: str, steps: int, run_dir, data_cache, task, *extra: str):
    base, rows = task
    return compose([f"+experiment={kind}", *SINGLE, *QUIET, f"run.dir={run_dir}", f"data.cache_dir={data_cache}",
                    f"model.init_from={base}", f"data.paths=[{rows}]", "data.seq_len=32",
                    f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", *extra])


def test_sft_then_lora_learn_what_the_base_cannot(task, tmp_path, data_cache):
    sft = finetune_job("sft", 400, tmp_path / "sft", data_cache, task, "optim.lr=3e-3")
    before = evaluate_init(sft)
    assert before["val_examples"] == 96  # 5% of 2,000 rows held out, in whole micro-batches
    assert before["val_exact_match"] == 0.0

    after = run_job(sft)
    assert after["status"] == "succeeded", after["error"]
    assert after["eval"]["step"] == 400 and after["eval"]["val_exact_match"] >= 0.9, after["eval"]

    lora = run_job(finetune_job("lora", 800, tmp_path / "lora", data_cache, task, "optim.lr=5e-3",
                                "finetune.lora.rank=8", "finetune.lora.target_modules=[wq,wk,wv,wo]"))
    assert lora["status"] == "succeeded", lora["error"]
    assert lora["n_trainable_params"] < 0.05 * lora["n_params"]
    assert lora["eval"]["val_exact_match"] >= 0.8, lora["eval"]
