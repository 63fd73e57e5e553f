"""Reference point: how long Ray itself takes here before any rank can train.

python benchmarks/ray_start_floor.py OUT.json

Starts the same embedded cluster as the orchestrator (orchestrator.cluster.connect: the same
system config and worker preload of torch and torch._dynamo) and two plain actors, one CPU each,
and records when both have answered a call. No Hydra, no data, no model, no rendezvous, no step.
Time runs from this process's start, on the same clock as the orchestrator's summary and
benchmarks/ray_train_ttfs.py. Any design with one Ray actor per rank pays at least this, plus
its first step, before its first step ends.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator.clock import process_start_time  # noqa: E402

START = process_start_time()
WORLD = 2


def main() -> None:
    import ray

    from orchestrator.cluster import connect
    from orchestrator.config import ClusterConfig

    @ray.remote(num_cpus=1)
    class Rank:
        def ready(self) -> bool:
            import torch  # noqa: F401  (the preload has imported it: this is a dictionary lookup)

            return True

    with connect(ClusterConfig(num_workers=WORLD)):
        connected = time.time()
        ray.get([Rank.remote().ready.remote() for _ in range(WORLD)])
        ready = time.time()
    with open(sys.argv[1], "w") as f:  # not benchmarks.common: it imports torch, which this process needs not
        json.dump({"connected_s": connected - START, "actors_ready_s": ready - START}, f)


if __name__ == "__main__":
    main()
