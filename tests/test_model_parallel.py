"""Tensor, pipeline and hybrid parallel: parity with the single-process reference, the
pipeline's bubble report, resume of these layouts, and bad layouts refused up front."""
from __future__ import annotations

import pytest

from orchestrator import checkpoint
from orchestrator.config import compose
from orchestrator.errors import ConfigError
from orchestrator.job import run_job
from tests.conftest import assert_losses_close, parity_overrides

REL_TOL = 1e-4  # the bound; the runs here agree with the reference to about 2e-7
DEEP = "model.n_layers=4"  # pp=2 x 2 virtual stages needs 4 layers
_runs: dict = {}


def layout_run(tmp_path_factory, data_cache, *overrides: str) -> dict:
    if overrides not in _runs:
        run_dir = tmp_path_factory.mktemp("layout")
        _runs[overrides] = run_job(compose(parity_overrides(run_dir, data_cache, *overrides)))
        _runs[overrides]["run_dir"] = str(run_dir)
    return _runs[overrides]


@pytest.fixture(scope="module")
def deep_reference(ray_cluster, tmp_path_factory, data_cache) -> dict:
    summary = layout_run(tmp_path_factory, data_cache, "strategy=single", "cluster.num_workers=1", DEEP)
    assert summary["status"] == "succeeded", summary["error"]
    return summary


LAYOUTS = {
    "tp2": ("strategy=tp", "strategy.tp=2", "cluster.num_workers=2"),
    "pp2-gpipe": ("strategy=pp", "strategy.schedule=gpipe", "cluster.num_workers=2"),
    "pp2-1f1b": ("strategy=pp", "strategy.schedule=1f1b", "cluster.num_workers=2"),
    "pp2-interleaved": ("strategy=pp", "strategy.schedule=interleaved_1f1b", "strategy.virtual_stages=2",
                        "cluster.num_workers=2", DEEP),
    "dp2xtp2": ("strategy=hybrid", "strategy.tp=2", "strategy.pp=1", "cluster.num_workers=4"),
    "dp2xtp2-sharded-sp": ("strategy=hybrid", "strategy.tp=2", "strategy.pp=1", "strategy.data_parallel=shard",
                           "strategy.sequence_parallel=true", "cluster.num_workers=4"),
    "pp2xtp2-sp": ("strategy=hybrid", "strategy.tp=2", "strategy.pp=2", "strategy.sequence_parallel=true",
                   "cluster.num_workers=4"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single(reference, deep_reference, tmp_path_factory, data_cache, ray_cluster, name):
    overrides = LAYOUTS[name]
    summary = layout_run(tmp_path_factory, data_cache, *overrides)
    assert summary["status"] == "succeeded", summary["error"]
    ref = deep_reference if DEEP in overrides else reference
    assert_losses_close(summary["losses"], ref["losses"], REL_TOL)


@pytest.mark.parametrize("name, p, m, v", [("pp2-gpipe", 2, 4, 1), ("pp2-interleaved", 2, 4, 2)])
def test_pipeline_reports_its_bubble_next_to_theory(tmp_path_factory, data_cache, ray_cluster, name, p, m, v):
    summary = layout_run(tmp_path_factory, data_cache, *LAYOUTS[name])
    pipe = summary["pipeline"]
    assert pipe["theoretical_bubble_fraction"] == pytest.approx((p - 1) / (v * m + p - 1))
    assert 0.0 < pipe["bubble_fraction"] < 1.0
    per_step = pipe["bubble_fraction_per_step"]
    assert len(per_step) == summary["steps"] and all(0.0 <= b < 1.0 for b in per_step)


def test_hybrid_layout_resumes_exactly(tmp_path_factory, data_cache, ray_cluster, tmp_path):
    overrides = LAYOUTS["pp2xtp2-sp"]
    full = layout_run(tmp_path_factory, data_cache, *overrides)
    stopped = run_job(compose(parity_overrides(tmp_path, data_cache, *overrides, "trainer.exit_at_step=5")))
    assert stopped["status"] == "succeeded" and stopped["steps"] == 5
    resumed = run_job(compose(parity_overrides(tmp_path, data_cache, *overrides, "run.resume=true")))
    assert resumed["status"] == "succeeded" and resumed["steps"] == 10
    assert_losses_close(resumed["losses"], full["losses"], 1e-6)
    assert checkpoint.latest(checkpoint.in_run(tmp_path)).name == "step_00000010"


BASE = ["model=tiny", "run.dir=/tmp/unused", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"]


@pytest.mark.parametrize("overrides, key, words", [
    (["strategy=tp", "strategy.tp=3", "cluster.num_workers=3"], "model.n_heads", "not divisible by tp=3"),
    (["strategy=tp", "strategy.tp=4", "cluster.num_workers=4", "model.n_heads=8", "model.dim=128"],
     "model.n_kv_heads", "not divisible by tp=4"),
    (["strategy=tp", "strategy.tp=2", "cluster.num_workers=2", "model.vocab_size=513"], "model.vocab_size",
     "not divisible by tp=2"),
    (["strategy=hybrid", "strategy.tp=2", "strategy.pp=2", "cluster.num_workers=6"], "cluster.num_workers",
     "not divisible by tp*pp"),
    (["strategy=pp", "strategy.pp=2", "strategy.schedule=interleaved_1f1b", "strategy.virtual_stages=2",
      "cluster.num_workers=2"], "model.n_layers", "pp * virtual_stages"),
    (["strategy=pp", "strategy.pp=4", "strategy.microbatches=2", "cluster.num_workers=4", "model.n_layers=4"],
     "strategy.microbatches", "at least pp=4"),
    (["strategy=pp", "strategy.microbatches=3", "cluster.num_workers=2"], "strategy.microbatches",
     "not divisible into 3"),
    (["strategy=pp", "strategy.schedule=zb", "cluster.num_workers=2"], "strategy.schedule", "gpipe, 1f1b"),
    (["strategy=pp", "strategy.virtual_stages=2", "cluster.num_workers=2", "model.n_layers=4"],
     "strategy.virtual_stages", "interleaved_1f1b"),
    (["strategy=tp", "cluster.num_workers=2", "strategy.data_parallel=zero"], "strategy.data_parallel",
     "replicate, shard"),
    (["strategy=tp", "cluster.num_workers=2", "strategy.sequence_parallel=true", "data.seq_len=63"],
     "data.seq_len", "sequence_parallel"),
])
def test_bad_layouts_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        compose(BASE + overrides)
    assert err.value.key == key, err.value
    assert words in str(err.value)

