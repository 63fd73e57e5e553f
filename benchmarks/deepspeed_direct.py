"""Baseline: the same ZeRO job as a plain DeepSpeed script, for the `deepspeed` launcher.

deepspeed --num_gpus 2 benchmarks/deepspeed_direct.py OUT.json STEPS DS_CONFIG.json [hydra overrides]
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, steps, ds_path, overrides = args[0], int(args[1]), args[2], args[3:]
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from benchmarks.common import setup
    from orchestrator.models import causal_lm_loss
    from orchestrator.optim import build_optimizer, build_scheduler

    job, model, blocks, sampler = setup(overrides, rank, world)
    optimizer = build_optimizer(model, job.optim)
    scheduler = build_scheduler(optimizer, job.optim, job.trainer.max_steps)
    with open(ds_path) as f:
        ds_config = json.load(f)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for ids in sampler.next_step():
            x, y = blocks.batch(ids)
            loss = causal_lm_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        tokens = job.trainer.global_batch_size * job.data.seq_len
        with open(out, "w") as f:
            json.dump({"tokens_per_s": [tokens / t for t in times], "step_time_s": times}, f)
    dist.barrier()
    dist.destroy_process_group()
    # After ZeRO-3 on the CPU, DeepSpeed 0.19's process teardown aborts ("terminate called
    # without an active exception") once everything above is done and written: skip it.
    os._exit(0)


if __name__ == "__main__":
    main()
