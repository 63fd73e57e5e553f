"""The job controller: an explicit state machine on the driver.

PENDING -> STARTING -> RUNNING -> (RESTARTING -> STARTING ->) SUCCEEDED | FAILED | STOPPED

STOPPED: the driver was interrupted (Ctrl-C, SIGTERM) and tore the job down.

It knows nothing about strategies: it starts a worker group, forwards metrics
to the sinks, and asks the restart policy what to do when a rank fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager

from orchestrator import checkpoint
from orchestrator.config import JobConfig
from orchestrator.data import PreparedData
from orchestrator.errors import ConfigError, stop_signal
from orchestrator.metrics import Sink, build_summary, read_history, write_status
from orchestrator.plan import plan_of
from orchestrator.storage import RunPlaces, Storage, places_of, without_credentials
from orchestrator.worker_group import WorkerFailure, WorkerGroup


class JobState(str, enum.Enum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


TRANSITIONS = {
    JobState.PENDING: {JobState.STARTING, JobState.FAILED, JobState.STOPPED},
    JobState.STARTING: {JobState.RUNNING, JobState.RESTARTING, JobState.FAILED, JobState.STOPPED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.RESTARTING, JobState.FAILED, JobState.STOPPED},
    JobState.RESTARTING: {JobState.STARTING, JobState.FAILED, JobState.STOPPED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.STOPPED: set(),
}


@dataclass(frozen=True)
class Decision:
    restart: bool
    reason: str


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int

    def decide(self, failure: Exception, restarts_so_far: int) -> Decision:
        if restarts_so_far < self.max_restarts:
            return Decision(True, f"restart {restarts_so_far + 1} of {self.max_restarts} after: {failure}")
        return Decision(False, f"{failure} (restarts used: {restarts_so_far} of {self.max_restarts})")


class JobController:
    def __init__(
        self,
        job: JobConfig,
        make_group: Callable[[], WorkerGroup],
        prepare_data: Callable[[], PreparedData],
        sinks: list[Sink],
        command_start: float,
        poll_interval_s: float = 1.0,
        connect: Callable[[], ContextManager] = contextlib.nullcontext,
        places: RunPlaces | None = None,
    ):
        self.job = job
        self.plan = plan_of(job)  # built once, here on the driver, and handed to every rank
        self.places = places or places_of(job)
        self.run_id: str | None = None
        self.make_group = make_group
        self.prepare_data = prepare_data
        self.sinks = sinks
        self.command_start = command_start
        self.poll_interval_s = poll_interval_s
        self.connect = connect
        self.state = JobState.PENDING
        self.transitions: list[tuple[JobState, float]] = [(self.state, time.time())]
        self.restarts = 0
        self.history: list[dict] = []
        self.run_metrics: list[dict] = []
        # Start-up phases, seconds after the command started (first attempt only).
        self.startup: dict[str, float] = {}
        self.sinks_started = False
        # Seconds from each detected failure to the first step after the restart.
        self.failed_at: float | None = None
        self.recoveries_s: list[float] = []
        # The step each attempt started from (0: from scratch; else the checkpoint's step).
        self.start_steps: list[int] = []
        self.sample_error: str | None = None  # why the end-of-job text sample failed, if it did

    def mark(self, phase: str) -> None:
        self.startup.setdefault(phase, round(time.time() - self.command_start, 3))

    def _to(self, state: JobState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal job transition {self.state.value} -> {state.value}")
        self.state = state
        self.transitions.append((state, time.time()))
        self._publish_status()

    def _publish_status(self) -> None:
        """``status.json`` in the run directory: what `launch.status` shows while the job runs."""
        if not Path(self.places.dir).is_dir():
            return
        write_status(self.places.status_file, self.job, self.state.value, self.history, self.restarts)

    def _claim_storage(self) -> str:
        """This run's id. A fresh job refuses storage that holds another run's checkpoints (before
        it writes anything); a resumed one continues the run whose checkpoint is newest there."""
        ckpts = self.places.checkpoints
        other, step = checkpoint.owner(ckpts)
        if self.job.run.resume:
            return other or uuid.uuid4().hex[:12]
        if step is not None:
            key = "run.storage" if self.places.separate_storage else "run.dir"
            raise ConfigError(key, f"{ckpts.root} already holds checkpoints of run {other or '(unknown: no manifest)'} "
                                   f"(newest: step {step}); set run.resume=true to continue that run, or choose "
                                   f"another {key}")
        return uuid.uuid4().hex[:12]

    def _resume_point(self, job: JobConfig) -> tuple[Storage | None, int]:
        """The verified checkpoint of this run to resume from (chosen once, here, for every rank)
        and its step."""
        ckpt = checkpoint.latest(self.places.checkpoints, self.run_id) if job.run.resume else None
        return ckpt, (checkpoint.read_trainer_state(ckpt).step if ckpt else 0)

    def _watch(self, group: WorkerGroup) -> list[dict]:
        timeout = self.job.trainer.step_timeout_s
        last_progress = time.time()
        while True:
            metrics, outcomes = group.poll(self.poll_interval_s)
            now = time.time()
            saving = group.saving_since()
            if metrics:
                last_progress = now
            elif saving is not None:  # a save is not a hang: it has its own, longer limit
                limit = self.job.trainer.save_timeout_s
                if outcomes is None and now - max(last_progress, saving[1]) > limit:
                    raise WorkerFailure(f"the checkpoint save of step {saving[0]} did not finish within "
                                        f"trainer.save_timeout_s={limit:g}s")
            elif timeout and outcomes is None and now - last_progress > timeout:
                raise WorkerFailure(f"no step finished within trainer.step_timeout_s={timeout:g}s (a rank is stuck)")
            if metrics and not self.sinks_started:
                self._start_sinks()
            if metrics and self.failed_at is not None:
                self.recoveries_s.append(round(metrics[0]["time"] - self.failed_at, 3))
                self.failed_at = None
            for m in metrics:
                self.history.append(m)
                self.run_metrics.append(m)
                for sink in self.sinks:
                    sink.log(m)
            if metrics:
                self._publish_status()
            if outcomes is not None:
                return outcomes

    def _sample(self, group: WorkerGroup) -> str | None:
        """The end-of-job text sample; training has finished and is saved, so a sample that fails
        is reported and the job still succeeds."""
        t = self.job.trainer
        try:
            return group.sample(t.sample_prompt, t.sample_tokens)
        except WorkerFailure as exc:
            self.sample_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return None

    def _start_sinks(self) -> None:
        """Sinks start once the first step is in: their start-up (wandb's takes seconds
        of CPU) must not compete with the workers' start-up. Rank 0's streamed metrics wait in Ray meanwhile."""
        for sink in self.sinks:
            sink.start(list(self.history))
        self.sinks_started = True
        self.mark("sinks_ready")

    def run(self) -> dict:
        """Runs the job to the end and returns its summary (also written to summary.json).

        Connecting to Ray (seconds for an embedded cluster) overlaps with data
        preparation, which runs in a thread. Data is ready, and its errors raised,
        before any worker is created.
        """
        job = self.job
        places = self.places
        self.run_id = self._claim_storage()  # before anything is written
        Path(places.dir).mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(job)
        record["run"]["storage_options"] = without_credentials(record["run"]["storage_options"])
        places.job_file.write_text(json.dumps({"run_id": self.run_id, **record}, indent=1))
        outcomes = None
        error = None
        sample = None
        n_params = None
        self.mark("controller_start")
        self._to(JobState.STARTING)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller")
        try:
            data_future = pool.submit(self.prepare_data)
            with self.connect():
                self.mark("connected")
                data = data_future.result()
                shutil.copyfile(data.tokenizer_path, places.tokenizer_file)  # saved with the run
                places.publish_run_files()
                self.mark("data_ready")
                while True:
                    group = self.make_group()  # actors start in the background
                    try:
                        resume_from, resume_step = self._resume_point(job)
                        self.start_steps.append(resume_step)
                        self.history = read_history(places.metrics_file, resume_step)
                        if self.sinks_started:  # a restart: forget the steps after the checkpoint
                            for sink in self.sinks:
                                sink.rewind(resume_step, self.history)
                        group.setup(job, self.plan, places, self.run_id, data, resume_from)
                        self.mark("workers_ready")
                        self._to(JobState.RUNNING)
                        group.start_training()
                        outcomes = self._watch(group)
                        n_params = group.n_params()
                        if job.trainer.sample_tokens:
                            sample = self._sample(group)
                        self._to(JobState.SUCCEEDED)
                        break
                    except WorkerFailure as failure:
                        self.failed_at = time.time()
                        decision = RestartPolicy(job.trainer.max_restarts).decide(failure, self.restarts)
                        if not decision.restart:
                            error = decision.reason
                            self._to(JobState.FAILED)
                            break
                        self.restarts += 1
                        self._to(JobState.RESTARTING)
                        job = dataclasses.replace(job, run=dataclasses.replace(job.run, resume=True))
                        self._to(JobState.STARTING)
                    finally:
                        group.shutdown()
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)
            if stopped:
                error = f"stopped by {stop_signal(exc)}"
            else:
                error = f"{type(exc).__name__}: {exc}"
            if TRANSITIONS[self.state]:
                self._to(JobState.STOPPED if stopped else JobState.FAILED)
            raise
        finally:
            pool.shutdown(wait=True)
            summary = build_summary(
                job, self.state.value, self.history,
                self.run_metrics, outcomes, self.command_start, time.time(), self.restarts, error, sample, n_params,
            )
            if self.run_metrics:
                self.startup["first_step"] = round(self.run_metrics[0]["time"] - self.command_start, 3)
            summary["startup_s"] = self.startup
            summary["recoveries_s"] = self.recoveries_s
            summary["start_step_per_attempt"] = self.start_steps
            if self.sample_error:
                summary["sample_error"] = self.sample_error
            summary["run_id"] = self.run_id
            summary["storage"] = places.storage.root
            places.summary_file.write_text(json.dumps(summary, indent=2))
            if self.sinks_started:
                for sink in self.sinks:
                    sink.finish(summary)
        return summary
