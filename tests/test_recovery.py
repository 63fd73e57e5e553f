"""Failures and checkpoints: restart after SIGKILL, interrupted saves, damaged and tampered
checkpoints, resharding across layouts, export to the Hugging Face format."""
from __future__ import annotations

import io
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
    root = run_dir / "checkpoints"
    ckpts = checkpoint.in_run(run_dir)
    # A save killed halfway leaves its files without a manifest: never taken.
    partial = root / "step_00000009"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00" * 100)
    assert checkpoint.latest(ckpts).name == "step_00000006"
    # A damaged published checkpoint is skipped for the previous good one, with a warning.
    data_file = sorted((root / "step_00000006").glob("__*.distcp"))[0]
    data_file.write_bytes(data_file.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="orchestrator.checkpoint"):
        assert checkpoint.latest(ckpts).name == "step_00000003"
    assert f"step_00000006/{data_file.name} has" in caplog.text and "manifest says" in caplog.text
    assert "step_00000009: no manifest.json" in caplog.text

    resumed = run_job(compose(base + ["run.resume=true"]))
    assert resumed["status"] == "succeeded" and resumed["steps"] == 10
    # Steps 4-6 ran again from the step-3 checkpoint and give the same losses.
    assert resumed["losses"][:6] == pytest.approx(first["losses"], rel=1e-6)


class Payload:
    """Unpickling it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("planted", [".metadata", "data", "entry"])
def test_a_planted_pickle_is_refused_without_running(tmp_path, planted):
    """DCP's .metadata is a pickle, its data files are torch.save archives, and it pickles entries
    that are not tensors: none of them runs code when a checkpoint is read."""
    import torch

    from orchestrator import dcp

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    state = {"model.w": torch.ones(3)}
    if planted == "entry":
        state["model.extra"] = Payload(marker)
    dcp.save(state, str(ckpt), {}, False, None)
    if planted == ".metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif planted == "data":
        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        for f in ckpt.glob("__*.distcp"):
            f.write_bytes(buf.getvalue())
    with pytest.raises(Exception) as err:
        target = {"model.w": torch.zeros(3)}
        if planted == "entry":
            target["model.extra"] = None
        dcp.load(target, str(ckpt), {})
    assert not marker.exists(), err.value


@pytest.mark.parametrize("source, target", [
    (("strategy=zero3", "cluster.num_workers=2"), ("strategy=single", "cluster.num_workers=1")),
    (("strategy=ddp", "cluster.num_workers=2"), ("strategy=zero2", "cluster.num_workers=3")),
    (("strategy=tp", "cluster.num_workers=2"), ("strategy=single", "cluster.num_workers=1")),
    (("strategy=single", "cluster.num_workers=1"), ("strategy=pp", "cluster.num_workers=2")),
    (("strategy=zero3", "cluster.num_workers=2"), ("strategy=zero3", "cluster.num_workers=3")),
    (("strategy=hybrid", "strategy.tp=2", "strategy.pp=1", "cluster.num_workers=4"),
     ("strategy=ddp", "cluster.num_workers=2")),
])
def test_checkpoint_loads_into_another_layout(reference, tmp_path, data_cache, source, target):
    """Stopped at step 5 in one layout, resumed in another: steps 6 and 7 are the uninterrupted
    single-process run's (every layout matches that run, tests/test_parity.py). Step 6 checks the
    loaded weights, step 7 the loaded AdamW moments and schedule too."""
    run_dir = tmp_path / "run"
    stopped = run_job(compose(parity_overrides(run_dir, data_cache, *source, "trainer.exit_at_step=5")))
    assert stopped["status"] == "succeeded", stopped["error"]
    other = run_job(compose(parity_overrides(run_dir, data_cache, *target, "run.resume=true",
                                             "trainer.exit_at_step=7")))
    assert other["status"] == "succeeded", other["error"]
    assert other["strategy"] == target[0].split("=")[1]
    for step in (6, 7):
        a, b = other["losses"][step - 1], reference["losses"][step - 1]
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


def test_export_loads_in_transformers_with_matching_logits(ray_cluster, tmp_path, data_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator import dcp
    from orchestrator.export import export
    from orchestrator.models import Llama
    from orchestrator.trainer import model_args

    run_dir = tmp_path / "run"
    job = compose(parity_overrides(run_dir, data_cache, "strategy=single", "cluster.num_workers=1",
                                   "trainer.max_steps=3"))
    assert run_job(job)["status"] == "succeeded"
    out = tmp_path / "hf"
    export(str(run_dir), out)

    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = Llama(model_args(job))
    ours.load_state_dict(dcp.read_full(checkpoint.latest(checkpoint.in_run(run_dir)).root, {}, "model."))
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
