"""Pieces the baseline scripts share with each other: the same model, batches and optimizer
as an orchestrator job, built with plain torch so the baselines owe nothing to our engine."""
from __future__ import annotations

import json
import time

import torch

from orchestrator.config import compose
from orchestrator.data import BlockSampler, TokenBlocks, prepare
from orchestrator.models import Llama, causal_lm_loss
from orchestrator.optim import build_optimizer, build_scheduler
from orchestrator.trainer import model_args


def job_for(overrides: list[str]):
    return compose(overrides)


def setup(overrides: list[str], rank: int, world: int):
    job = job_for(overrides)
    data = prepare(job.data, job.model.vocab_size)
    torch.manual_seed(job.seed)
    model = Llama(model_args(job))
    model.init_weights(job.seed)
    blocks = TokenBlocks(data.tokens_path, job.data.seq_len)
    sampler = BlockSampler(blocks.n_train, job.trainer.global_batch_size, job.trainer.micro_batch_size,
                           dp_rank=rank, dp_size=world, seed=job.seed)
    return job, model, blocks, sampler


def train_steps(job, module, model, blocks, sampler, steps: int, on_step=None) -> list[float]:
    """A plain DDP loop: accumulate with no_sync, clip, AdamW, cosine schedule. Returns step times."""
    opt = build_optimizer(model, job.optim)
    sched = build_scheduler(opt, job.optim, job.trainer.max_steps)
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        micro = sampler.next_step()
        for i, ids in enumerate(micro):
            x, y = blocks.batch(ids)
            ctx = module.no_sync() if (i < len(micro) - 1 and hasattr(module, "no_sync")) else torch.enable_grad()
            with ctx:
                loss = causal_lm_loss(module(x), y)
                (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
        if on_step:
            on_step(step)
    return times


def emit(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f)
