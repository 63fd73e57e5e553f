"""GRPO's rollouts: the pool a job starts on its cluster, each rank's client to it, and the
step's samples turned into training micro-batches.

The driver starts the pool (``start_pool``) from ``model.init_from`` before the ranks start; its
replicas register with the pool's weight store, where each rank finds them by the pool's name.
Every step, each data-parallel rank draws its share of the step's prompts and sends each prompt's
``group_size`` samples (one seed each, derived from the job's seed, the step and the prompt's
place in the step) to one replica, where they share the prompt's prefill. Rank 0 sends the new
weights to the replicas after the update (the direct weight sync) and every rank waits for that
before it asks for the next step's samples.

``alignment.rollout.record`` writes each rank's samples of each step as JSON under the run's
storage (``rollouts/``); ``alignment.rollout.replay`` trains on such a recording instead of a pool
(any layout: the step's samples are read in the recorded order and cut per rank again).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from orchestrator.errors import ConfigError
from orchestrator.sft import IGNORE


def pool_name(run_id: str) -> str:
    return f"rollout-{run_id}"


def serve_config(job, run_id: str):
    """The rollout pool's serve config: the job's starting weights, the rollout options."""
    from orchestrator.inference.config import InferenceConfig, ServeConfig

    r = job.alignment.rollout
    return ServeConfig(checkpoint=job.model.init_from, inference=InferenceConfig(
        name=pool_name(run_id), replicas=r.replicas, max_batch=r.max_batch, block_size=r.block_size,
        kv_cache_tokens=r.kv_cache_tokens, cpus_per_replica=r.cpus_per_replica,
        max_tokens_limit=max(r.max_tokens, 1), queue_limit=1 << 20))


def cpus_needed(job) -> int:
    """CPUs the rollout pool takes of its own (0 when colocated with the ranks, or replaying)."""
    a = job.alignment
    if a.method != "grpo" or a.rollout.replay or a.rollout.colocate:
        return 0
    return a.rollout.replicas * a.rollout.cpus_per_replica


def start_pool(job, run_id: str):
    """Starts the rollout pool (after checking that the cluster can place it) and waits until
    every replica is ready. ConfigError naming the key where it cannot be placed."""
    import ray
    import torch

    from orchestrator import pretrained
    from orchestrator.inference.pool import Pool
    from orchestrator.inference.weights import expected_shapes
    from orchestrator.models import Llama, llama_args

    r = job.alignment.rollout
    need = cpus_needed(job)
    ranks = job.cluster.num_workers * job.cluster.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need and need + ranks > have:
        raise ConfigError("alignment.rollout.replicas", f"{r.replicas} replica(s) of alignment.rollout."
                          f"cpus_per_replica={r.cpus_per_replica} CPUs and {job.cluster.num_workers} rank(s) of "
                          f"{job.cluster.cpus_per_worker} need {need + ranks} CPUs; the cluster has {have:g}. "
                          "Lower the replicas, set alignment.rollout.colocate=true, or add CPUs")
    cfg = serve_config(job, run_id)
    with torch.device("meta"):
        expected = expected_shapes(Llama(llama_args(pretrained.locate(job.model.init_from).arch)))
    pool = Pool(cfg, expected, num_cpus=0 if r.colocate else None)
    try:
        pool.wait_ready(r.start_timeout_s)
    except Exception as exc:
        pool.shutdown()
        raise ConfigError("alignment.rollout", f"the rollout pool did not start within alignment.rollout."
                                               f"start_timeout_s={r.start_timeout_s:g}s: {type(exc).__name__}: "
                                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return pool


def sample_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    return int(np.random.SeedSequence([seed, step, prompt, sample]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Sample:
    tokens: list[int]  # the completion, with the EOS that ended it (if one did)
    logprobs: list[float]  # one per token, as the rollout computed it
    text: str  # the completion's text, without the EOS


@dataclass
class Group:
    row: int  # the prompt's row in the training split
    samples: list[Sample]


class PoolClient:
    """A rank's connection to the rollout pool: each prompt's group goes to one replica."""

    def __init__(self, pool: str, eos_id: int, timeout_s: float = 600.0):
        import ray

        from orchestrator.inference.weights import find_store

        self.store = find_store(pool)
        self.handles = ray.get(self.store.replica_handles.remote())
        self.eos_id = eos_id
        self.timeout_s = timeout_s

    def generate(self, prompts: list[tuple[int, list[int]]], group_size: int, temperature: float, max_tokens: int,
                 seeds) -> list[Group]:
        """``prompts``: (row, prompt ids); ``seeds(i, j)``: the seed of prompt i's sample j."""
        import ray

        from orchestrator.inference.pool import ACTOR_DIED
        from orchestrator.inference.types import Request

        def send(i: int, row: int, ids: list[int], handle):
            return [handle.complete.remote(Request(id=f"r{row}-{j}-{time.monotonic_ns()}", prompt_ids=tuple(ids),
                                                   max_tokens=max_tokens, temperature=temperature,
                                                   seed=seeds(i, j), logprobs=0)) for j in range(group_size)]

        refs = [send(i, row, ids, self.handles[i % len(self.handles)]) for i, (row, ids) in enumerate(prompts)]
        groups = []
        for i, (row, ids) in enumerate(prompts):
            try:
                events = ray.get(refs[i], timeout=self.timeout_s)
            except ACTOR_DIED:  # that replica is gone: the group again on the next one that answers
                self.handles = ray.get(self.store.replica_handles.remote())
                events = ray.get(send(i, row, ids, self.handles[(i + 1) % len(self.handles)]), timeout=self.timeout_s)
            samples = []
            for e in events:
                if e.error:
                    raise RuntimeError(f"the rollout pool failed a sample of row {row}: {e.error}")
                tokens = list(e.token_ids)
                logprobs = [lp.logprob for lp in e.logprobs or []]
                if e.end_logprob is not None:
                    tokens.append(self.eos_id)
                    logprobs.append(e.end_logprob)
                samples.append(Sample(tokens, logprobs, e.text))
            groups.append(Group(row, samples))
        return groups


def group_to_json(g: Group) -> dict:
    return {"row": g.row, "samples": [{"tokens": s.tokens, "logprobs": s.logprobs, "text": s.text}
                                      for s in g.samples]}


def group_of_json(d: dict) -> Group:
    return Group(int(d["row"]), [Sample([int(t) for t in s["tokens"]], [float(v) for v in s["logprobs"]],
                                        str(s["text"])) for s in d["samples"]])


def record_name(step: int, rank: int) -> str:
    return f"step{step:07d}.rank{rank:04d}.json"


def replay(store, step: int, dp_rank: int, dp: int) -> list[Group]:
    """This rank's share of a recorded step (all recorded ranks' groups, in rank order, cut in dp)."""
    names = sorted(n for n in store.sizes() if n.startswith(f"step{step:07d}.rank"))
    if not names:
        raise ConfigError("alignment.rollout.replay", f"{store.root} holds no rollouts of step {step}")
    groups = [group_of_json(g) for n in names for g in json.loads(store.read_text(n))["groups"]]
    if len(groups) % dp:
        raise ConfigError("alignment.rollout.replay", f"step {step} has {len(groups)} recorded prompts, not "
                                                      f"divisible by {dp} data-parallel ranks")
    per = len(groups) // dp
    return groups[dp_rank * per:(dp_rank + 1) * per]


def advantages(rewards: np.ndarray) -> np.ndarray:
    """(prompts, group) rewards -> advantages normalized within each group (0 where all agree)."""
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return (rewards - mean) / (std + 1e-4)


def micro_batches(prompt_ids: list[list[int]], groups: list[Group], adv: np.ndarray, width: int, eos_id: int,
                  micro: int):
    """Training micro-batches (inputs, targets, rollout log-probabilities, advantages) of one step:
    each sample is its prompt and completion padded to ``width`` tokens; the targets are the
    completion's tokens (IGNORE elsewhere), and the log-probabilities sit at their targets."""
    import torch

    rows = []
    for ids, g, a in zip(prompt_ids, groups, adv):
        for s, adv_value in zip(g.samples, a):
            keep = max(0, min(len(s.tokens), width - len(ids)))
            seq = ids + s.tokens[:keep]
            tokens = np.full(width, eos_id, dtype=np.int64)
            tokens[:len(seq)] = seq
            targets = np.full(width - 1, IGNORE, dtype=np.int64)
            old = np.zeros(width - 1, dtype=np.float32)
            start = len(ids) - 1  # the target index of the completion's first token
            targets[start:start + keep] = s.tokens[:keep]
            old[start:start + keep] = s.logprobs[:keep]
            rows.append((tokens, targets, old, float(adv_value)))
    out = []
    for i in range(0, len(rows), micro):
        chunk = rows[i:i + micro]
        out.append((torch.from_numpy(np.stack([r[0][:-1] for r in chunk])),
                    torch.from_numpy(np.stack([r[1] for r in chunk])),
                    torch.from_numpy(np.stack([r[2] for r in chunk])),
                    torch.tensor([r[3] for r in chunk], dtype=torch.float32)))
    return out
