"""Baseline: time to first step of the same job under Ray Train's TorchTrainer.

python benchmarks/ray_train_ttfs.py OUT.json STEPS [hydra overrides]
Time is measured from this process's start to the end of step 1 on rank 0.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator.clock import process_start_time  # noqa: E402  (the same clock as our summary's)

START = process_start_time()


def train_func(config: dict) -> None:
    import time

    import ray.train
    import ray.train.torch
    import torch

    from benchmarks.common import setup, train_steps

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    job, model, blocks, sampler = setup(config["overrides"], rank, world)
    ddp = ray.train.torch.prepare_model(model)
    marks = {}
    train_steps(job, ddp, model, blocks, sampler, config["steps"],
                on_step=lambda s: marks.setdefault(s, time.time()))
    if rank == 0:
        with open(config["out"], "w") as f:
            import json

            json.dump({"first_step_end": marks[1]}, f)


def main() -> None:
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    raw = out + ".raw"
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, _node_ip_address="127.0.0.1")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"overrides": overrides, "steps": steps, "out": raw},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="ttfs"),
    )
    trainer.fit()
    with open(raw) as f:
        first = json.load(f)["first_step_end"]
    with open(out, "w") as f:
        json.dump({"time_to_first_step_s": first - START}, f)
    ray.shutdown()


if __name__ == "__main__":
    main()
