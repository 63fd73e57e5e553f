"""Parity: every strategy against the single-process reference on the same data and seed."""
from __future__ import annotations

import pytest

from orchestrator.job import run_job

REL_TOL = 1e-5
STEPS = 10


def assert_losses_close(got: list[float], ref: list[float], rel: float) -> None:
    assert len(got) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: {a!r} vs reference {b!r} (rel {abs(a - b) / abs(b):.2e})"


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory, data_cache):
    from orchestrator.config import compose

    job = compose([
        "model=tiny", "strategy=single", "cluster.num_workers=1", f"trainer.max_steps={STEPS}",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.sample_tokens=0",
        f"run.dir={tmp_path_factory.mktemp('ref')}", f"data.cache_dir={data_cache}",
        "logging.wandb.mode=disabled", "logging.progress=false", "precision=fp32",
    ])
    summary = run_job(job)
    assert summary["status"] == "succeeded"
    return summary


def test_reference_learns(reference):
    losses = reference["losses"]
    assert losses[-1] < losses[0] - 0.2, losses


def test_ddp_two_workers_matches_single(reference, make_job):
    summary = run_job(make_job("strategy=ddp", "cluster.num_workers=2", f"trainer.max_steps={STEPS}", "precision=fp32"))
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["world_size"] == 2
    assert_losses_close(summary["losses"], reference["losses"], REL_TOL)
