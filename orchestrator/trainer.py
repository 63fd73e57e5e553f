"""The per-rank training loop: build the model and engine, step, checkpoint, report.

A Trainer runs inside one worker (one rank) after the process group exists. It
reports one metrics dict per step through ``report``; only rank 0 reports.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Generator

import numpy as np
import torch

import strategies
from orchestrator import checkpoint, memory
from orchestrator.config import JobConfig
from orchestrator.data import BlockSampler, PreparedData, open_blocks
from orchestrator.models import Llama, LlamaArgs, llama_args, num_params
from orchestrator.plan import Plan
from orchestrator.results import StepMetrics, TrainOutcome
from orchestrator.storage import RunPlaces, Storage
from orchestrator.tokens import EOS
from strategies.base import EngineContext

log = logging.getLogger(__name__)


def model_args(job: JobConfig) -> LlamaArgs:
    return llama_args(job.model)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass(frozen=True)
class SaveNotice:
    """Yielded by rank 0's training loop as a checkpoint save starts: the driver's hang check then
    waits up to trainer.save_timeout_s instead of trainer.step_timeout_s."""

    step: int


class Trainer:
    def __init__(self, job: JobConfig, plan: Plan, places: RunPlaces, run_id: str, rank: int,
                 device: torch.device, data: PreparedData, resume_from: Storage | None):
        """``plan``: the layout the driver built and validated (orchestrator.plan)."""
        self.job = job
        self.rank = rank
        self.device = device
        self.run_id = run_id
        self._publisher = None  # the direct weight sync to an inference pool, made at the first publish
        # Publish from shards: the rank that writes each piece (empty: it does not apply), once.
        self._shard_owner: dict | None = None
        self._writer = None
        strategy = strategies.get(job.strategy.name)
        self.plan = plan
        torch.manual_seed(job.seed)
        with torch.device("meta"):
            model = Llama(model_args(job))
        self.n_params = num_params(model)
        from orchestrator.alignment.losses import objective_of

        ctx = EngineContext(
            plan=plan, rank=rank, device=device,
            precision=resolve_precision(job.precision, device), optim=job.optim,
            trainer=job.trainer, seed=job.seed, lora=job.finetune.lora if job.finetune.lora.rank else None,
            objective=objective_of(job.alignment),
        )
        self.engine = strategy.build_engine(job.strategy, model, ctx)
        trained = self.engine.generation_model()
        self.n_trainable = (sum(p.numel() for p in trained.parameters() if p.requires_grad) if trained is not None
                            else self.n_params)
        self.blocks = open_blocks(data, job.data.seq_len, job.data.val_fraction)
        dp, dp_rank = self.plan.dp, self.plan.dp_rank(rank)
        self.grpo = None
        if job.alignment.method == "grpo":  # the sampler draws prompts: global_batch_size / group_size per step
            from orchestrator.alignment.grpo import GRPOStep

            prompts = job.trainer.global_batch_size // job.alignment.group_size
            self.sampler = BlockSampler(self.blocks.n_train, prompts, prompts // dp, dp_rank=dp_rank, dp_size=dp,
                                        seed=job.seed, shuffle=job.data.shuffle)
            self.grpo = GRPOStep(job, run_id, self.blocks, data.tokenizer_path, data.eos_id, self.sampler, dp_rank,
                                 dp, device, places.storage)
        else:
            self.sampler = BlockSampler(
                self.blocks.n_train, job.trainer.global_batch_size, job.trainer.micro_batch_size,
                dp_rank=dp_rank, dp_size=dp, seed=job.seed, shuffle=job.data.shuffle,
            )
        self._kl_model = None  # GRPO's frozen reference for the KL penalty
        self.step = 0
        self._weights: dict = {}
        self.checkpointer = checkpoint.Checkpointer(places, rank, job.trainer.checkpoint_async,
                                                    job.trainer.keep_checkpoints, run_id)
        if resume_from:
            self._restore(resume_from)
        else:
            if job.model.init_from:
                self._init_from(job.model.init_from)
            if job.alignment.method == "dpo":
                self._reference_logps()
        if self.grpo is not None and job.alignment.kl_coef > 0:
            self._kl_model = self._frozen_reference()

    def _frozen_reference(self):
        """GRPO's reference for the KL penalty: the starting weights, frozen, whole on every rank;
        returns fn(inputs, targets) -> the reference's log-probabilities of the targets."""
        from orchestrator.alignment.losses import token_logps

        model = self._whole_model(self._pretrained_weights()).eval().requires_grad_(False)

        @torch.no_grad()
        def logps(x, y):
            return token_logps(model(x.to(self.device)), y.to(self.device))[0].cpu()

        return logps

    def _whole_model(self, weights: dict) -> Llama:
        """A single-device model on this rank's device holding ``weights`` (whole, canonical names)."""
        with torch.device("meta"):
            model = Llama(model_args(self.job))
        model = model.to_empty(device=self.device)
        model.init_buffers()  # the rope tables are not in a state dict
        weights = dict(weights)
        if self.job.model.tie_embeddings:  # one parameter under two names
            weights.setdefault("output.weight", weights["tok_embeddings.weight"])
        model.load_state_dict(weights)
        return model

    def _reference_logps(self) -> None:
        """DPO's reference: the summed response log-probabilities of every pair's two answers under
        the starting weights (the frozen reference), computed once before the first update, each
        data-parallel rank a share of the rows, then gathered. A checkpoint keeps them: a resumed
        job needs no second copy of the model (nor, with LoRA, adapters switched off)."""
        from orchestrator.alignment.losses import pair_logps

        blocks, mb = self.blocks, self.job.trainer.micro_batch_size
        n, dp = blocks.n_total, self.plan.dp
        per = -(-n // dp)
        per = -(-per // mb) * mb  # every rank runs the same number of forwards (zero3's are collective)
        start = self.plan.dp_rank(self.rank) * per
        rows = np.minimum(np.arange(start, start + per), n - 1)
        parts = []
        for i in range(0, per, mb):
            x, y = blocks.rows(rows[i:i + mb])
            parts.append(pair_logps(self.engine.logits(x.to(self.device)), y.to(self.device)).cpu())
        local = torch.cat(parts).float()
        if torch.distributed.is_initialized() and dp > 1:
            gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, local)
            local = torch.cat(gathered)
        blocks.reference.copy_(local[:n])

    def _state(self) -> dict:
        """What a checkpoint holds: the engine's state, and DPO's reference log-probabilities."""
        state = self.engine.checkpoint_state()
        if self.job.alignment.method == "dpo":
            state["alignment.reference_logps"] = self.blocks.reference
        return state

    def _pretrained_weights(self) -> dict:
        from orchestrator import pretrained

        return pretrained.load_weights(pretrained.locate(self.job.model.init_from))

    def _init_from(self, path: str) -> None:
        """Pretrained weights, with a fresh optimizer and schedule (a resume restores those too).
        A LoRA job's adapters keep their initialization."""
        self.engine.load_weights(self._pretrained_weights())

    def _restore(self, ckpt: Storage) -> None:
        """Every rank reads its own part of the checkpoint, in this job's layout."""
        state = checkpoint.read_trainer_state(ckpt)
        if self.job.finetune.lora.rank:  # the checkpoint holds the adapters; the base is model.init_from
            self.engine.load_weights(self._pretrained_weights())
        self.engine.prepare_load()
        checkpoint.load(ckpt, self._state())
        self.engine.finish_load({"optimizer_step": state.optimizer_step, "scheduler": state.scheduler})
        self.sampler.load_state_dict(state.sampler)
        checkpoint.load_rng(ckpt, self.rank)
        self.step = state.step

    def _batches(self, block_ids) -> list:
        return [tuple(t.to(self.device, non_blocking=True) for t in self.blocks.batch(ids)) for ids in block_ids]

    def save(self) -> None:
        """Collective: every rank hands its part of the state to the checkpointer, which writes it
        in the background (trainer.checkpoint_async) or now."""
        counters = self.engine.counters()
        self.checkpointer.save(self.step, self._state(), checkpoint.TrainerState(
            step=self.step, sampler=self.sampler.state_dict(), world_size=self.plan.world_size,
            strategy=self.job.strategy.name, optimizer_step=counters["optimizer_step"],
            scheduler=counters["scheduler"], run_id=self.run_id))

    def evaluate(self) -> dict[str, float]:
        """The held-out split, as many whole rounds of micro-batches over the data-parallel ranks
        as it fills (every rank runs the same number of micro-batches). Exact match is reported
        for SFT data, whose targets are reference answers."""
        t = self.job.trainer
        chunk = t.micro_batch_size * self.plan.dp
        per_rank = (self.blocks.n_val // chunk) * t.micro_batch_size
        start = self.plan.dp_rank(self.rank) * per_rank
        ids = list(range(start, start + per_rank))
        batches = [tuple(b.to(self.device) for b in self.blocks.batch(ids[i : i + t.micro_batch_size], split="val"))
                   for i in range(0, per_rank, t.micro_batch_size)]
        result = self.engine.eval_step(batches)
        if self.job.data.format == "text":
            result.pop("val_exact_match", None)
        return result

    def run(self) -> Generator[StepMetrics | SaveNotice, None, TrainOutcome]:
        """Trains to trainer.max_steps (or exit_at_step): a generator that yields rank 0's metrics
        after every step (nothing on the other ranks) and returns the rank's TrainOutcome."""
        t = self.job.trainer
        tokens_per_step = t.global_batch_size * self.job.data.seq_len
        first_step = self.step + 1
        exited_early = False
        saved_at = self.step
        if self.grpo is not None and self.grpo.live and self.step > 0:
            self._sync_rollout_pool()  # resumed: the pool may hold weights newer or older than these
        while self.step < t.max_steps:
            start = time.perf_counter()
            rollout_figures: dict = {}
            if self.grpo is not None:
                batches, rollout_figures = self.grpo.batches(self.step + 1, t.micro_batch_size, self._kl_model)
            else:
                batches = self._batches(self.sampler.next_step())
            trained = time.perf_counter()
            result = self.engine.train_step(batches)
            self.step += 1
            if self.grpo is not None:
                rollout_figures["alignment.train_s"] = time.perf_counter() - trained
                if self.grpo.live:
                    rollout_figures["alignment.sync_s"] = self._sync_rollout_pool()
            elapsed = time.perf_counter() - start
            if self.rank == 0:
                metrics = StepMetrics(
                    step=self.step, loss=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                    tokens_per_s=tokens_per_step / elapsed, step_time_s=elapsed, tokens=self.step * tokens_per_step,
                    time=time.time(), rss_bytes=memory.lifetime_peak_bytes(), figures={**result.extra, **rollout_figures},
                )
            if t.eval_every and self.step % t.eval_every == 0 and self.can_evaluate:
                val = self.evaluate()
                if self.rank == 0:
                    metrics.figures.update(val)
            if self.job.inference.sync_every and self.step % self.job.inference.sync_every == 0:
                timing = self.publish_weights()
                if self.rank == 0:
                    metrics.figures.update(timing)
            if self.rank == 0:
                yield metrics
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.exit_at_step:
                if self.rank == 0:
                    yield SaveNotice(self.step)
                self.save()
                saved_at = self.step
            if self.step == t.exit_at_step:
                exited_early = self.step < t.max_steps
                break
        if saved_at != self.step:
            if self.rank == 0:
                yield SaveNotice(self.step)
            self.save()
        self.checkpointer.close()  # the last save is published before the job reports success
        if self.job.trainer.sample_tokens and self.engine.generation_model() is None:
            weights = self.engine.gather_weights()  # collective; whole on rank 0, for the text sample
            self._weights = weights if self.rank == 0 else {}
        return TrainOutcome(rank=self.rank, first_step=first_step, last_step=self.step, exited_early=exited_early,
                            peak_rss_bytes=memory.lifetime_peak_bytes(), memory=self.engine.memory_report(),
                            trainable_params=self.n_trainable, checkpoints=list(self.checkpointer.records))

    def _sync_rollout_pool(self) -> float:
        """GRPO: the new weights to the rollout pool (rank 0 sends), and every rank waits for it
        before asking for samples. A sync that fails fails the step: samples from stale weights
        would train on the wrong log-probabilities. Returns its seconds."""
        start = time.perf_counter()
        timing = self.publish_weights(self.grpo.pool)
        if self.rank == 0 and timing.get("inference.sync_failed"):
            raise RuntimeError(f"the weight sync to the rollout pool {self.grpo.pool} failed at step {self.step}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return time.perf_counter() - start

    def publish_weights(self, pool: str | None = None) -> dict:
        """Full weights to the inference pool (collective). Where every rank can write its own
        pieces into the publisher's shared buffers (``_publish_pieces``), nothing is gathered;
        else the state is gathered on rank 0, which sends it. Rank 0 times the send against a
        plain in-memory copy of the same bytes. A publish that fails (no such pool, mismatched
        weights, a replica that did not take them) is logged and counted; training goes on."""
        from orchestrator import lora
        from orchestrator.inference.weights import DirectPublisher

        if self._publisher is None and self.rank == 0:
            self._publisher = DirectPublisher(pool or self.job.inference.pool)
        timing = self._publish_pieces()
        if timing is not None:
            return timing
        weights = self.engine.gather_weights()
        if self.rank != 0:
            return {}
        if self.job.finetune.lora.rank:
            opts = self.job.finetune.lora
            weights = lora.merge(self._pretrained_weights(), weights, opts.rank, opts.alpha)  # adapters -> full
        # On CUDA the weights stay there: the direct sync then broadcasts them over NCCL.
        weights = {k: v.detach() if v.is_cuda else v.detach().cpu() for k, v in weights.items()}
        return self._timed_send(lambda: self._publisher.publish(weights), time.perf_counter(),
                                list(weights.values()), from_shards=False)

    def _timed_send(self, send, start: float, tensors: list, from_shards: bool) -> dict:
        """Runs ``send`` (-> PublishResult), logging what failed; the sync's figures (its time
        from ``start``) against a plain in-memory copy (clone) of the same tensors."""
        replicas, failed = 0, 0
        try:
            result = send()
            replicas, failed = result.replicas, len(result.failed)
            for line in result.failed:
                log.warning("weight sync at step %d: %s", self.step, line)
        except Exception as exc:
            failed = 1
            log.warning("weight sync at step %d failed: %s", self.step, str(exc).splitlines()[0] if str(exc) else exc)
        sync_s = time.perf_counter() - start
        start = time.perf_counter()
        copied = [t.clone() for t in tensors]
        copy_s = time.perf_counter() - start
        del copied
        return {"inference.sync_s": sync_s, "inference.copy_s": copy_s, "inference.replicas": float(replicas),
                "inference.sync_failed": float(failed), "inference.sync_from_shards": float(from_shards),
                "inference.bytes": float(sum(t.numel() * t.element_size() for t in tensors))}

    def _publish_pieces(self) -> dict | None:
        """A publish with no gather (collective): rank 0 opens the publisher's two buffers in
        shared memory (DirectPublisher.open_shared), every rank writes the pieces of the weights
        it holds (its checkpoint entries: FSDP and tensor-parallel shards, ZeRO's fp32
        partitions, replicated tensors once), and rank 0 tells the replicas. None where it does
        not apply (a single process, a LoRA job, CUDA weights, no replica on rank 0's node, a
        rank on another node): the caller gathers instead."""
        import torch.distributed as dist

        from orchestrator.dcp import local_pieces
        from orchestrator.inference.weights import SharedWriter

        if not dist.is_initialized() or dist.get_world_size() == 1 or self.job.finetune.lora.rank \
                or self.device.type != "cpu":
            return None
        # (name, full shape, offsets, size) and values of every piece this rank holds
        mine = [((key[len("model."):], tuple(value.shape), o, tuple(v.shape)), v)
                for key, value in self.engine.checkpoint_state().items() if key.startswith("model.")
                for o, v in local_pieces(value)]
        if self._shard_owner is None:  # who writes each piece: the lowest rank holding it
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, [k for k, _ in mine])
            owner: dict = {}
            for rank, held in enumerate(every):
                for k in held:
                    owner.setdefault(k, rank)
            held_values: dict = {}  # name -> (full shape, values held by someone)
            for name, shape, _, size in owner:
                held_values[name] = (shape, held_values.get(name, (shape, 0))[1] + math.prod(size))
            complete = all(n == math.prod(shape) for shape, n in held_values.values())
            self._shard_owner = owner if complete else {}
            self._writer = SharedWriter()
        if not self._shard_owner:
            return None
        start = time.perf_counter()
        target = [None]
        if self.rank == 0:
            try:
                target[0] = self._publisher.open_shared()
            except Exception as exc:
                self._publisher.release_files()
                log.warning("weight sync at step %d: no shared buffers (%s); gathering instead", self.step,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        dist.broadcast_object_list(target, src=0)
        if target[0] is None:
            return None
        layout = {name: tuple(shape) for name, shape in target[0].layout}
        shapes = {name: shape for name, shape, _, _ in self._shard_owner}
        if any(shapes.get(name) != shape for name, shape in layout.items()):
            if self.rank == 0:  # the whole weights then, checked against the pool's by the publisher
                self._publisher.release_files()
            return None
        ok = self._writer.write(target[0], [(k[0], k[2], v) for k, v in mine
                                            if k[0] in layout and self._shard_owner.get(k) == self.rank])
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if self.rank == 0:
            self._publisher.release_files()
        if not int(flag):  # a rank cannot write them (another node): gathered from now on
            self._shard_owner = {}
            return None
        if self.rank != 0:
            return {}
        return self._timed_send(self._publisher.send_written, start, [self._publisher.buffers[0]], from_shards=True)

    @property
    def can_evaluate(self) -> bool:
        return self.blocks.n_val >= self.job.trainer.micro_batch_size * self.plan.dp

    def sample(self, tokenizer_path: str, prompt: str, max_new_tokens: int, temperature: float = 0.8) -> str:
        from tokenizers import Tokenizer

        from orchestrator.models.generate import sample

        model = self.engine.generation_model()
        if model is None:
            model = self._whole_model(self._weights)
        tok = Tokenizer.from_file(tokenizer_path)
        eos = tok.token_to_id(EOS)
        # An empty prompt starts a fresh document (after the separator); a long one keeps its end
        # (the model's context, with room for the new tokens).
        ids = tok.encode(prompt).ids or ([eos] if eos is not None else [0])
        ids = ids[-max(1, self.job.model.max_seq_len - max_new_tokens):]
        new = sample(model, ids, max_new_tokens, self.job.model.max_seq_len,
                     temperature=temperature, seed=self.job.seed, stop_id=eos)
        return prompt + tok.decode(new)
