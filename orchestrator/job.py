"""One job, end to end: connect to Ray, run the controller, return the summary."""
from __future__ import annotations

import contextlib
import functools

from orchestrator.clock import process_start_time
from orchestrator.cluster import connect, device_type
from orchestrator.config import JobConfig
from orchestrator.controller import JobController
from orchestrator.data import PreparedData, prepare, publish
from orchestrator.metrics import Sink, default_sinks
from orchestrator.storage import RunPlaces, Storage, places_of
from orchestrator.worker_group import RayWorkerGroup


def pretrained_tokenizer(job: JobConfig) -> str | None:
    if not job.model.init_from:
        return None
    from orchestrator import pretrained

    return pretrained.locate(job.model.init_from).tokenizer_path


def data_storage(job: JobConfig, places: RunPlaces) -> Storage | None:
    """Where the prepared data is published for the ranks: data.storage, else run.storage's data/
    folder where the run has storage of its own, else nowhere (ranks read the driver's cache)."""
    if job.data.storage:
        return Storage.at(job.data.storage, dict(job.run.storage_options))
    return places.storage.child("data") if places.separate_storage else None


def prepare_data(job: JobConfig, places: RunPlaces) -> PreparedData:
    data = prepare(job.data, job.model.vocab_size, tokenizer_path=pretrained_tokenizer(job),
                   storage_options=dict(job.run.storage_options))
    store = data_storage(job, places)
    return publish(data, store) if store is not None else data


@contextlib.contextmanager
def connected(job: JobConfig, run_id):
    """Ray connected and, for a GRPO job (unless it replays recorded rollouts), its rollout pool
    started from model.init_from; the pool goes down with the job. ``run_id()`` names the pool."""
    from orchestrator.alignment import rollout

    with connect(job.cluster, extra_cpus=rollout.cpus_needed(job)):
        pool = None
        if job.alignment.method == "grpo" and not job.alignment.rollout.replay:
            pool = rollout.start_pool(job, run_id())
        try:
            yield
        finally:
            if pool is not None:
                pool.shutdown()


def run_job(job: JobConfig, command_start: float | None = None, sinks: list[Sink] | None = None) -> dict:
    """Runs ``job`` on the embedded cluster (or cluster.address) and returns its summary."""
    device = functools.cache(lambda: device_type(job.cluster))  # asked once Ray is connected
    places = places_of(job)
    controller = JobController(
        job,
        make_group=lambda: RayWorkerGroup(job.cluster, job.cluster.num_workers, device(), job.run.name),
        prepare_data=lambda: prepare_data(job, places),
        sinks=default_sinks(job, places) if sinks is None else sinks,
        command_start=process_start_time() if command_start is None else command_start,
        connect=lambda: connected(job, lambda: controller.run_id),
        places=places,
    )
    return controller.run()
