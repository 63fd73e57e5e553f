"""A run stopped at step 5 and resumed to step 10 gives the uninterrupted run's losses."""
from __future__ import annotations

import json

from orchestrator import checkpoint
from orchestrator.job import run_job


def test_resume_matches_uninterrupted(ray_cluster, make_job, tmp_path):
    common = ("strategy=ddp", "cluster.num_workers=2", "trainer.max_steps=10", "precision=fp32")
    full = run_job(make_job(*common, run_dir=tmp_path / "full"))
    assert full["status"] == "succeeded"

    # An empty text-sample prompt starts a fresh document; it must not fail the finished job.
    stopped = run_job(make_job(*common, "trainer.exit_at_step=5", "trainer.sample_tokens=4", "trainer.sample_prompt=''",
                               run_dir=tmp_path / "split"))
    assert stopped["status"] == "succeeded" and stopped["exited_early"], stopped["error"]
    assert isinstance(stopped["sample"], str) and "sample_error" not in stopped
    assert stopped["steps"] == 5
    ckpt = checkpoint.latest(checkpoint.in_run(tmp_path / "split"))
    assert ckpt is not None and ckpt.name == "step_00000005"
    assert checkpoint.read_trainer_state(ckpt).sampler == {"consumed": 5 * 8}

    # A driver killed while writing leaves half a line at the end of metrics.jsonl: no obstacle.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')
    # A text-sample prompt far longer than the model's context keeps its end.
    resumed = run_job(make_job(*common, "run.resume=true", "trainer.sample_tokens=4",
                               f"trainer.sample_prompt={'ROMEO: ' * 400}", run_dir=tmp_path / "split"))
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["sample"].startswith("ROMEO: ROMEO:") and "sample_error" not in resumed
    assert resumed["steps"] == 10
    # Bit-for-bit: same ops in the same order on the same state.
    assert resumed["losses"] == full["losses"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert checkpoint.latest(checkpoint.in_run(tmp_path / "split")).name == "step_00000010"
