"""Metrics sinks on the driver (the summary they finish with is assembled in orchestrator.summary).

Sinks receive every step's metrics from the controller. Each has
``start(history)``, ``log(metrics)`` and ``finish(summary)``.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from orchestrator.config import JobConfig
from orchestrator.storage import RunPlaces

# Steps excluded from the throughput median (start-up, allocator warm-up).
WARMUP_STEPS = 2


class Sink(Protocol):
    def start(self, history: list[dict]) -> None: ...

    def log(self, metrics: dict) -> None: ...

    def rewind(self, step: int, history: list[dict]) -> None:
        """After a restart from the checkpoint of ``step``: ``history`` is what stands."""

    def finish(self, summary: dict) -> None: ...


def read_history(path: Path, upto_step: int) -> list[dict]:
    """Metrics already in a run's metrics.jsonl for steps 1..upto_step (a resumed run continues them)."""
    if upto_step <= 0 or not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short (a killed driver): that step is logged again
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto_step:
                by_step[rec["step"]] = rec  # a later record of a step replaces an earlier one
    return [by_step[s] for s in sorted(by_step)]


class JsonlSink:
    """``metrics.jsonl``: one JSON object per step, rewritten on resume to the checkpoint's history."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def start(self, history: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")
        for rec in history:
            self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def log(self, metrics: dict) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        self._f.flush()

    def rewind(self, step: int, history: list[dict]) -> None:
        self._f.close()
        self.start(history)

    def finish(self, summary: dict) -> None:
        if self._f:
            self._f.close()


class ProgressSink:
    """A live bar on the driver: step, loss, tokens/s and ETA."""

    def __init__(self, max_steps: int, enabled: bool = True):
        self.max_steps = max_steps
        self.enabled = enabled
        self.bar = None

    def start(self, history: list[dict]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.max_steps, initial=len(history), desc="train", unit="step",
                        disable=not self.enabled, mininterval=0.5, dynamic_ncols=True)

    def log(self, metrics: dict) -> None:
        self.bar.set_postfix_str(f"loss={metrics['loss']:.4f} tok/s={metrics['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(metrics["step"] - self.bar.n)

    def rewind(self, step: int, history: list[dict]) -> None:
        self.bar.n = step
        self.bar.refresh()

    def finish(self, summary: dict) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbSink:
    """One wandb run per job; offline by default (``wandb sync`` uploads it later)."""

    def __init__(self, job: JobConfig, run_dir: Path):
        self.job = job
        self.run_dir = run_dir
        self.run = None

    def start(self, history: list[dict]) -> None:
        import wandb

        cfg = self.job.logging.wandb
        self.run = wandb.init(
            mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=self.job.run.name,
            dir=str(self.run_dir), config=asdict(self.job), resume="allow" if history else None,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict) -> None:
        # Our step is a metric, not wandb's step (which only grows): steps repeated after a
        # restart from a checkpoint are kept, as they happened.
        self.run.log({k: v for k, v in metrics.items() if k != "time"})

    def rewind(self, step: int, history: list[dict]) -> None:
        pass

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            for key in ("final_loss", "tokens_per_s", "time_to_first_step_s", "wall_s", "status", "restarts"):
                self.run.summary[key] = summary.get(key)
            for key, values in per_rank_memory(summary).items():
                for rank, value in enumerate(values):
                    self.run.summary[f"{key}/rank{rank}"] = value
            self.run.finish(exit_code=0 if summary.get("status") == "succeeded" else 1)


class TensorBoardSink:
    """TensorBoard event files in ``<run>/tensorboard``: `tensorboard --logdir RUN_DIR` is a live
    dashboard with no account. A restart from a checkpoint purges the steps after it.

    Written with the tensorboard package's own event writer: torch's SummaryWriter would import
    torch into the driver (a second of CPU, taken from the ranks right after step 1)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.writer = None

    def _open(self, purge_after: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(self.dir), flush_secs=5)
        if purge_after:  # TensorBoard drops the events of steps after this one written before it
            self._event(step=purge_after + 1, session_log=SessionLog(status=SessionLog.START))

    def _event(self, **fields) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), **fields))

    def _scalars(self, step: int, values: dict) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(step=step, summary=Summary(
            value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]))

    def start(self, history: list[dict]) -> None:
        self._open(history[-1]["step"] if history else None)

    def log(self, metrics: dict) -> None:
        self._scalars(metrics["step"], {k: v for k, v in metrics.items()
                                        if k not in ("step", "time") and isinstance(v, (int, float))})

    def rewind(self, step: int, history: list[dict]) -> None:
        self.writer.close()
        self._open(step)

    def finish(self, summary: dict) -> None:
        if self.writer is None:
            return
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._scalars(summary["steps"], {f"{key}/rank{rank}": value
                                         for key, values in per_rank_memory(summary).items()
                                         for rank, value in enumerate(values) if value is not None})
        self._event(step=summary["steps"], summary=text_pb("summary", "```\n" + json.dumps(
            {k: v for k, v in summary.items() if k != "losses"}, indent=1, default=str) + "\n```"))
        self.writer.close()


def per_rank_memory(summary: dict) -> dict[str, list]:
    """Per-rank memory figures of a summary: model-state bytes and peak RSS."""
    return {"memory/model_states_bytes": summary["memory"].get("model_states_bytes_per_rank") or [],
            "memory/peak_rss_bytes": summary.get("peak_rss_bytes_per_rank") or []}


class ReportSink:
    """``report.png`` at the end of the job: loss and tokens/s over steps, memory per rank."""

    def __init__(self, path: Path):
        self.path = path
        self.history: list[dict] = []

    def start(self, history: list[dict]) -> None:
        self.history = list(history)

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)

    def rewind(self, step: int, history: list[dict]) -> None:
        self.history = list(history)

    def finish(self, summary: dict) -> None:
        from orchestrator.plots import job_report

        job_report(self.history, summary, self.path)


class RayMetricsSink:
    """Gauges through Ray's metrics API (forgeline_loss, forgeline_tokens_per_s,
    forgeline_step_time_s, forgeline_rss_bytes, tagged with the job's name): the node's
    metrics agent exports them, so a Prometheus scrape of the cluster sees them."""

    NAMES = {"loss": "training loss", "tokens_per_s": "training throughput",
             "step_time_s": "seconds per optimizer step", "rss_bytes": "peak resident memory of rank 0"}

    def __init__(self, job_name: str):
        self.job_name = job_name
        self.gauges: dict = {}

    def start(self, history: list[dict]) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {key: Gauge(f"forgeline_{key}", description=desc, tag_keys=("job",))
                       for key, desc in self.NAMES.items()}

    def log(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(metrics[key], tags={"job": self.job_name})

    def rewind(self, step: int, history: list[dict]) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


def write_status(path: Path, job: JobConfig, state: str, history: list[dict], restarts: int) -> None:
    """``status.json``: the job's state and latest step, replaced atomically (readers never see half)."""
    last = history[-1] if history else {}
    recent = [m["step_time_s"] for m in history[-10:]]
    step = last.get("step", 0)
    status = {
        "name": job.run.name, "state": state, "strategy": job.strategy.name, "world_size": job.cluster.num_workers,
        "step": step, "max_steps": job.trainer.max_steps, "loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"), "restarts": restarts, "updated": time.time(),
        "eta_s": statistics.median(recent) * (job.trainer.max_steps - step) if recent else None,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def default_sinks(job: JobConfig, places: RunPlaces) -> list[Sink]:
    sinks: list[Sink] = [JsonlSink(places.metrics_file), ProgressSink(job.trainer.max_steps, job.logging.progress),
                         TensorBoardSink(places.tensorboard_dir), ReportSink(places.report_file),
                         RayMetricsSink(job.run.name)]
    if job.logging.wandb.mode != "disabled":
        sinks.append(WandbSink(job, Path(places.dir)))
    return sinks
