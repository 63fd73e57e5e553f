"""Baseline: a bare DDP training script for torchrun, no orchestrator.

torchrun --standalone --nproc_per_node=2 benchmarks/torchrun_ddp.py OUT.json STEPS [hydra overrides]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit, setup, train_steps  # noqa: E402


def main() -> None:
    out, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    job, model, blocks, sampler = setup(overrides, rank, world)
    ddp = DistributedDataParallel(model, bucket_cap_mb=25, gradient_as_bucket_view=True)
    times = train_steps(job, ddp, model, blocks, sampler, steps)
    if rank == 0:
        tokens = job.trainer.global_batch_size * job.data.seq_len
        emit(out, {"tokens_per_s": [tokens / t for t in times], "step_time_s": times})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
