"""The command a user runs, end to end, on its own embedded Ray cluster."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings

import psutil
import pytest

from tests.conftest import ROOT, cli

SUMMARY_KEYS = {"status", "strategy", "world_size", "steps", "losses", "final_loss", "tokens_per_s",
                "time_to_first_step_s", "wall_s", "peak_rss_bytes_per_rank"}


def test_train_command_end_to_end(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        cli("model=tiny", "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.sample_tokens=20",
            f"run.dir={run_dir}", f"data.cache_dir={data_cache}"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "status" in proc.stdout and "succeeded" in proc.stdout
    assert "Sample from the trained model" in proc.stdout and "ROMEO:" in proc.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "step_time_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "succeeded" and summary["strategy"] == "ddp" and summary["world_size"] == 2
    assert summary["steps"] == 6 and summary["losses"] == [r["loss"] for r in records]
    assert summary["final_loss"] == records[-1]["loss"]
    assert 0 < summary["time_to_first_step_s"] < summary["wall_s"]
    assert len(summary["peak_rss_bytes_per_rank"]) == 2 and min(summary["peak_rss_bytes_per_rank"]) > 0
    # The embedded cluster runs its ranks at normal priority (Ray's default for workers is nice 15).
    assert summary["nice_per_rank"] == [os.nice(0), os.nice(0)]

    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(run_dir / "tokenizer.json")).get_vocab_size() == 512  # saved with the run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (run_dir / "checkpoints" / "step_00000006" / "manifest.json").is_file()

    # wandb wrote an offline run that `wandb sync` can upload later.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_tear_everything_down(tmp_path, data_cache, sig):
    run_dir = tmp_path / "run"
    log = tmp_path / "out.log"
    with open(log, "w") as out:  # a file, not a pipe: a pipe's end also waits on every process holding it
        proc = subprocess.Popen(
            cli("model=tiny", "trainer.max_steps=100000", f"run.dir={run_dir}", f"data.cache_dir={data_cache}",
                "logging.wandb.mode=disabled"),
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 3  # Ray's processes and the two workers
    if sig == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    else:
        os.kill(proc.pid, signal.SIGTERM)  # as launch.stop through Ray Jobs, a scheduler, `kill`
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running 120 s after {sig.name}:\n" + log.read_text()[-5000:])
    out = log.read_text()
    assert proc.returncode == 128 + sig, out[-5000:]
    if "teardown still running" in out:  # the deadline's path: it left, but show where teardown was stuck
        warnings.warn("Ctrl-C teardown hit its deadline:\n" + out[-5000:])
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["error"] == f"stopped by {sig.name}", summary
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
