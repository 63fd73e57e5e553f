"""Parity: data parallel against the single-process reference on the same data and seed."""
from __future__ import annotations

from orchestrator.config import compose
from orchestrator.job import run_job
from tests.conftest import assert_losses_close, parity_overrides

REL_TOL = 1e-5


def test_reference_learns(reference):
    losses = reference["losses"]
    assert losses[-1] < losses[0] - 0.15, losses  # 10 steps, the last of them still in warm-up


def test_ddp_two_workers_matches_single(reference, tmp_path, data_cache):
    summary = run_job(compose(parity_overrides(tmp_path, data_cache, "strategy=ddp", "cluster.num_workers=2")))
    assert summary["status"] == "succeeded", summary["error"]
    assert summary["world_size"] == 2
    assert_losses_close(summary["losses"], reference["losses"], REL_TOL)
