"""A group of TrainWorker actors in one placement group (one bundle per rank).

The controller talks to a group only through the ``WorkerGroup`` protocol, so
its state machine can be tested with a fake group and no Ray cluster.
"""
from __future__ import annotations

import time

import uuid
from typing import Protocol

from orchestrator.config import ClusterConfig, JobConfig
from orchestrator.data import PreparedData
from orchestrator.errors import ConfigError
from orchestrator.plan import Plan
from orchestrator.results import TrainOutcome
from orchestrator.storage import RunPlaces, Storage


class WorkerFailure(RuntimeError):
    """A rank died or raised. ``rank`` is None when the group as a whole failed."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class WorkerGroup(Protocol):
    def setup(self, job: JobConfig, plan: Plan, places: RunPlaces, run_id: str, data: PreparedData,
              resume_from: Storage | None) -> int:
        """Check that every rank reaches the data and storage (ConfigError naming the key, node
        and path if not), rendezvous and build every rank's trainer, restored from the checkpoint
        ``resume_from`` if given; returns the step training resumes from."""

    def start_training(self) -> None: ...

    def poll(self, timeout_s: float) -> tuple[list[dict], list[TrainOutcome] | None]:
        """(new metrics from rank 0, every rank's outcome once all finished, else None).
        Raises WorkerFailure when a rank failed."""

    def saving_since(self) -> tuple[int, float] | None:
        """(step, time) of a checkpoint save rank 0 has started and not finished, else None."""

    def sample(self, prompt: str, max_new_tokens: int) -> str: ...

    def n_params(self) -> int: ...

    def shutdown(self) -> None: ...


class RayWorkerGroup:
    def __init__(self, cluster: ClusterConfig, world_size: int, device_type: str, job_name: str):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from orchestrator.worker import TrainWorker

        self.cluster = cluster
        self.world_size = world_size
        self.device_type = device_type
        gpus = 1 if device_type == "cuda" else 0
        bundle = {"CPU": cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        tag = f"{job_name}-{uuid.uuid4().hex[:6]}"
        self.pg = placement_group([dict(bundle) for _ in range(world_size)], strategy=cluster.placement_strategy,
                                  name=f"{tag}-pg")
        actor_cls = ray.remote(TrainWorker)
        # Created now, started by Ray as soon as the bundles are reserved: the
        # driver prepares data meanwhile.
        self.actors = [
            actor_cls.options(
                name=f"{tag}-rank{rank}",
                num_cpus=cluster.cpus_per_worker,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
            ).remote(rank, world_size, cluster.cpus_per_worker)
            for rank in range(world_size)
        ]
        self._train_refs: list = []
        self._outcomes: dict[int, TrainOutcome] = {}

    def _get(self, refs, what: str, timeout_s: float | None = None):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise WorkerFailure(f"{what} did not finish within {timeout_s:.0f}s") from None
        except (RayActorError, RayTaskError) as exc:
            raise WorkerFailure(f"{what} failed: {exc}") from exc

    def setup(self, job: JobConfig, plan: Plan, places: RunPlaces, run_id: str, data: PreparedData,
              resume_from: Storage | None) -> int:
        timeout = self.cluster.start_timeout_s
        if not self.pg.wait(timeout_seconds=int(timeout)):
            raise WorkerFailure(
                f"could not reserve {self.world_size} bundles of {self.pg.bundle_specs[0]} within {timeout:.0f}s; "
                "check cluster.num_workers, cluster.cpus_per_worker and the cluster's free resources"
            )
        problems = [p for found in self._get([a.check_access.remote(job, places, data) for a in self.actors],
                                             "storage and data access check", self.cluster.setup_timeout_s)
                    for p in found]
        if problems:
            raise ConfigError(problems[0].key, "; ".join(str(p) for p in problems))
        addr, port = self._get(self.actors[0].rendezvous_address.remote(), "rendezvous", timeout)
        local = self._local_ranks() if self._binds_cores() else [None] * self.world_size
        steps = self._get(
            [a.setup.remote(job, plan, places, run_id, resume_from, addr, port, self.device_type,
                            self.cluster.collective_timeout_s, local[rank])
             for rank, a in enumerate(self.actors)],
            "worker setup (cluster.setup_timeout_s)", self.cluster.setup_timeout_s,
        )
        return steps[0]

    def _binds_cores(self) -> bool:
        bind = self.cluster.bind_cores
        return self.device_type == "cpu" and (bind if bind is not None else self.cluster.address is None)

    def _local_ranks(self) -> list[tuple[int, int]]:
        """(index among the job's ranks on the same node, their number) for every rank; rank i
        runs in bundle i, whose node the reserved placement group records."""
        from ray.util import placement_group_table

        where = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = [where[rank] for rank in range(self.world_size)]
        return [(nodes[:rank].count(node), nodes.count(node)) for rank, node in enumerate(nodes)]

    def start_training(self) -> None:
        # Streaming generators: each rank's items come back as the rank yields them.
        self._train_refs = [a.train.options(num_returns="streaming").remote() for a in self.actors]
        self._outcomes = {}
        self._saving = None

    def saving_since(self) -> tuple[int, float] | None:
        """(step, when) of the checkpoint save rank 0 is in, if it is in one."""
        return self._saving

    def poll(self, timeout_s: float) -> tuple[list[dict], list[TrainOutcome] | None]:
        import ray

        pending = [g for rank, g in enumerate(self._train_refs) if rank not in self._outcomes]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
        metrics = []
        for rank, gen in enumerate(self._train_refs):
            if any(gen is g for g in ready):
                metrics += self._take(rank, gen)
        if len(self._outcomes) == self.world_size:
            return metrics, [self._outcomes[r] for r in range(self.world_size)]
        return metrics, None

    def _take(self, rank: int, gen) -> list[dict]:
        """Every item rank ``rank`` has yielded so far: its metrics; its outcome is recorded."""
        import ray

        metrics = []
        while rank not in self._outcomes and ray.wait([gen], timeout=0)[0]:
            try:
                ref = next(gen)
            except StopIteration:
                raise WorkerFailure(f"rank {rank} stopped training without an outcome", rank) from None
            kind, item = self._get(ref, f"rank {rank}")
            if kind == "saving":  # rank 0 starts a checkpoint save
                self._saving = (item, time.time())
                continue
            if rank == 0:
                self._saving = None
            if kind == "metrics":  # typed across Ray, a flat record from here on
                metrics.append(item.record())
            else:
                self._outcomes[rank] = item
        return metrics

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        return self._get(self.actors[0].sample.remote(prompt, max_new_tokens), "text sample", 300.0)

    def n_params(self) -> int:
        return self._get(self.actors[0].n_params.remote(), "parameter count", 60.0)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._train_refs and len(self._outcomes) == self.world_size:  # finished: leave the process group
            try:
                ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=5.0)
            except Exception:
                pass
        # Otherwise a rank may still be in a method (each runs one at a time): killing it ends it.
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass
        self.actors = []
