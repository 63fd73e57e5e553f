"""TrainWorker: one Ray actor per rank, wrapping a Trainer.

``train`` is a generator that the controller calls as a Ray streaming generator: rank 0's
metrics reach the driver as each step ends, and the actor needs no second thread. (A threaded
actor's idle main thread wakes every 10 ms to check for signals and takes the GIL each time,
from under the training thread.)
torch is imported in the actor's methods: the driver imports this module only
to name the actor class.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta

from orchestrator.config import JobConfig
from orchestrator.data import PreparedData, localize
from orchestrator.storage import RunPlaces, Storage, apply_env


@dataclass(frozen=True)
class AccessProblem:
    """A rank that cannot read the job's data or write its storage: the config key to fix."""

    key: str
    rank: int
    node: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"rank {self.rank} on node {self.node} cannot {self.reason}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def bind_cores(local_rank: int, local_world: int, per_rank: int) -> list[int] | None:
    """Pins this process, every thread of it, to cores of its own: local rank i takes the i-th
    group of ``per_rank`` of the cores it may run on (threads started later inherit it). Returns
    the cores, or None (nothing pinned) where they do not go round or the OS has no affinity."""
    if not (hasattr(os, "sched_getaffinity") and os.path.isdir("/proc/self/task")):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < local_world * per_rank:
        return None
    mine = set(allowed[local_rank * per_rank:(local_rank + 1) * per_rank])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:  # a thread that has just ended
            pass
    return sorted(os.sched_getaffinity(0))


class TrainWorker:
    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank = rank
        self.world_size = world_size
        self.threads = threads
        import torch

        torch.set_num_threads(threads)
        self.trainer = None
        self.tokenizer_path = ""
        self.cores: list[int] | None = None
        self.data: PreparedData | None = None

    def __repr__(self) -> str:  # shown by Ray's logs and dashboard
        return f"TrainWorker(rank={self.rank})"

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def check_access(self, job: JobConfig, places: RunPlaces, data: PreparedData) -> list[AccessProblem]:
        """Before any collective: this rank's node can read the data (a published copy is
        downloaded to the node's cache now) and write the run's storage. Returns what it cannot."""
        import ray

        apply_env(places.env)
        node = f"{ray.util.get_node_ip_address()} (Ray node {ray.get_runtime_context().get_node_id()[:8]})"
        problems = []
        data_key = "data.storage" if job.data.storage else "run.storage"
        try:
            self.data = localize(data, job.data.cache_dir)
        except Exception as exc:
            where = data.remote.root if data.remote else data.tokens_path
            hint = ("" if data.remote else "; without run.storage the ranks read the driver's own files: set "
                    "run.storage to a path every node mounts or an object store such as s3://bucket/prefix")
            problems.append(AccessProblem(data_key, self.rank, node, where, f"read the prepared data at {where}: "
                                                                            f"{type(exc).__name__}: {exc}{hint}"))
        try:
            places.storage.probe_write(f"rank{self.rank}-{uuid.uuid4().hex[:8]}")
        except Exception as exc:
            problems.append(AccessProblem("run.storage", self.rank, node, places.storage.root,
                                          f"write the run's storage at {places.storage.root}: "
                                          f"{type(exc).__name__}: {exc}"))
        return problems

    def setup(self, job: JobConfig, plan, places: RunPlaces, run_id: str, resume_from: Storage | None, master_addr: str,
              master_port: int, device_type: str, timeout_s: float, local: tuple[int, int] | None = None) -> int:
        """After check_access. ``local``: (this rank's index among the job's ranks on its node, their
        number), given when the rank's process is to be bound to cores of its own (CPU ranks only)."""
        import torch
        import torch.distributed as dist

        from orchestrator.trainer import Trainer

        if device_type == "cuda":
            device = torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
            if local is not None:
                self.cores = bind_cores(*local, self.threads)
        # Also at world size 1: DeepSpeed expects a process group. The variables are the
        # torch.distributed convention, for libraries that read them.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not dist.is_initialized():
            dist.init_process_group(
                backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                world_size=self.world_size, timeout=timedelta(seconds=timeout_s),
            )
        self.tokenizer_path = self.data.tokenizer_path
        self.trainer = Trainer(job, plan, places, run_id, self.rank, device, self.data, resume_from)
        return self.trainer.step

    def train(self):
        """Yields ("metrics", orchestrator.results.StepMetrics) after every step on rank 0 (and
        ("saving", step) when a save starts), then ("outcome", TrainOutcome) on every rank."""
        import ray

        from orchestrator.trainer import SaveNotice

        steps = self.trainer.run()
        while True:
            try:
                metrics = next(steps)
            except StopIteration as end:
                outcome = end.value
                break
            if isinstance(metrics, SaveNotice):
                yield "saving", metrics.step
            else:
                yield "metrics", metrics
        yield "outcome", replace(outcome, node_id=ray.get_runtime_context().get_node_id(), cores=self.cores,
                                 nice=os.nice(0))

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        return self.trainer.sample(self.tokenizer_path, prompt, max_new_tokens)

    def n_params(self) -> int:
        return self.trainer.n_params

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
