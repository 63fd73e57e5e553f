"""Alignment tuning on the reversal task: DPO against a frozen reference, GRPO with the rollout
pool; parity of both objectives across layouts; restarts; bad input.

The shared start: the session's tiny model pretrained on the sample corpus, briefly SFT'd on
the reversal task (data.seq_len=48 holds every prompt and answer whole) so that its held-out
greedy exact match is low but not zero. benchmarks/alignment.py runs the same at length."""
from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator import pretrained
from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.job import run_job
from orchestrator.synthetic import reverse_pairs, write_jsonl
from tests.conftest import QUIET, SINGLE

TASK = ("model=tiny", "precision=fp32", "data.seq_len=48", *QUIET)
PARITY_TOL = 1e-5


@pytest.fixture(scope="module")
def sft_start(reverse_task, tmp_path_factory, data_cache) -> Path:
    base, rows = reverse_task
    run_dir = tmp_path_factory.mktemp("align-sft")
    summary = run_job(compose(["+experiment=sft", *SINGLE, *TASK, f"run.dir={run_dir}", f"data.cache_dir={data_cache}",
                               f"model.init_from={base}", f"data.paths=[{rows}]", "trainer.max_steps=140",
                               "trainer.eval_every=140", "optim.lr=3e-3"]))
    assert summary["status"] == "succeeded", summary["error"]
    assert 0.02 <= summary["eval"]["val_exact_match"] <= 0.4, summary["eval"]
    return run_dir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(reverse_pairs(2000, seed=11, min_len=3, max_len=4), tmp_path_factory.mktemp("pairs") / "p.jsonl")


def dpo_job(run_dir, data_cache, start, pairs, strategy: str, workers: int, *extra: str):
    return compose(["+experiment=dpo", *TASK, f"strategy={strategy}", f"cluster.num_workers={workers}",
                    f"run.dir={run_dir}", f"data.cache_dir={data_cache}", f"model.init_from={start}",
                    f"data.paths=[{pairs}]", *extra])


def grpo_job(run_dir, data_cache, start, rows, strategy: str, workers: int, *extra: str):
    return compose(["+experiment=grpo", *TASK, f"strategy={strategy}", f"cluster.num_workers={workers}",
                    f"run.dir={run_dir}", f"data.cache_dir={data_cache}", f"model.init_from={start}",
                    f"data.paths=[{rows}]", "alignment.rollout.max_tokens=16", *extra])


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return pretrained.load_weights(pretrained.locate(str(run_dir)))


def assert_weights_close(got: dict, ref: dict, tol: float) -> None:
    assert got.keys() == ref.keys()
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= tol, f"largest weight difference {worst:.2e}"


# -- DPO ------------------------------------------------------------------------------------

_dpo_runs: dict = {}  # (run directory, summary) by strategy, shared by the DPO tests
PARITY_DPO = ("trainer.max_steps=10", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
              "trainer.eval_every=0", "optim.lr=1e-3")


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_dpo_matches_single(strategy, sft_start, pairs, tmp_path_factory, data_cache):
    runs = {}
    for name, workers in (("single", 1), (strategy, 2)):
        key = f"dpo-{name}"
        if key not in _dpo_runs:
            run_dir = tmp_path_factory.mktemp(key)
            summary = run_job(dpo_job(run_dir, data_cache, sft_start, pairs, name, workers, *PARITY_DPO))
            assert summary["status"] == "succeeded", summary["error"]
            _dpo_runs[key] = (run_dir, summary)
        runs[name] = _dpo_runs[key]
    ref, got = runs["single"][1], runs[strategy][1]
    assert len(got["losses"]) == len(ref["losses"]) == 10
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"]), start=1):
        assert abs(a - b) <= PARITY_TOL * abs(b), f"step {step}: {a!r} vs single {b!r}"
    # The first step starts at the reference: every margin is 0 and the loss is log 2.
    assert abs(ref["losses"][0] - 0.6931472) < 1e-5
    acc = ref["alignment"]["reward_accuracy_per_step"]
    assert len(acc) == 10 and acc[-1] > acc[0]



def test_dpo_resumes_with_its_reference_and_runs_with_lora(sft_start, pairs, tmp_path, data_cache):
    """A DPO run stopped at step 5 and resumed matches the run without a stop: the reference's
    log-probabilities come back from the checkpoint (the policy has moved by then). With LoRA the
    starting policy is the base (adapters start at zero), so the first loss is log 2 as well."""
    ref = _dpo_runs.get("dpo-single")
    if ref is None:
        run_dir = tmp_path / "full"
        ref = (run_dir, run_job(dpo_job(run_dir, data_cache, sft_start, pairs, "single", 1, *PARITY_DPO)))
        assert ref[1]["status"] == "succeeded", ref[1]["error"]
    stopped = dpo_job(tmp_path / "stopped", data_cache, sft_start, pairs, "zero2", 2, *PARITY_DPO,
                      "trainer.exit_at_step=5")
    first = run_job(stopped)
    assert first["status"] == "succeeded" and first["exited_early"], first["error"]
    resumed = run_job(dpo_job(tmp_path / "stopped", data_cache, sft_start, pairs, "zero2", 2, *PARITY_DPO,
                              "run.resume=true"))
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["start_step_per_attempt"] == [5]
    for step, (a, b) in enumerate(zip(resumed["losses"], ref[1]["losses"]), start=1):
        assert abs(a - b) <= PARITY_TOL * abs(b), f"step {step}: {a!r} vs uninterrupted {b!r}"

    lora = run_job(dpo_job(tmp_path / "lora", data_cache, sft_start, pairs, "ddp", 2, *PARITY_DPO,
                           "finetune.lora.rank=4", "optim.lr=5e-3"))
    assert lora["status"] == "succeeded", lora["error"]
    assert lora["n_trainable_params"] < 0.2 * lora["n_params"]
    assert abs(lora["losses"][0] - 0.6931472) < 1e-5 and lora["losses"][-1] < lora["losses"][0]


def test_dpo_raises_preference_accuracy_and_exact_match(sft_start, pairs, tmp_path, data_cache):
    # With RPO's likelihood term on the chosen answers: plain DPO lowers the likelihood of both
    # answers, and with it greedy exact match (benchmarks/alignment.py shows both).
    job = dpo_job(tmp_path, data_cache, sft_start, pairs, "single", 1, "trainer.max_steps=60", "trainer.eval_every=60",
                  "optim.lr=1e-3", "alignment.sft_weight=1.0")
    from orchestrator.evaluation import evaluate_init

    before = evaluate_init(job)
    summary = run_job(job)
    assert summary["status"] == "succeeded", summary["error"]
    after = summary["eval"]
    assert abs(before["val_preference_accuracy"] - 0.0) < 1e-9  # every margin is 0 at the reference
    assert after["val_preference_accuracy"] >= 0.9, after
    assert after["val_exact_match"] > before["val_exact_match"], (before, after)


# -- GRPO -----------------------------------------------------------------------------------

def test_grpo_learns_and_rollout_logprobs_match(sft_start, reverse_task, tmp_path, data_cache):
    """A shorter run than the benchmark's: held-out exact match rises by 15 points or more."""
    _, rows = reverse_task
    job = grpo_job(tmp_path, data_cache, sft_start, rows, "single", 1, "trainer.max_steps=150",
                   "trainer.eval_every=150", "trainer.global_batch_size=128", "optim.lr=1e-3",
                   "alignment.reward=orchestrator.synthetic:reversal_score")
    from orchestrator.evaluation import evaluate_init

    before = evaluate_init(job)["val_exact_match"]
    summary = run_job(job)
    assert summary["status"] == "succeeded", summary["error"]
    a = summary["alignment"]
    assert len(a["reward_mean_per_step"]) == 150
    assert summary["eval"]["val_exact_match"] >= before + 0.15, (before, summary["eval"])
    # The pool's log-probabilities of the samples and the trainer's, before each update (fp32).
    assert max(a["logprob_diff_max_per_step"]) <= 1e-4, max(a["logprob_diff_max_per_step"])
    for key in ("generate_s", "score_s", "train_s", "sync_s", "reward_std", "zero_spread_fraction",
                "response_length", "clip_fraction"):
        assert len(a[f"{key}_per_step"]) == 150 and a[key] is not None, key


PARITY_GRPO = ("trainer.max_steps=5", "trainer.global_batch_size=16", "trainer.micro_batch_size=4",
               "alignment.group_size=4", "trainer.eval_every=0", "optim.lr=1e-3",
               "alignment.reward=orchestrator.synthetic:reversal_score", "alignment.kl_coef=0.05")


def test_grpo_on_recorded_rollouts_matches_across_layouts(sft_start, reverse_task, tmp_path, data_cache):
    _, rows = reverse_task
    recorded = tmp_path / "recorded"
    live = run_job(grpo_job(recorded, data_cache, sft_start, rows, "single", 1, *PARITY_GRPO,
                            "alignment.rollout.record=true"))
    assert live["status"] == "succeeded", live["error"]
    assert len(list((recorded / "rollouts").iterdir())) == 5
    runs = {}
    for strategy, workers in (("single", 1), ("ddp", 2), ("zero2", 2)):
        run_dir = tmp_path / strategy
        summary = run_job(grpo_job(run_dir, data_cache, sft_start, rows, strategy, workers, *PARITY_GRPO,
                                   f"alignment.rollout.replay={recorded}"))
        assert summary["status"] == "succeeded", summary["error"]
        runs[strategy] = (summary, final_weights(run_dir))
    ref, ref_weights = runs["single"]
    # The replay reproduces the live run (same samples, same update).
    live_grads = [m["grad_norm"] for m in metrics(recorded)]
    assert [m["grad_norm"] for m in metrics(tmp_path / "single")] == pytest.approx(live_grads, rel=1e-6)
    assert_weights_close(ref_weights, final_weights(recorded), 1e-6)
    for strategy in ("ddp", "zero2"):
        got, weights = runs[strategy]
        for step, (a, b) in enumerate(zip(got["losses"], ref["losses"]), start=1):
            assert abs(a - b) <= PARITY_TOL, f"{strategy} step {step}: loss {a!r} vs single {b!r}"
        grads = [m["grad_norm"] for m in metrics(tmp_path / strategy)]
        ref_grads = [m["grad_norm"] for m in metrics(tmp_path / "single")]
        # The norm sums every gradient's square, in another order on each layout, of weights
        # already 1e-5 apart: 1e-4 relative (the CI machine once measured 1.04e-5 at step 5).
        assert grads == pytest.approx(ref_grads, rel=1e-4), strategy
        assert_weights_close(weights, ref_weights, PARITY_TOL)
        assert got["alignment"]["kl_per_step"] == pytest.approx(ref["alignment"]["kl_per_step"], rel=1e-4, abs=1e-7)


def test_grpo_restart_resumes_with_the_pool_resynced(sft_start, reverse_task, tmp_path, data_cache):
    import psutil

    _, rows = reverse_task
    run_dir = tmp_path / "run"
    job = grpo_job(run_dir, data_cache, sft_start, rows, "single", 1, "trainer.max_steps=14",
                   "trainer.checkpoint_every=3", "trainer.max_restarts=1", "trainer.eval_every=0",
                   "trainer.global_batch_size=32", "optim.lr=3e-3")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_job(job)))
    thread.start()
    kill_after = random.randint(4, 7)  # after the first checkpoint (step 3), before the second or third
    deadline = time.time() + 240
    while time.time() < deadline and not any(m["step"] >= kill_after for m in metrics(run_dir)):
        time.sleep(0.05)
    victims = [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(
        "ray::TrainWorker")]
    assert victims
    victims[0].kill()
    thread.join(300)
    summary = result
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["restarts"] == 1
    assert summary["start_step_per_attempt"][1] in (3, 6)
    # After the restart the trainer's weights are the checkpoint's, older than the pool's last ones:
    # samples drawn from the pool's would disagree. They agree: the pool was resynced first.
    diffs = summary["alignment"]["logprob_diff_max_per_step"]
    assert len(diffs) >= 14 and max(diffs) <= 1e-4, diffs  # per step of every attempt


# -- bad input ------------------------------------------------------------------------------

def test_bad_alignment_input_names_the_key(sft_start, reverse_task, pairs, tmp_path, data_cache):
    _, rows = reverse_task
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "Reverse:\na-b", "chosen": "b-a"}) + "\n")
    with pytest.raises(ConfigError) as err:
        run_job(dpo_job(tmp_path / "dpo", data_cache, sft_start, broken, "single", 1))
    assert err.value.key == "data.rejected_field"

    cases = {
        "alignment.group_size": ["alignment.group_size=1"],
        "alignment.reward": ["alignment.reward=no_such_module_here:fn"],
        "trainer.global_batch_size": ["trainer.global_batch_size=12"],  # not a multiple of group_size=8
        "alignment.temperature": ["alignment.temperature=0"],
    }
    for key, extra in cases.items():
        with pytest.raises(ConfigError) as err:
            grpo_job(tmp_path / "g", data_cache, sft_start, rows, "single", 1, *extra)
        assert err.value.key == key, (key, err.value)
    with pytest.raises(ConfigError) as err:  # one number per completion
        grpo_job(tmp_path / "g", data_cache, sft_start, rows, "single", 1, "alignment.reward=tests.test_alignment:bad_reward")
    assert err.value.key == "alignment.reward" and "one number per completion" in str(err.value)
    with pytest.raises(ConfigError) as err:
        grpo_job(tmp_path / "g", data_cache, sft_start, rows, "tp", 2)
    assert err.value.key == "alignment.method"
    with pytest.raises(ConfigError) as err:
        compose(["+experiment=dpo", *TASK, f"data.cache_dir={data_cache}", f"run.dir={tmp_path / 'x'}",
                 f"data.paths=[{pairs}]"])  # no model.init_from: no reference
    assert err.value.key == "model.init_from"
    # A pool the cluster cannot place: refused before any rank starts, nothing written but job.json.
    with pytest.raises(ConfigError) as err:
        run_job(grpo_job(tmp_path / "big", data_cache, sft_start, rows, "single", 1, "alignment.rollout.replicas=8"))
    assert err.value.key == "alignment.rollout.replicas"
    assert not (tmp_path / "big" / "checkpoints").exists()


def bad_reward(prompts, completions, references):
    return [1.0]  # one value whatever the number of completions


def test_preference_rows_as_chat_messages(sft_start, tmp_path, data_cache):
    """Messages rows render like string rows: the prompt's turns, then each answer's assistant
    turn; only the answers (and the closing EOS) are trained."""
    from tokenizers import Tokenizer

    from orchestrator.data import open_blocks, prepare

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse:\na-b-c"}],
             "chosen": [{"role": "assistant", "content": "c-b-a"}],
             "rejected": [{"role": "assistant", "content": "a-b-c"}]},
            {"prompt": "Reverse:\nd-e", "chosen": "e-d", "rejected": "d-e"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = dpo_job(tmp_path / "run", data_cache, sft_start, path, "single", 1, "trainer.global_batch_size=2",
                  "trainer.micro_batch_size=1", "data.val_fraction=0", "data.seq_len=96")
    tok = Tokenizer.from_file(str(sft_start / "tokenizer.json"))
    pairs_data = open_blocks(prepare(job.data, job.model.vocab_size, str(sft_start / "tokenizer.json")), 96, 0.0)
    x, y, ref = pairs_data.batch([0, 1])
    assert x.shape == (4, 96) and ref.shape == (4,)
    eos = tok.token_to_id("<|endoftext|>")
    text = [tok.decode([t for t in row.tolist() if t != eos]) for row in x]
    assert text[0] == "<|system|>\nBe brief.\n<|user|>\nReverse:\na-b-c\n<|assistant|>\nc-b-a\n"
    assert text[2] == "<|system|>\nBe brief.\n<|user|>\nReverse:\na-b-c\n<|assistant|>\na-b-c\n"
    assert text[1] == "<|user|>\nReverse:\nd-e\n<|assistant|>\ne-d\n"
    trained = [tok.decode([t for t in row.tolist() if t not in (eos, -100)]) for row in y]
    assert trained == ["c-b-a\n", "e-d\n", "a-b-c\n", "d-e\n"]
    assert [int((row == eos).sum()) for row in y] == [1, 1, 1, 1]  # each answer's closing EOS is trained
