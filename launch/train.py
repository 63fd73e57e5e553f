"""Train a model: python -m launch.train [hydra overrides]

Exit codes: 0 succeeded, 1 the job failed, 2 bad configuration (no worker started),
130 interrupted.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from orchestrator.config import CONF_DIR, register_schemas, to_job_config
from orchestrator.errors import ConfigError
from orchestrator.report import print_summary

_entered = False


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
    except KeyboardInterrupt:
        print("\ninterrupted: workers stopped, cluster shut down", file=sys.stderr)
        sys.exit(130)
    print_summary(summary, job.run.dir)
    if summary["status"] != "succeeded":
        sys.exit(1)


def main() -> None:
    register_schemas()
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
