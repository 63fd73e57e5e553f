"""One GRPO step on one rank: prompts, samples from the pool, rewards, advantages, micro-batches.

The trainer calls ``batches(step)`` before its update and ``after_update`` after it; both are
collective over the data-parallel ranks (the statistics of the whole step reach rank 0).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.alignment import rewards, rollout
from orchestrator.alignment.data import Prompts


class GRPOStep:
    def __init__(self, job, run_id: str, examples, tokenizer_path: str, eos_id: int, sampler, dp_rank: int, dp: int,
                 device: torch.device, storage):
        from tokenizers import Tokenizer

        a = job.alignment
        self.job = job
        self.cfg = a
        self.prompts = Prompts(examples, Tokenizer.from_file(tokenizer_path), eos_id)
        self.eos_id = eos_id
        self.sampler = sampler
        self.dp_rank, self.dp = dp_rank, dp
        self.device = device
        self.width = job.data.seq_len + 1
        self.reward_fn = rewards.load(a.reward)
        self.client = None
        self.records = storage.child("rollouts") if a.rollout.record else None
        self.replayed = None
        if a.rollout.replay:
            from orchestrator.storage import Storage

            self.replayed = Storage.at(a.rollout.replay, dict(job.run.storage_options)).child("rollouts")
        self.pool = rollout.pool_name(run_id)

    @property
    def live(self) -> bool:
        """Samples come from the rollout pool (not a recording), which takes every new weight."""
        return self.replayed is None

    def _client(self):
        if self.client is None:
            self.client = rollout.PoolClient(self.pool, self.eos_id)
        return self.client

    def _groups(self, step: int, rows: list[int], prompt_ids: list[list[int]]) -> list[rollout.Group]:
        if self.replayed is not None:
            groups = rollout.replay(self.replayed, step, self.dp_rank, self.dp)
            if len(groups) != len(rows):
                from orchestrator.errors import ConfigError

                raise ConfigError("alignment.rollout.replay", f"step {step} recorded {len(groups) * self.dp} prompts; "
                                                              f"this job draws {len(rows) * self.dp} per step")
            return groups
        a = self.cfg
        first = self.dp_rank * len(rows)  # this rank's prompts' places in the step
        longest = max(len(ids) for ids in prompt_ids)
        max_tokens = max(1, min(a.rollout.max_tokens, self.width - longest))
        return self._client().generate(
            list(zip(rows, prompt_ids)), a.group_size, a.temperature, max_tokens,
            lambda i, j: rollout.sample_seed(self.job.seed, step, first + i, j))

    def batches(self, step: int, micro: int, kl_model=None) -> tuple[list, dict]:
        """This rank's micro-batches for ``step`` and rank 0's figures of the whole step."""
        t0 = time.perf_counter()
        (rows,) = self.sampler.next_step()
        rows = [int(r) for r in rows]
        prompts = [self.prompts.get(r) for r in rows]
        groups = self._groups(step, rows, [p[0] for p in prompts])
        if [g.row for g in groups] != rows:  # replayed: the recorded rows
            prompts = [self.prompts.get(g.row) for g in groups]
        prompt_ids = [p[0] for p in prompts]
        t1 = time.perf_counter()
        texts, completions, refs = [], [], []
        for g, (_, text, ref) in zip(groups, prompts):
            for s in g.samples:
                texts.append(text)
                completions.append(s.text)
                refs.append(ref)
        values = rewards.score(self.reward_fn, self.cfg.reward, texts, completions, refs)
        reward = np.asarray(values, dtype=np.float64).reshape(len(groups), -1)
        adv = rollout.advantages(reward)
        out = rollout.micro_batches(prompt_ids, groups, adv, self.width, self.eos_id, micro)
        if kl_model is not None:
            out = [b + (kl_model(b[0], b[1]),) for b in out]
        else:
            out = [b + (torch.empty(0),) for b in out]
        out = [tuple(t.to(self.device) for t in b) for b in out]
        t2 = time.perf_counter()
        if self.records is not None:
            self.records.write_text(json.dumps({"step": step, "rank": self.dp_rank,
                                                "groups": [rollout.group_to_json(g) for g in groups]}),
                                    rollout.record_name(step, self.dp_rank))
        lengths = np.asarray([len(s.tokens) for g in groups for s in g.samples], dtype=np.float64)
        figures = self._step_figures(reward, lengths)
        figures.update({"alignment.generate_s": t1 - t0, "alignment.score_s": t2 - t1})
        return out, figures

    def _step_figures(self, reward: np.ndarray, lengths: np.ndarray) -> dict:
        """Reward mean and spread, zero-spread groups and response length over every rank's samples."""
        local = torch.tensor(np.concatenate([reward, lengths.reshape(reward.shape)], axis=1), dtype=torch.float64)
        if dist.is_initialized() and self.dp > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            local = torch.cat(parts)
        g = reward.shape[1]
        r, n = local[:, :g], local[:, g:]
        return {"alignment.reward_mean": float(r.mean()), "alignment.reward_std": float(r.std()),
                "alignment.zero_spread_fraction": float((r.std(dim=1) == 0).double().mean()),
                "alignment.response_length": float(n.mean())}
