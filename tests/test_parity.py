"""Parity: data parallel against the single-process reference on the same data and seed."""
from __future__ import annotations

import os

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
    # The test cluster is embedded, so each CPU rank is bound to a core of its own (as the
    # workers' OS reports it) wherever two cores are there to give.
    cores = summary["cores_per_rank"]
    if len(os.sched_getaffinity(0)) >= 2:
        assert all(c and len(c) == 1 for c in cores) and cores[0] != cores[1], cores
    else:
        assert cores == [None, None], cores
