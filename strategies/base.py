"""The Engine interface every strategy returns, and the plain-torch engine.

A training step takes the micro-batches of one optimizer step on this rank and
returns the *global* mean loss (averaged over data-parallel ranks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from orchestrator.config import OptimConfig, TrainerConfig
from orchestrator.optim import build_optimizer, build_scheduler
from orchestrator.plan import Plan
from orchestrator.results import MemoryReport
from strategies.activations import MetersActivations, prepare_blocks  # noqa: F401  (strategies import them here)

# (input ids, target ids), both (B, T), then whatever the job's objective needs besides
# (orchestrator.alignment.losses): reference log-probabilities, advantages.
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class EngineContext:
    """What a strategy needs besides its own options and the model."""

    plan: Plan
    rank: int
    device: torch.device
    precision: str  # fp32 | bf16 (already resolved from auto)
    optim: OptimConfig
    trainer: TrainerConfig
    seed: int
    # finetune.lora when its rank is > 0: the engine trains adapters on a frozen model.
    lora: Any = None
    # The loss of each micro-batch from its logits (orchestrator.alignment.losses); None: the
    # data's own language-model loss.
    objective: Any = None

    @property
    def max_steps(self) -> int:
        return self.trainer.max_steps

    @property
    def loss_of(self):
        from orchestrator.alignment.losses import LanguageModeling

        return self.objective or LanguageModeling()


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    # Strategy-specific per-step figures ("group.name" -> float), logged with the step's
    # metrics and summarized per group in summary.json (e.g. pipeline.bubble_fraction).
    extra: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    def train_step(self, micro_batches: list[Batch]) -> StepResult: ...

    # {"val_loss": mean loss, "val_exact_match": fraction of rows whose every target token is
    # the model's greedy choice (where the engine sees whole logits; else absent)}.
    def eval_step(self, micro_batches: list[Batch]) -> dict[str, float]: ...

    # The training state as checkpoint entries (see orchestrator.dcp): "model.<name>" for every
    # weight a checkpoint holds (a LoRA job's adapters only) and "optim.exp_avg.<name>",
    # "optim.exp_avg_sq.<name>" for every trainable parameter, keyed by the single-device model's
    # names whatever the layout. Each is this rank's part only (a plain tensor where replicated, a
    # DTensor, or orchestrator.dcp.Chunks) and a view of the live state: loading writes into it.
    def checkpoint_state(self) -> dict: ...

    # What a checkpoint keeps besides tensors: {"optimizer_step": int, "scheduler": dict}.
    def counters(self) -> dict: ...

    # Before a checkpoint is loaded into a fresh engine: creates the optimizer state to load into.
    def prepare_load(self) -> None: ...

    # After: optimizer step counts and schedule from ``counters``, working copies from the loaded state.
    def finish_load(self, counters: dict) -> None: ...

    # Whole pretrained weights (name -> full tensor, every rank): the model's weights only.
    def load_weights(self, weights: dict) -> None: ...

    # The whole weights, complete on rank 0 (collective): for the end-of-job text sample and the
    # weight push to an inference pool of a model no rank holds whole. Not used by checkpoints.
    def gather_weights(self) -> dict: ...

    def memory_report(self) -> MemoryReport: ...

    def generation_model(self) -> nn.Module | None: ...


def mean_over_group(value: torch.Tensor, group: dist.ProcessGroup | None) -> float:
    """Mean of a scalar over a process group (None: the whole world), as a float."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)  # gloo has no AVG
        value /= dist.get_world_size(group)
    return float(value)


def materialize(model: nn.Module, ctx: EngineContext) -> nn.Module:
    """Allocates a meta-device model on the context's device, initializes it deterministically
    and, for a LoRA job, injects the adapters (freezing the rest)."""
    model = model.to_empty(device=ctx.device)
    model.init_weights(ctx.seed)
    if ctx.lora is not None:
        from orchestrator import lora

        model = lora.apply(model, ctx.lora, ctx.seed)
    return model


def model_weights(model: nn.Module, weights: dict) -> dict:
    """A state's weights under the model's own names (see orchestrator.lora.to_model_names)."""
    from orchestrator import lora

    return lora.to_model_names(model, weights)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], micro_batches: list[Batch], device: torch.device,
             group: dist.ProcessGroup | None, objective=None) -> dict[str, float]:
    """The objective's held-out figures (for the language-model loss: the mean loss and the
    exact-match rate of the rows, a row matching when the greedy choice at every target position
    is the target, so that greedy decoding would reproduce the reference answer), averaged over
    the micro-batches (all of one size) and ``group``'s ranks."""
    from orchestrator.alignment.losses import LanguageModeling, reduce_stats

    objective = objective or LanguageModeling()
    stats = [objective.eval_stats(full_value(forward(b[0])), b)  # tensor-parallel logits gathered for eval
             for b in micro_batches]
    return reduce_stats(stats, group)


def restore_schedule(scheduler, state: dict | None) -> None:
    """Loads a LambdaLR state and puts its current rate into the optimizer's groups
    (LambdaLR.load_state_dict alone leaves the groups at their initial rate). None: keep
    the fresh schedule (pretrained weights without a training state)."""
    if state is None:
        return
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def autocast(device: torch.device, precision: str) -> ContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def zero_formula(stage: int, psi: int, n: int, param_bytes: int, grad_bytes: int, k: int) -> dict:
    """Model-state bytes per rank by the ZeRO paper's accounting: working parameters, gradients
    and K bytes of optimizer state per parameter; stage s partitions the last s of those three
    across the n data-parallel ranks (stage 0 is plain data parallel)."""
    p, g = param_bytes * psi, grad_bytes * psi
    o = k * psi
    total = {0: p + g + o, 1: p + g + o / n, 2: p + (g + o) / n, 3: (p + g + o) / n}[stage]
    shape = {0: "(P+G+K)Ψ", 1: "(P+G)Ψ + KΨ/N", 2: "PΨ + (G+K)Ψ/N", 3: "(P+G+K)Ψ/N"}[stage]
    return {"formula_bytes": int(total),
            "formula": f"stage {stage}: {shape} with P={param_bytes}, G={grad_bytes}, K={k}, Ψ={psi}, N={n}"}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor is its own part)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor, gathered (collective over its mesh); a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def tensor_bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


class TorchEngine(MetersActivations):
    """Forward/backward over micro-batches, clipping, AdamW and the LR schedule.

    ``module`` is what runs forward (possibly a DDP wrapper); ``model`` is the
    underlying single-device model whose state is saved. ``no_sync`` returns the
    context that skips gradient synchronization on all but the last micro-batch.
    """

    def __init__(
        self,
        module: nn.Module,
        model: nn.Module,
        ctx: EngineContext,
        dp_group: dist.ProcessGroup | None = None,
        no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
    ):
        self.module = module
        self.model = model
        self.ctx = ctx
        self.dp_group = dp_group
        self.no_sync = no_sync
        self.optimizer = build_optimizer(model, ctx.optim)
        self.scheduler = build_scheduler(self.optimizer, ctx.optim, ctx.max_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._grad_bytes = 0

    def _mean_over_dp(self, value: torch.Tensor) -> float:
        return mean_over_group(value, self.dp_group) if self.dp_group is not None else float(value)

    def loss_context(self) -> ContextManager:
        """Wraps each micro-batch's loss and its backward (tensor parallel's loss_parallel)."""
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        """Clips to optim.grad_clip (0: no clipping) and returns the total norm before clipping."""
        clip = self.ctx.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        from orchestrator.alignment.losses import reduce_stats

        n = len(micro_batches)
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), device=self.ctx.device)
        stats = []
        objective = self.ctx.loss_of
        for i, batch in enumerate(micro_batches):
            sync = self.no_sync() if i < n - 1 else contextlib.nullcontext()
            with sync, self.loss_context():
                with autocast(self.ctx.device, self.ctx.precision), self.activation_meter():
                    loss, extra = objective.loss(self.module(batch[0]), batch)
                (loss / n).backward()
            total += full_value(loss.detach())
            stats.append(extra)
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self._grad_bytes = tensor_bytes(p.grad for p in self.params)  # as held during the step
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=self._mean_over_dp(total / n), grad_norm=float(grad_norm), lr=lr,
                          extra=reduce_stats(stats, self.dp_group))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x`` in evaluation mode, without gradients."""
        self.module.eval()
        try:
            with autocast(self.ctx.device, self.ctx.precision):
                return full_value(self.module(x)).float()
        finally:
            self.module.train()

    def eval_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.ctx.device, self.ctx.precision):
                return self.module(x)

        self.module.eval()
        try:
            return evaluate(forward, micro_batches, self.ctx.device, self.dp_group, self.ctx.objective)
        finally:
            self.module.train()

    def _named(self):
        """(name in the single-device model, parameter) for every parameter this rank holds."""
        return self.model.named_parameters()

    def checkpoint_state(self) -> dict:
        from orchestrator import lora

        out: dict = {}
        saved = lora.saved_weights(self.model, dict(self._named()))
        for name, p in self._named():
            st = self.optimizer.state.get(p)
            if name in saved:
                out[f"model.{name}"] = p.detach()
            if p.requires_grad and st:
                out[f"optim.exp_avg.{name}"] = st["exp_avg"]
                out[f"optim.exp_avg_sq.{name}"] = st["exp_avg_sq"]
        return out

    def counters(self) -> dict:
        steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
        return {"optimizer_step": steps[0] if steps else 0, "scheduler": self.scheduler.state_dict()}

    def prepare_load(self) -> None:
        for _, p in self._named():
            if p.requires_grad and not self.optimizer.state.get(p):
                self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}

    def finish_load(self, counters: dict) -> None:
        for st in self.optimizer.state.values():
            st["step"] = torch.tensor(float(counters["optimizer_step"]))
        restore_schedule(self.scheduler, counters["scheduler"])

    def load_weights(self, weights: dict) -> None:
        self.model.load_state_dict(model_weights(self.model, weights), strict=False)

    def gather_weights(self) -> dict:
        from orchestrator import lora

        return lora.saved_weights(self.model, {name: p.detach() for name, p in self._named()})

    def memory_report(self) -> MemoryReport:
        params = tensor_bytes(self.params)
        grads = self._grad_bytes
        optim = optimizer_state_bytes(self.optimizer)
        psi = sum(p.numel() for p in self.params)
        # torch AdamW keeps no master copy: fp32 parameters and gradients, K = 8 (m and v).
        return MemoryReport(params_bytes=params, grads_bytes=grads, optimizer_bytes=optim,
                            model_states_bytes=params + grads + optim, **zero_formula(0, psi, 1, 4, 4, 8),
                            **self.activation_report(self.ctx.trainer))

    def generation_model(self) -> nn.Module | None:
        return self.model
