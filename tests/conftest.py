"""Shared fixtures: one local Ray cluster per test session, one data cache, tiny jobs."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one; 4 logical CPUs fit a 4-rank job."""
    import ray

    from orchestrator.cluster import init_loopback

    init_loopback(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """This process's environment with ``values`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server (SeaweedFS on 127.0.0.1) for the whole session, its endpoint and
    credentials in this process's environment (where s3fs looks, and what jobs forward to ranks)."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"), bucket="forgeline").start()
    try:
        with environment(server.env()):
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3, request):
    """A fresh prefix of the session's bucket for this test."""
    import uuid

    return f"s3://{s3.bucket}/{request.node.name.split('[')[0][:40]}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_job(tmp_path, data_cache):
    """Composes a job through the real Hydra tree with test-friendly defaults."""
    from orchestrator.config import compose

    def make(*overrides: str, run_dir: Path | None = None):
        base = [
            "model=tiny",
            f"run.dir={run_dir or tmp_path / 'run'}",
            f"data.cache_dir={data_cache}",
            "logging.wandb.mode=disabled",
            "logging.progress=false",
            "trainer.sample_tokens=0",
            "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2",
        ]
        return compose(base + list(overrides))

    return make


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.train", *args]


PARITY_STEPS = 10
PARITY_BATCH = ("trainer.global_batch_size=12", "trainer.micro_batch_size=2")  # divides dp = 1, 2, 3


def parity_overrides(run_dir: Path, data_cache: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"trainer.max_steps={PARITY_STEPS}", *PARITY_BATCH, "trainer.sample_tokens=0",
            f"run.dir={run_dir}", f"data.cache_dir={data_cache}", "logging.wandb.mode=disabled",
            "logging.progress=false", "precision=fp32", *extra]


def single_run(tmp_path_factory, data_cache, name: str, *extra: str) -> tuple[Path, dict]:
    """A finished single-process parity-sized run (run directory, summary), e.g. a model to start from."""
    from orchestrator.config import compose
    from orchestrator.job import run_job

    run_dir = tmp_path_factory.mktemp(name)
    summary = run_job(compose(parity_overrides(run_dir, data_cache, "strategy=single", "cluster.num_workers=1",
                                               *extra)))
    assert summary["status"] == "succeeded", summary["error"]
    return run_dir, summary


@pytest.fixture(scope="session")
def serve_source(ray_cluster, tmp_path_factory, data_cache) -> Path:
    """A checkpoint to serve whose greedy continuations vary (weights drawn wide, two steps)."""
    return single_run(tmp_path_factory, data_cache, "serve-source", "trainer.max_steps=2", "model.init_std=0.3")[0]


@pytest.fixture(scope="session")
def reference(ray_cluster, tmp_path_factory, data_cache) -> dict:
    """The single-process run every strategy is compared with."""
    from orchestrator.config import compose
    from orchestrator.job import run_job

    job = compose(parity_overrides(tmp_path_factory.mktemp("reference"), data_cache, "strategy=single",
                                   "cluster.num_workers=1"))
    summary = run_job(job)
    assert summary["status"] == "succeeded", summary["error"]
    return summary


QUIET = ("logging.wandb.mode=disabled", "logging.progress=false", "trainer.sample_tokens=0")
SINGLE = ("model=tiny", "strategy=single", "cluster.num_workers=1", "precision=fp32")


@pytest.fixture(scope="session")
def reverse_task(ray_cluster, tmp_path_factory, data_cache) -> tuple[Path, Path]:
    """(a tiny model pretrained on the sample corpus, 2,000 rows of the reversal task with words of
    3-4 letters): the finetuning and alignment tasks start from these."""
    from orchestrator.config import compose
    from orchestrator.job import run_job
    from orchestrator.synthetic import reverse_words, write_jsonl

    base = tmp_path_factory.mktemp("task-base")
    summary = run_job(compose(["+experiment=pretrain", *SINGLE, *QUIET, f"run.dir={base}", f"data.cache_dir={data_cache}",
                               "trainer.max_steps=300", "trainer.checkpoint_every=0", "trainer.eval_every=0",
                               "optim.lr=3e-3"]))
    assert summary["status"] == "succeeded", summary["error"]
    rows = write_jsonl(reverse_words(2000, seed=11, min_len=3, max_len=4),
                       tmp_path_factory.mktemp("task-data") / "reverse.jsonl")
    return base, rows


def assert_losses_close(got: list[float], ref: list[float], rel: float) -> None:
    assert len(got) == len(ref) == PARITY_STEPS
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        assert abs(a - b) <= rel * abs(b), f"step {step}: {a!r} vs reference {b!r} (rel {abs(a - b) / abs(b):.2e})"
