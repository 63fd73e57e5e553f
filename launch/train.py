"""Train a model: python -m launch.train [hydra overrides]

Exit codes: 0 succeeded, 1 the job failed, 2 bad configuration (no worker started),
130 interrupted (Ctrl-C), 143 stopped by SIGTERM (launch.stop, Ray Jobs). Both signals tear the
job down and end it "stopped" in summary.json and status.json.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, register_schemas, to_job_config
from orchestrator.errors import STOP_GRACE_S, ConfigError
from orchestrator.report import print_summary

_entered = False

# After Ctrl-C the controller stops the workers and the cluster; should that hang
# (a Ray call stuck on a dying process), the command still leaves after this long,
# printing where it was stuck. A second Ctrl-C leaves at once.
TEARDOWN_GRACE_S = float(STOP_GRACE_S)


def _leave_after_grace(code: int) -> None:
    time.sleep(TEARDOWN_GRACE_S)
    print(f"\nteardown still running {TEARDOWN_GRACE_S:g}s after the interrupt; leaving. It was here:",
          file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(code)


def _on_interrupt(signum, frame) -> None:
    from orchestrator.errors import Stopped

    if getattr(_on_interrupt, "at", None) is not None:
        print("\nsecond interrupt: leaving without waiting for teardown", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _on_interrupt.at = time.time()
    threading.Thread(target=_leave_after_grace, args=(128 + signum,), name="teardown-deadline", daemon=True).start()
    raise Stopped(signal.Signals(signum).name)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def _train(cfg: DictConfig) -> None:
    global _entered
    _entered = True
    from omegaconf import OmegaConf

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # one run directory per job of a sweep
        OmegaConf.update(cfg, "run.dir", HydraConfig.get().runtime.output_dir)
    try:
        job = to_job_config(cfg)
    except ConfigError as exc:
        print(f"Error in configuration: {exc}", file=sys.stderr)
        sys.exit(2)

    from orchestrator.job import run_job

    try:
        summary = run_job(job)
    except ConfigError as exc:  # found once the cluster is known (e.g. cluster.device=cuda without GPUs)
        print(f"Error in configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        from orchestrator.errors import stop_signal

        name = stop_signal(exc)
        print(f"\nstopped by {name}: workers stopped, cluster shut down; summary.json says stopped", file=sys.stderr)
        sys.exit(128 + getattr(signal, name, signal.SIGINT))
    print_summary(summary, job.run.dir)
    if summary["status"] != "succeeded":
        sys.exit(1)


def main() -> None:
    register_schemas()
    signal.signal(signal.SIGINT, _on_interrupt)
    signal.signal(signal.SIGTERM, _on_interrupt)  # launch.stop and Ray Jobs stop a job this way
    try:
        _train()
    except SystemExit as exc:
        # Hydra reports composition errors (unknown group option, misspelt key,
        # wrong type) and exits 1 before our function runs: those are bad input.
        if exc.code == 1 and not _entered:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
