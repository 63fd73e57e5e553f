"""Failures and checkpoints: restart after SIGKILL, interrupted saves, damaged and tampered
checkpoints, resharding across layouts, export to the Hugging Face format."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import checkpoint
from orchestrator.config import compose
from orchestrator.job import run_job
from tests.conftest import parity_overrides


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_workers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::TrainWorker"):
            out.append(p)
    return out


def test_sigkilled_worker_is_replaced_and_training_continues(ray_cluster, tmp_path, data_cache):
    # model=small makes steps slow enough (about a second) to kill a rank in the middle of the run.
    common = ["model=small", "strategy=ddp", "cluster.num_workers=2", "trainer.max_steps=8",
              "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.checkpoint_every=2",
              "trainer.sample_tokens=0", "precision=fp32", "logging.wandb.mode=disabled",
              "logging.progress=false", f"data.cache_dir={data_cache}"]
    full = run_job(compose(common + [f"run.dir={tmp_path / 'full'}"]))
    assert full["status"] == "succeeded"

    run_dir = tmp_path / "killed"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        run_job(compose(common + [f"run.dir={run_dir}", "trainer.max_restarts=2"]))))
    thread.start()
    kill_after = random.randint(3, 6)  # after the first checkpoint (step 2)
    deadline = time.time() + 240
    while time.time() < deadline and not any(r["step"] >= kill_after for r in records(run_dir)):
        time.sleep(0.1)
    victims = train_workers()
    assert victims, "no TrainWorker process found"
    victim = random.choice(victims)
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()

    assert result["status"] == "succeeded", result["error"]
    assert result["restarts"] == 1 and result["steps"] == 8
    # Losses from the restart on equal the uninterrupted run's (fp32, same seed).
    for step, (a, b) in enumerate(zip(result["losses"], full["losses"]), start=1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: {a} vs {b}"
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))  # no duplicate steps on disk
    after = [r for r in records(run_dir) if r["time"] > killed_at]
    recovery = after[0]["time"] - killed_at
    assert 0 < recovery < 120 and len(result["recoveries_s"]) == 1
    print(f"killed rank pid {victim.pid} after step {kill_after}; first step after restart {recovery:.1f}s later")


def test_interrupted_save_and_damaged_checkpoint_fall_back(ray_cluster, tmp_path, data_cache, caplog):
    run_dir = tmp_path / "run"
    base = parity_overrides(run_dir, data_cache, "strategy=ddp", "cluster.num_workers=2",
                            "trainer.checkpoint_every=3", "trainer.keep_checkpoints=3")
    first = run_job(compose(base + ["trainer.exit_at_step=6"]))
    assert first["status"] == "succeeded"
    root = checkpoint.checkpoint_root(run_dir)
    # A save killed halfway leaves only its aside directory, never a published one.
    partial = root / "step_00000009.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 100)
    assert checkpoint.latest(run_dir).name == "step_00000006"
    # A damaged published checkpoint is skipped for the previous good one, with a warning.
    model_file = root / "step_00000006" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="orchestrator.checkpoint"):
        assert checkpoint.latest(run_dir).name == "step_00000003"
    assert "step_00000006/model.safetensors has" in caplog.text and "manifest says" in caplog.text

    resumed = run_job(compose(base + ["run.resume=true"]))
    assert resumed["status"] == "succeeded" and resumed["steps"] == 10
    # Steps 4-6 ran again from the step-3 checkpoint and give the same losses.
    assert resumed["losses"][:6] == pytest.approx(first["losses"], rel=1e-6)


def test_a_planted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    (ckpt / "optimizer.safetensors").write_bytes(pickle.dumps(Payload()))
    (ckpt / "trainer.json").write_text(json.dumps({"step": 1, "sampler": {"consumed": 1}, "world_size": 1,
                                                   "strategy": "single"}))
    checkpoint.write_manifest(ckpt)  # even with a matching manifest, the loader parses no pickle
    with pytest.raises(Exception) as err:
        checkpoint.load_engine_state(ckpt)
    assert "pickle" not in type(err.value).__name__.lower()
    assert not marker.exists()


@pytest.mark.parametrize("source, target", [
    (("strategy=zero3", "cluster.num_workers=2"), ("strategy=single", "cluster.num_workers=1")),
    (("strategy=ddp", "cluster.num_workers=2"), ("strategy=zero2", "cluster.num_workers=3")),
    (("strategy=tp", "cluster.num_workers=2"), ("strategy=single", "cluster.num_workers=1")),
    (("strategy=single", "cluster.num_workers=1"), ("strategy=pp", "cluster.num_workers=2")),
])
def test_checkpoint_loads_into_another_layout(reference, tmp_path, data_cache, source, target):
    """Stopped at step 5 in one layout, resumed in another: step 6 is the uninterrupted
    single-process run's step 6 (every layout matches that run, tests/test_parity.py)."""
    run_dir = tmp_path / "run"
    stopped = run_job(compose(parity_overrides(run_dir, data_cache, *source, "trainer.exit_at_step=5")))
    assert stopped["status"] == "succeeded", stopped["error"]
    other = run_job(compose(parity_overrides(run_dir, data_cache, *target, "run.resume=true",
                                             "trainer.exit_at_step=6")))
    assert other["status"] == "succeeded", other["error"]
    assert other["strategy"] == target[0].split("=")[1]
    a, b = other["losses"][5], reference["losses"][5]  # step 6, the first after loading
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)


def test_export_loads_in_transformers_with_matching_logits(ray_cluster, tmp_path, data_cache):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.export import export
    from orchestrator.models import Llama
    from orchestrator.trainer import model_args

    run_dir = tmp_path / "run"
    job = compose(parity_overrides(run_dir, data_cache, "strategy=single", "cluster.num_workers=1",
                                   "trainer.max_steps=3"))
    assert run_job(job)["status"] == "succeeded"
    out = tmp_path / "hf"
    export(run_dir, out)

    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = Llama(model_args(job))
    ours.load_state_dict(load_file(str(checkpoint.latest(run_dir) / "model.safetensors")))
    ours.eval()
    text = ["ROMEO:\nBut soft, what light through yonder window breaks?", "First Citizen:\nSpeak, speak."]
    ids = [tok(t)["input_ids"] for t in text]
    from tokenizers import Tokenizer

    assert ids[0] == Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(text[0]).ids
    n = min(len(i) for i in ids)
    batch = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        theirs = hf(batch).logits
        mine = ours(batch)
    assert (theirs - mine).abs().max().item() < 1e-4
