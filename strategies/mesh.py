"""Tensor, pipeline and data parallel over one named device mesh (the tp, pp and hybrid strategies).

Each job is left to the torch library that does it:
  tensor parallel   DTensor's parallelize_module with Megatron's plan, loss_parallel
  pipeline          torch.distributed.pipelining stages and schedules
  data parallel     FSDP2's fully_shard over the data-parallel mesh dimensions: sharded
                    (FSDP, ZeRO-3-like) or replicated (HSDP with a shard group of one, DDP-like)
The mesh is (pp, dp_replicate, dp_shard, tp), tp fastest, matching Plan.dp_rank (orchestrator.plan).
Order of application (torchtitan's): split pipeline stages, then tensor parallel on each
stage, then data-parallel sharding, then materialize and initialize.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, loss_parallel, parallelize_module,
)

from orchestrator.models import Llama, causal_lm_loss
from strategies.base import (
    Batch, EngineContext, StepResult, TorchEngine, autocast, full_value, local_tensor, mean_over_group,
    optimizer_state_bytes, prepare_blocks, tensor_bytes, zero_formula,
)
from orchestrator.plan import Plan
from orchestrator.results import MemoryReport

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")

# DTensor warns each time a norm or a gather spans two mesh dimensions in two collectives;
# here that happens only in the gradient norm and checkpoint gathers, once per step, and
# the note would flood every worker's log.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def build_mesh(plan: Plan, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, plan.mesh_shape, mesh_dim_names=MESH_DIMS)


def stage_module(model: Llama, plan: Plan, stage: int) -> Llama:
    """A meta-device copy of ``model`` with only pipeline stage ``stage``'s parts: its layers,
    the embedding on the first stage, the final norm and output layer on the last."""
    with torch.device("meta"):
        chunk = Llama(model.args)
    keep = {str(i) for i in plan.stage_layers(stage, model.args.n_layers)}
    for key in [k for k in chunk.layers if k not in keep]:
        del chunk.layers[key]
    if stage != 0:
        chunk.tok_embeddings = None
    if stage != plan.n_stages - 1:
        chunk.norm = None
        chunk.output = None
    return chunk


def block_plan(output_layout=None) -> dict:
    """One block's Megatron split: q/k/v and gate/up by columns (each rank holds whole heads and a
    slice of the MLP), the attention output and down projections by rows, their partial outputs
    reduced to ``output_layout`` (default replicated)."""
    out = output_layout or Replicate()
    return {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=out),
            "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
            "mlp.w_down": RowwiseParallel(output_layouts=out)}


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron's layout. Without sequence parallel, activations between blocks are replicated
    over the tp ranks; with it, they are sharded along the sequence (dim 1) and the norms run
    on sequence shards."""
    seq = Shard(1) if sequence_parallel else Replicate()
    for block in model.layers.values():
        plan = block_plan(seq)
        if sequence_parallel:
            plan.update({
                "attn_norm": SequenceParallel(),
                # Gather the sequence before attention; the rope tables pass through untouched.
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                           desired_input_layouts=(Replicate(), None, None)),
                "mlp_norm": SequenceParallel(),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    plan = {}
    if model.tok_embeddings is not None:  # vocabulary-parallel embedding
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.output is not None:  # logits stay sharded over the vocabulary, for loss_parallel
        plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if plan:
        parallelize_module(model, tp_mesh, plan)


def apply_data_parallel(model: Llama, dp_mesh: DeviceMesh, reshard_after_forward: bool) -> None:
    """fully_shard per block, then the rest; on a (dp_replicate, dp_shard) mesh this is FSDP when
    dp_shard > 1 and plain replicated data parallel (gradients all-reduced) when dp_shard == 1."""
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)


@torch.no_grad()
def materialize(model: Llama, device: torch.device, seed: int) -> None:
    """Allocates the (possibly sharded) meta model and fills each parameter with its slice of
    the full model's initial value: every rank computes the full value and keeps its part
    (src_data_rank=None: no communication), so every layout starts from the same weights."""
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        p.copy_(to_layout(model.initial_value(name, p.shape, seed).to(device), p))
    model.init_buffers()


def to_layout(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like`` (a DTensor parameter or state gets its shard)."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device, like.dtype)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, pp_group) -> torch.Tensor:
    """Total gradient norm over every parameter of the model, wherever it lives: DTensor grads
    are grouped by mesh (torch cannot mix meshes or plain tensors in one norm), their norms
    made whole, and squares summed over the pipeline stages. Clips when max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(id(g.device_mesh) if isinstance(g, DTensor) else 0, []).append(g)
    squares = torch.zeros((), device=local_tensor(grads[0]).device if grads else None)
    for group in groups.values():
        squares += full_value(torch.nn.utils.get_total_norm(group)).float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    total = squares.sqrt()
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for g in grads:
            g.mul_(coef)
    return total


class Stopwatch:
    """Seconds a rank spends computing (forward, backward, loss) inside a pipeline step."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.busy_s = 0.0

    @contextlib.contextmanager
    def timing(self):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.busy_s += time.perf_counter() - start


class TimedStage(PipelineStage):
    """A PipelineStage that times its compute, so a step's idle (bubble) time can be measured."""

    def __init__(self, *args, stopwatch: Stopwatch, meter, **kwargs):
        super().__init__(*args, **kwargs)
        self.stopwatch = stopwatch
        self.meter = meter  # the engine's activation_meter: one micro-batch through this stage

    def forward_one_chunk(self, *args, **kwargs):
        with self.stopwatch.timing(), self.meter():
            return super().forward_one_chunk(*args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        with self.stopwatch.timing():
            return super().backward_one_chunk(*args, **kwargs)


SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


class MeshEngine(TorchEngine):
    """One or more model chunks (pipeline stages) of this rank, tensor- and data-parallel.

    Without a pipeline it trains like TorchEngine (one chunk, micro-batches accumulated). Its
    checkpoint entries are its parameters and moments as they are: DTensors (each rank's shard)
    or, under a pipeline, the plain tensors of its stages."""

    def __init__(self, chunks: list[Llama], stage_ids: list[int], plan: Plan, mesh: DeviceMesh,
                 ctx: EngineContext):
        self.plan = plan
        self.mesh = mesh
        self.chunks = chunks
        self.stage_ids = stage_ids
        self.pp_group = mesh["pp"].get_group() if plan.pp > 1 else None
        no_sync = self._no_sync if plan.dp > 1 else contextlib.nullcontext
        super().__init__(chunks[0], nn.ModuleList(chunks), ctx, dp_group=dist.group.WORLD, no_sync=no_sync)

    @contextlib.contextmanager
    def _no_sync(self):
        for chunk in self.chunks:
            chunk.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.set_requires_gradient_sync(True)

    def loss_context(self) -> ContextManager:
        return loss_parallel() if self.plan.tp > 1 else contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        return clip_grad_norm(self.params, self.ctx.optim.grad_clip, self.pp_group)

    def _named(self):
        """(name in the full model, parameter) for every parameter of this rank's chunks."""
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def gather_weights(self) -> dict:
        """Whole weights on rank 0 (collective): each stage's tensors are made whole on its
        pipeline rank, whose first rank sends them to rank 0."""
        weights = {name: full_value(p.detach()) for name, p in self._named()}
        if self.plan.pp > 1:
            self._gather_stages_to_rank0(weights)
        return weights

    def _gather_stages_to_rank0(self, weights: dict) -> None:
        """Sends every stage's full tensors from its pipeline rank's first rank to global rank 0,
        in an order all ranks derive from the model's structure."""
        rank = dist.get_rank()
        per_pp_rank = self.plan.ranks_per_pipeline_rank
        for stage in range(self.plan.n_stages):
            leader = (stage % self.plan.pp) * per_pp_rank
            if leader == 0 or rank not in (0, leader):
                continue
            for name, p in stage_module(self.chunks[0], self.plan, stage).named_parameters():
                if rank == leader:
                    dist.send(weights[name].contiguous(), dst=0)
                else:
                    buf = torch.empty(p.shape, dtype=torch.float32, device=self.ctx.device)
                    dist.recv(buf, src=leader)
                    weights[name] = buf

    @torch.no_grad()
    def load_weights(self, weights: dict) -> None:
        for name, p in self._named():
            p.copy_(to_layout(weights[name].to(self.ctx.device), p))

    def memory_report(self) -> MemoryReport:
        params = tensor_bytes(self.params)
        optim = optimizer_state_bytes(self.optimizer)
        dp, sharded = self.plan.dp, self.plan.sharded
        # Ψ here is this rank's model-parallel slice (1/(tp*pp) of the model, roughly);
        # sharded data parallel divides it by dp like ZeRO-3, replicated keeps all of it.
        psi = sum(local_tensor(p).numel() for p in self.params) * (dp if sharded else 1)
        return MemoryReport(params_bytes=params, grads_bytes=self._grad_bytes, optimizer_bytes=optim,
                            model_states_bytes=params + self._grad_bytes + optim,
                            **zero_formula(3 if sharded else 0, psi, dp if sharded else 1, 4, 4, 8),
                            **self.activation_report(self.ctx.trainer))

    def generation_model(self) -> nn.Module | None:
        return None  # the model is split; rank 0 samples from the gathered checkpoint weights


class PipelineEngine(MeshEngine):
    """A pipeline step: the rank's local batch is split into ``microbatches`` by the schedule,
    which runs forward and backward through the stages; then clipping and the optimizer step."""

    def __init__(self, chunks, stage_ids, plan, mesh, ctx):
        super().__init__(chunks, stage_ids, plan, mesh, ctx)
        self.stopwatch = Stopwatch(ctx.device)
        pp_group = mesh["pp"].get_group()
        self.stages = [TimedStage(chunk, stage_index=s, num_stages=plan.n_stages, device=ctx.device,
                                  group=pp_group, stopwatch=self.stopwatch,
                                  meter=self.activation_meter if s == stage_ids[0] else contextlib.nullcontext)
                       for chunk, s in zip(chunks, stage_ids)]
        self.is_first = 0 in stage_ids
        self.is_last = plan.n_stages - 1 in stage_ids
        cls = SCHEDULE_CLASSES[plan.schedule]
        stages = self.stages if cls is ScheduleInterleaved1F1B else self.stages[0]
        self.schedule = cls(stages, n_microbatches=plan.microbatches, loss_fn=self._loss)

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with self.stopwatch.timing():
            return causal_lm_loss(output, target)

    def _run(self, run, micro_batches: list[Batch]) -> torch.Tensor:
        """Runs ``run`` (the schedule's step or eval) on this rank's batch; returns the mean
        loss over the microbatches, averaged over the data-parallel replicas, on every rank."""
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        kwargs = {"target": y, "losses": losses} if self.is_last else {}
        with self.loss_context(), autocast(self.ctx.device, self.ctx.precision):
            run(*args, **kwargs)
        local = torch.zeros((), device=self.ctx.device)
        if self.is_last:
            local += torch.stack([full_value(v.detach()).float() for v in losses]).mean()
        # Only the last stage's ranks hold the loss: the sum over the world divided by their number.
        value = local.clone()
        dist.all_reduce(value)
        return value / self.plan.ranks_per_pipeline_rank

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        lr = self.optimizer.param_groups[0]["lr"]
        self.stopwatch.busy_s = 0.0
        start = time.perf_counter()
        loss = self._run(lambda *a, **k: self.schedule.step(*a, return_outputs=False, **k), micro_batches)
        wall = time.perf_counter() - start
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self._grad_bytes = tensor_bytes(p.grad for p in self.params)
        self.optimizer.zero_grad(set_to_none=True)
        idle = torch.tensor(max(0.0, 1.0 - self.stopwatch.busy_s / wall), device=self.ctx.device)
        bubble = mean_over_group(idle, dist.group.WORLD)
        return StepResult(loss=float(loss), grad_norm=float(grad_norm), lr=lr,
                          extra={"pipeline.bubble_fraction": bubble,
                                 "pipeline.theoretical_bubble_fraction": self.plan.theoretical_bubble()})

    @torch.no_grad()
    def eval_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        # The logits stay inside the last stage's schedule: the loss alone is reported.
        return {"val_loss": float(self._run(self.schedule.eval, micro_batches))}


def build(plan: Plan, model: Llama, ctx: EngineContext) -> MeshEngine:
    mesh = build_mesh(plan, ctx.device)
    stage_ids = plan.stage_ids(mesh["pp"].get_local_rank()) if plan.pp > 1 else [0]
    chunks = [stage_module(model, plan, s) for s in stage_ids] if plan.pp > 1 else [model]
    for chunk in chunks:
        if plan.tp > 1:
            apply_tensor_parallel(chunk, mesh["tp"], plan.sequence_parallel)
        prepare_blocks(chunk, ctx.trainer)
        if plan.dp > 1:
            # Under a pipeline each microbatch would gather the weights again: keep them.
            apply_data_parallel(chunk, mesh["dp_replicate", "dp_shard"],
                                reshard_after_forward=plan.data_parallel == "shard" and plan.pp == 1)
        materialize(chunk, ctx.device, ctx.seed)
    engine_cls = PipelineEngine if plan.pp > 1 else MeshEngine
    return engine_cls(chunks, stage_ids, plan, mesh, ctx)
