"""The job controller: an explicit state machine on the driver.

PENDING -> STARTING -> RUNNING -> (RESTARTING -> STARTING ->) SUCCEEDED | FAILED | STOPPED

STOPPED: the driver was interrupted (Ctrl-C, SIGTERM) and tore the job down.

It knows strategies only through the job's plan, which it builds once and hands to the
worker group: it starts a worker group, forwards metrics to the sinks, asks the restart policy
what to do when a rank fails, and assembles the summary (orchestrator.summary) at the end.
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
from orchestrator.metrics import Sink, read_history, write_status
from orchestrator.plan import plan_of
from orchestrator.results import TrainOutcome
from orchestrator.storage import RunPlaces, Storage, places_of, without_credentials
from orchestrator.summary import RunRecord, build_summary
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
        # What the attempts produce, for the summary.
        self.data: PreparedData | None = None
        self.group: WorkerGroup | None = None  # the current attempt's
        self.outcomes: list[TrainOutcome] | None = None
        self.n_params: int | None = None
        self.sample: str | None = None
        self.error: str | None = None
        self.summary: dict = {}

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

        One state at a time: STARTING, RUNNING and RESTARTING are each a short method that returns
        the next state, until a terminal one. Connecting to Ray (seconds for an embedded cluster)
        overlaps with data preparation, which runs in a thread. Data is ready, and its errors
        raised, before any worker is created.
        """
        self._open()
        steps = {JobState.STARTING: self._start_attempt, JobState.RUNNING: self._run_attempt,
                 JobState.RESTARTING: self._restart}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller")
        try:
            data_future = pool.submit(self.prepare_data)
            with self.connect():
                self.mark("connected")
                self._take_data(data_future.result())
                try:
                    while self.state in steps:
                        self._to(steps[self.state]())
                finally:  # whatever ends the job, its workers go while Ray is still connected
                    self._end_attempt()
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)
            self.error = f"stopped by {stop_signal(exc)}" if stopped else f"{type(exc).__name__}: {exc}"
            if TRANSITIONS[self.state]:
                self._to(JobState.STOPPED if stopped else JobState.FAILED)
            raise
        finally:
            pool.shutdown(wait=True)
            self._close()
        return self.summary

    def _open(self) -> None:
        """The run's id and job.json, before anything else is written."""
        self.run_id = self._claim_storage()
        Path(self.places.dir).mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(self.job)
        record["run"]["storage_options"] = without_credentials(record["run"]["storage_options"])
        self.places.job_file.write_text(json.dumps({"run_id": self.run_id, **record}, indent=1))
        self.mark("controller_start")
        self._to(JobState.STARTING)

    def _take_data(self, data: PreparedData) -> None:
        self.data = data
        shutil.copyfile(data.tokenizer_path, self.places.tokenizer_file)  # saved with the run
        self.places.publish_run_files()
        self.mark("data_ready")

    def _start_attempt(self) -> JobState:
        """STARTING: a new worker group, set up from this run's newest checkpoint (if any)."""
        self.group = self.make_group()  # actors start in the background
        resume_from, resume_step = self._resume_point(self.job)
        self.start_steps.append(resume_step)
        self.history = read_history(self.places.metrics_file, resume_step)
        if self.sinks_started:  # a restart: forget the steps after the checkpoint
            for sink in self.sinks:
                sink.rewind(resume_step, self.history)
        try:
            self.group.setup(self.job, self.plan, self.places, self.run_id, self.data, resume_from)
        except WorkerFailure as failure:
            return self._failed(failure)
        self.mark("workers_ready")
        return JobState.RUNNING

    def _run_attempt(self) -> JobState:
        """RUNNING: training until every rank has finished, then the text sample."""
        try:
            self.group.start_training()
            self.outcomes = self._watch(self.group)
            self.n_params = self.group.n_params()
            if self.job.trainer.sample_tokens:
                self.sample = self._sample(self.group)
        except WorkerFailure as failure:
            return self._failed(failure)
        self._end_attempt()
        return JobState.SUCCEEDED

    def _failed(self, failure: WorkerFailure) -> JobState:
        """A rank failed: the attempt ends, and the restart policy decides what comes next."""
        self.failed_at = time.time()
        self._end_attempt()
        decision = RestartPolicy(self.job.trainer.max_restarts).decide(failure, self.restarts)
        if not decision.restart:
            self.error = decision.reason
            return JobState.FAILED
        return JobState.RESTARTING

    def _restart(self) -> JobState:
        """RESTARTING: the next attempt resumes from the newest checkpoint."""
        self.restarts += 1
        self.job = dataclasses.replace(self.job, run=dataclasses.replace(self.job.run, resume=True))
        return JobState.STARTING

    def _end_attempt(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            group.shutdown()

    def _close(self) -> None:
        """summary.json, and the sinks' end."""
        self.summary = build_summary(RunRecord(
            job=self.job, status=self.state.value, history=self.history, run_metrics=self.run_metrics,
            outcomes=self.outcomes, command_start=self.command_start, end=time.time(), restarts=self.restarts,
            error=self.error, sample=self.sample, sample_error=self.sample_error, n_params=self.n_params,
            startup=self.startup, recoveries_s=self.recoveries_s, start_steps=self.start_steps, run_id=self.run_id,
            storage=self.places.storage.root))
        self.places.summary_file.write_text(json.dumps(self.summary, indent=2))
        if self.sinks_started:
            for sink in self.sinks:
                sink.finish(self.summary)
