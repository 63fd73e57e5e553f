"""Helpers of the serving tests: the plain model's greedy text and log-probabilities to compare
the pool with, and calls into a running pool."""
from __future__ import annotations

import asyncio

import torch

from orchestrator.inference.types import Request
from orchestrator.models.generate import sample

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "O", "KING HENRY", "What say you, my lord? I"]


def reference(model, tok, eos, prompt: str, n: int) -> str:
    ids = sample(model, tok.encode(prompt).ids, n, model.args.max_seq_len, temperature=0, stop_id=eos)
    return tok.decode(ids)


@torch.no_grad()
def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits after each token of ``ids``: (len(ids), vocab)."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)


def perturbed(model, seed: int) -> dict:
    """The model's weights with noise on every matrix (new weights to publish)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.ndim == 2 else v.clone()
            for k, v in model.state_dict().items()}


def on_replica(bg, slot, request: Request):
    """The whole event of a request sent to one replica of the pool, bypassing the HTTP checks."""
    async def run():
        return await slot.handle.complete.remote(request)
    return bg.call(run())


def replica_stats(bg) -> list:
    return bg.call(bg.server.pool.stats())


def replica_pids(bg) -> list[int]:
    async def run():
        return [r.pid for r in await asyncio.gather(*[s.handle.ready.remote() for s in bg.server.pool.slots])]
    return bg.call(run())
