"""The job's summary (summary.json), assembled on the driver from one RunRecord."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from orchestrator.config import JobConfig
from orchestrator.metrics import WARMUP_STEPS
from orchestrator.results import MemoryReport, TrainOutcome


def memory_summary(reports: list[MemoryReport]) -> dict:
    """Model-state bytes each rank holds (counted from tensors) against the ZeRO formula, and the
    activation bytes one micro-batch's forward leaves for the backward pass on each rank (under a
    pipeline, through the rank's first stage) with the activation checkpointing that ran."""
    per_rank = [asdict(r) for r in reports]
    measured = [m.get("model_states_bytes") for m in per_rank]
    formula = per_rank[0].get("formula_bytes") if per_rank else None
    out = {"model_states_bytes_per_rank": measured, "zero_formula_bytes": formula,
           "zero_formula": per_rank[0].get("formula") if per_rank else None,
           "ratio_to_formula_per_rank": [m / formula if m and formula else None for m in measured],
           "activation_bytes_per_rank": [m.get("activation_bytes") for m in per_rank],
           "activation_checkpointing": per_rank[0].get("activation_checkpointing") if per_rank else None,
           "per_rank": per_rank}
    if per_rank and per_rank[0]["formula_bytes_without_master_copy"] is not None:
        out["zero_formula_bytes_without_master_copy"] = per_rank[0]["formula_bytes_without_master_copy"]
    return out


def checkpoint_summary(per_rank: list[list[dict]]) -> list[dict]:
    """One entry per checkpoint saved in the last attempt: seconds training was blocked (the most
    any rank was), total seconds (rank 0, up to its manifest), bytes each rank wrote and held, and
    the save's peak memory above what rank 0 held when it began."""
    out = []
    for i, first in enumerate(per_rank[0] if per_rank else []):
        records = [r[i] for r in per_rank if i < len(r)]
        out.append({"step": first["step"], "async": first["async"],
                    "blocked_s": max(r["blocked_s"] for r in records), "total_s": first.get("total_s"),
                    "write_cpu_s_per_rank": [r.get("write_cpu_s") for r in records],
                    "bytes_written_per_rank": [r.get("bytes_written") for r in records],
                    "held_bytes_per_rank": [r["held_bytes"] for r in records],
                    "staged_bytes_per_rank": [r["staged_bytes"] for r in records],
                    "rss_growth_bytes_rank0": first.get("rss_growth_bytes"),
                    "peak_extra_bytes_rank0": first.get("peak_extra_bytes")})
    return out


def grouped_extras(run_metrics: list[dict]) -> dict:
    """Strategy figures logged per step as "group.name" (e.g. pipeline.bubble_fraction):
    per group, each name's median over the steady steps (after warm-up) and its per-step values."""
    steady = run_metrics[WARMUP_STEPS:] or run_metrics
    out: dict = {}
    for key in dict.fromkeys(k for m in run_metrics for k in m if "." in k):
        group, name = key.split(".", 1)
        values = [m[key] for m in steady if key in m]
        out.setdefault(group, {})[name] = statistics.median(values) if values else None
        out[group][f"{name}_per_step"] = [m.get(key) for m in run_metrics]
    return out


def last_eval(history: list[dict]) -> dict | None:
    """The newest held-out evaluation: its step and val_* figures."""
    evals = [m for m in history if "val_loss" in m]
    if not evals:
        return None
    return {"step": evals[-1]["step"], **{k: v for k, v in evals[-1].items() if k.startswith("val_")}}


@dataclass
class RunRecord:
    """Everything the driver knows of a job at its end, from which its summary is built."""

    job: JobConfig
    status: str
    history: list[dict]  # every step's metrics of the run (all attempts, as kept after rewinds)
    run_metrics: list[dict]  # the steps this command ran
    outcomes: list[TrainOutcome] | None  # every rank's, from the attempt that finished
    command_start: float
    end: float
    restarts: int
    error: str | None = None
    sample: str | None = None
    sample_error: str | None = None
    n_params: int | None = None
    startup: dict = field(default_factory=dict)  # seconds from the command's start to each milestone
    recoveries_s: list[float] = field(default_factory=list)
    start_steps: list[int] = field(default_factory=list)  # the step each attempt started from
    run_id: str | None = None
    storage: str | None = None


def build_summary(r: RunRecord) -> dict:
    """summary.json's contents."""
    job, history, run_metrics = r.job, r.history, r.run_metrics
    steady = [m["tokens_per_s"] for m in run_metrics[WARMUP_STEPS:]] or [m["tokens_per_s"] for m in run_metrics]
    losses = [m["loss"] for m in history]
    outcomes = r.outcomes or []
    summary = {
        "status": r.status,
        "strategy": job.strategy.name,
        "world_size": job.cluster.num_workers,
        "model": job.model.name,
        "n_params": r.n_params,
        "n_trainable_params": outcomes[0].trainable_params if outcomes else None,
        "steps": history[-1]["step"] if history else 0,
        "max_steps": job.trainer.max_steps,
        "exited_early": any(o.exited_early for o in outcomes),
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "tokens_per_s": statistics.median(steady) if steady else None,
        "time_to_first_step_s": (run_metrics[0]["time"] - r.command_start) if run_metrics else None,
        "wall_s": r.end - r.command_start,
        "peak_rss_bytes_per_rank": [o.peak_rss_bytes for o in outcomes],
        "node_per_rank": [o.node_id for o in outcomes],
        "cores_per_rank": [o.cores for o in outcomes],
        "nice_per_rank": [o.nice for o in outcomes],
        "memory": memory_summary([o.memory for o in outcomes]),
        "checkpoints": checkpoint_summary([o.checkpoints or [] for o in outcomes]),
        "eval": last_eval(history),
        "restarts": r.restarts,
        "error": r.error,
        "sample": r.sample,
        **grouped_extras(run_metrics),
    }
    startup = dict(r.startup)
    if run_metrics:
        startup["first_step"] = round(run_metrics[0]["time"] - r.command_start, 3)
    summary.update(startup_s=startup, recoveries_s=r.recoveries_s, start_step_per_attempt=r.start_steps)
    if r.sample_error:
        summary["sample_error"] = r.sample_error
    summary.update(run_id=r.run_id, storage=r.storage)
    return summary
