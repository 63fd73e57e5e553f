"""What ranks send back to the driver across Ray, typed (no torch: the driver unpickles them).

Rank 0's StepMetrics after every step; every rank's TrainOutcome (with its MemoryReport) at the
end. The driver turns step metrics into flat records (``StepMetrics.record``) at the Ray
boundary: that is what metrics.jsonl holds and what the sinks read.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step, measured on rank 0."""

    step: int
    loss: float  # the global mean loss (averaged over data-parallel ranks)
    lr: float
    grad_norm: float
    tokens_per_s: float
    step_time_s: float
    tokens: int  # trained so far
    time: float  # wall-clock time at the step's end
    rss_bytes: int  # rank 0's peak resident memory so far
    # Further named figures: a strategy's or the alignment objective's "group.name" figures,
    # held-out "val_*" figures where the step evaluated, "inference.*" where it synced a pool.
    figures: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """The flat record: the fields, then the figures."""
        out = {f: getattr(self, f) for f in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                                              "tokens", "time", "rss_bytes")}
        out.update(self.figures)
        return out


@dataclass(frozen=True)
class MemoryReport:
    """One rank's memory: model-state bytes counted from its tensors against the ZeRO paper's
    formula (strategies.base.zero_formula), and the activation bytes of one micro-batch."""

    params_bytes: int | None = None  # working parameters (stage 3: this rank's partitions)
    grads_bytes: int | None = None  # gradients as held during the step
    optimizer_bytes: int | None = None  # AdamW's moments
    model_states_bytes: int | None = None  # all of the above (and a master copy where kept)
    formula_bytes: int | None = None
    formula: str | None = None
    master_params_bytes: int | None = None  # DeepSpeed's fp32 master partitions
    formula_bytes_without_master_copy: int | None = None  # ZeRO engines: the fp32 accounting with K = 8
    # Bytes one micro-batch's forward leaves for the backward pass (strategies.activations).
    activation_bytes: int | None = None
    activation_checkpointing: str = "none"


@dataclass
class TrainOutcome:
    """A rank's end of training."""

    rank: int
    first_step: int
    last_step: int
    exited_early: bool
    peak_rss_bytes: int
    memory: MemoryReport
    trainable_params: int
    # Per checkpoint this rank saved: step, blocked_s, total_s, bytes_written, held_bytes (and on
    # rank 0 peak_extra_bytes); see orchestrator.checkpoint.Checkpointer.
    checkpoints: list = field(default_factory=list)
    node_id: str | None = None  # the Ray node it ran on
    cores: list[int] | None = None  # the cores its process was bound to (CPU ranks)
    nice: int | None = None
