"""A run stopped at step 5 and resumed to step 10 gives the uninterrupted run's losses."""
from __future__ import annotations

import json

from orchestrator import checkpoint
from orchestrator.job import run_job


def test_resume_matches_uninterrupted(ray_cluster, make_job, tmp_path):
    common = ("strategy=ddp", "cluster.num_workers=2", "trainer.max_steps=10", "precision=fp32")
    full = run_job(make_job(*common, run_dir=tmp_path / "full"))
    assert full["status"] == "succeeded"

    stopped = run_job(make_job(*common, "trainer.exit_at_step=5", run_dir=tmp_path / "split"))
    assert stopped["status"] == "succeeded" and stopped["exited_early"]
    assert stopped["steps"] == 5
    ckpt = checkpoint.latest(checkpoint.in_run(tmp_path / "split"))
    assert ckpt is not None and ckpt.name == "step_00000005"
    assert checkpoint.read_trainer_state(ckpt).sampler == {"consumed": 5 * 8}

    resumed = run_job(make_job(*common, "run.resume=true", run_dir=tmp_path / "split"))
    assert resumed["status"] == "succeeded"
    assert resumed["steps"] == 10
    # Bit-for-bit: same ops in the same order on the same state.
    assert resumed["losses"] == full["losses"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert checkpoint.latest(checkpoint.in_run(tmp_path / "split")).name == "step_00000010"
