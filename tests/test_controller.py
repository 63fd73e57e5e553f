"""Controller state machine and restart policy, with a fake worker group (no Ray)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orchestrator.controller import TRANSITIONS, JobController, JobState, RestartPolicy
from orchestrator.data import PreparedData
from orchestrator.results import MemoryReport, TrainOutcome
from orchestrator.worker_group import WorkerFailure



class FakeGroup:
    """Reports ``steps`` steps; fails at ``fail_at_step`` on the first ``failures`` groups."""

    made = 0

    def __init__(self, log: list, steps: int, fail_plan: list[int | None], start_step: int = 0):
        self.log = log
        self.index = FakeGroup.made
        FakeGroup.made += 1
        self.steps = steps
        self.fail_at = fail_plan[self.index] if self.index < len(fail_plan) else None
        self.step = start_step
        self.log.append(("create", self.index))

    def setup(self, job, plan, places, run_id, data, resume_from):
        self.log.append(("setup", self.index, job.run.resume))
        return self.step

    def start_training(self):
        self.log.append(("train", self.index))

    def poll(self, timeout_s):
        if self.step >= self.steps:
            return [], [TrainOutcome(rank=0, first_step=0, last_step=self.step, exited_early=False, peak_rss_bytes=1,
                                     memory=MemoryReport(model_states_bytes=2), trainable_params=123)]
        self.step += 1
        if self.fail_at is not None and self.step == self.fail_at:
            raise WorkerFailure(f"rank 1 died at step {self.step}", rank=1)
        return [{"step": self.step, "loss": 10.0 / self.step, "lr": 1e-3, "tokens_per_s": 100.0,
                 "step_time_s": 0.1, "time": 0.0}], None

    def saving_since(self):
        return None

    def sample(self, prompt, n):
        return prompt + " ..."

    def n_params(self):
        return 123

    def shutdown(self):
        self.log.append(("shutdown", self.index))


class ListSink:
    def __init__(self):
        self.events = []

    def start(self, history):
        self.events.append(("start", len(history)))

    def log(self, m):
        self.events.append(("log", m["step"]))

    def rewind(self, step, history):
        self.events.append(("rewind", step))

    def finish(self, summary):
        self.events.append(("finish", summary["status"]))


@pytest.fixture
def job(make_job):
    return make_job("trainer.max_steps=4", "trainer.sample_tokens=5")


def run(job, fail_plan, max_restarts=0):
    FakeGroup.made = 0
    log: list = []
    job.trainer.max_restarts = max_restarts
    sink = ListSink()
    tokenizer = Path(job.run.dir).parent / "tokenizer.json"
    tokenizer.write_text("{}")
    data = PreparedData(tokens_path="unused", tokenizer_path=str(tokenizer), n_tokens=0, eos_id=0, vocab_size=512)
    ctl = JobController(job, make_group=lambda: FakeGroup(log, 4, fail_plan), prepare_data=lambda: data,
                        sinks=[sink], command_start=0.0, poll_interval_s=0.0)
    return ctl, ctl.run(), log, sink


def test_success_path(job):
    ctl, summary, log, sink = run(job, [])
    assert [s for s, _ in ctl.transitions] == [JobState.PENDING, JobState.STARTING, JobState.RUNNING,
                                               JobState.SUCCEEDED]
    assert summary["status"] == "succeeded" and summary["steps"] == 4 and summary["restarts"] == 0
    assert summary["losses"] == [10.0, 5.0, 10.0 / 3, 2.5] and summary["sample"] == "ROMEO: ..."
    assert log[-1] == ("shutdown", 0)
    assert sink.events[0] == ("start", 0) and sink.events[-1] == ("finish", "succeeded")
    on_disk = json.loads(Path(job.run.dir, "summary.json").read_text())
    assert on_disk["status"] == "succeeded"


def test_failure_without_restarts_fails_with_cause(job):
    ctl, summary, log, sink = run(job, [2], max_restarts=0)
    assert ctl.state == JobState.FAILED and summary["status"] == "failed"
    assert "rank 1 died at step 2" in summary["error"]
    assert ("shutdown", 0) in log
    assert sink.events[-1] == ("finish", "failed")


def test_restart_then_success(job):
    ctl, summary, log, _ = run(job, [3], max_restarts=1)
    states = [s for s, _ in ctl.transitions]
    assert states == [JobState.PENDING, JobState.STARTING, JobState.RUNNING, JobState.RESTARTING,
                      JobState.STARTING, JobState.RUNNING, JobState.SUCCEEDED]
    assert summary["status"] == "succeeded" and summary["restarts"] == 1
    # The second group is told to resume; the first was torn down before it was made.
    assert log.index(("shutdown", 0)) < log.index(("create", 1))
    assert ("setup", 1, True) in log


def test_restarts_are_bounded(job):
    ctl, summary, _, _ = run(job, [2, 2, 2], max_restarts=2)
    assert summary["status"] == "failed" and summary["restarts"] == 2
    assert "restarts used: 2 of 2" in summary["error"]


def test_policy_and_transition_table():
    assert RestartPolicy(1).decide(RuntimeError("x"), 0).restart
    assert not RestartPolicy(1).decide(RuntimeError("x"), 1).restart
    assert TRANSITIONS[JobState.SUCCEEDED] == set() and TRANSITIONS[JobState.FAILED] == set()


class StuckGroup(FakeGroup):
    """Every rank alive, no step ever finishes: a rank stuck in a collective."""

    def poll(self, timeout_s):
        time.sleep(0.01)
        return [], None


class SlowSaveGroup(FakeGroup):
    """Rank 0 says a save started after step 2; the save then takes ``save_s`` seconds."""

    save_s = 0.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saving = None

    def poll(self, timeout_s):
        time.sleep(0.01)
        if self.saving is not None:
            if time.time() - self.saving[1] < self.save_s:
                return [], None
            self.saving = None
        if self.step == 2 and not getattr(self, "saved", False):
            self.saved = True
            self.saving = (2, time.time())
            return [], None
        return super().poll(timeout_s)

    def saving_since(self):
        return self.saving


def _stub_data(job):
    tokenizer = Path(job.run.dir).parent / "tokenizer.json"
    tokenizer.write_text("{}")
    return PreparedData(tokens_path="unused", tokenizer_path=str(tokenizer), n_tokens=0, eos_id=0, vocab_size=512)


def test_a_save_longer_than_the_step_timeout_is_not_a_hang(job):
    job.trainer.step_timeout_s = 0.2
    job.trainer.sample_tokens = 0
    data = _stub_data(job)
    SlowSaveGroup.save_s = 0.6  # three step timeouts
    ctl = JobController(job, make_group=lambda: SlowSaveGroup([], 4, []), prepare_data=lambda: data, sinks=[],
                        command_start=0.0, poll_interval_s=0.0)
    summary = ctl.run()
    assert summary["status"] == "succeeded", summary["error"]
    # ... but a save longer than trainer.save_timeout_s is.
    job.trainer.save_timeout_s = 0.3
    ctl = JobController(job, make_group=lambda: SlowSaveGroup([], 4, []), prepare_data=lambda: data, sinks=[],
                        command_start=0.0, poll_interval_s=0.0)
    summary = ctl.run()
    assert summary["status"] == "failed" and "trainer.save_timeout_s" in summary["error"], summary["error"]


def test_a_hang_is_detected_by_the_step_timeout(job):
    job.trainer.step_timeout_s = 0.2
    tokenizer = Path(job.run.dir).parent / "tokenizer.json"
    tokenizer.write_text("{}")
    data = PreparedData(tokens_path="unused", tokenizer_path=str(tokenizer), n_tokens=0, eos_id=0, vocab_size=512)
    log: list = []
    ctl = JobController(job, make_group=lambda: StuckGroup(log, 4, []), prepare_data=lambda: data, sinks=[],
                        command_start=0.0, poll_interval_s=0.0)
    summary = ctl.run()
    assert summary["status"] == "failed" and "trainer.step_timeout_s" in summary["error"]
    assert log[-1][0] == "shutdown"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_process_start_time_is_the_launch_to_the_clock_tick():
    """Time to first step counts from the command's start: the start must not read early
    (psutil's create_time is off by the boot time's dropped fraction of a second)."""
    import subprocess
    import sys

    code = "from orchestrator.clock import process_start_time; print(repr(process_start_time()))"
    for _ in range(3):
        before = time.time()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        started = float(out.stdout)
        # Not before the launch (one clock tick of rounding), and well before the child's
        # imports could finish.
        assert before - 0.02 <= started <= before + 0.2


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_shell_that_execs_python_late_does_not_count_its_own_time():
    """`bash -c "pip install ... && exec python -m launch.train"`: the process is the shell's, two
    seconds older than Python; the command's start is Python's (its first import of launch)."""
    import subprocess
    import sys

    code = ("import launch, time; from orchestrator.clock import process_start_time, _process_start; "
            "print(repr(process_start_time()), repr(_process_start()))")
    before = time.time()
    out = subprocess.run(["bash", "-c", f'sleep 2; exec "{sys.executable}" -c "{code}"'], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    started, process = map(float, out.stdout.split())
    assert process <= before + 0.1  # the shell's start
    assert started >= before + 1.9  # Python's, after the shell's two seconds


def test_a_failed_text_sample_does_not_fail_a_finished_job(job, monkeypatch):
    def broken(self, prompt, n):
        raise WorkerFailure("text sample failed: the prompt has no tokens")

    monkeypatch.setattr(FakeGroup, "sample", broken)
    ctl, summary, log, _ = run(job, [])
    assert ctl.state == JobState.SUCCEEDED and summary["status"] == "succeeded"
    assert summary["sample"] is None and "no tokens" in summary["sample_error"]
    assert summary["restarts"] == 0 and ("create", 1) not in log  # no restart for a sample


def test_history_skips_a_line_cut_short(tmp_path):
    """A driver killed while writing metrics.jsonl leaves half a line; resuming reads the rest."""
    from orchestrator.metrics import read_history

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_history(path, 2) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert [r["step"] for r in read_history(path, 10)] == [1, 2]
