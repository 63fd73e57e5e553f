"""Prepare training data on Ray Data:

    python -m launch.prepare 'prepare.inputs=[a.jsonl,b.txt]' prepare.output=DIR [hydra overrides]

Normalization, quality filters, exact and near deduplication, privacy scrubbing, a blocklist, then
tokenized shards in DIR (a folder or a storage URL), with the cleaned documents as parquet beside
them and a report (prepare_report.json and .png). Train on it with data=prepared data.path=DIR.
On the embedded Ray cluster by default, on a running one with cluster.address.

Exit codes: 0 done, 1 failed, 2 bad configuration (nothing started), 130 interrupted.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestrator.config import CONF_DIR
from orchestrator.errors import ConfigError

_entered = False


def to_prepare_job(cfg):
    from orchestrator.config import typed
    from orchestrator.prepare.config import PrepareJob

    cfg = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return typed(OmegaConf.structured(PrepareJob), cfg)


@hydra.main(config_path=str(CONF_DIR), config_name="prepare", version_base=None)
def _prepare(cfg: DictConfig) -> None:
    global _entered
    _entered = True
    from orchestrator.prepare.pipeline import run

    try:
        job = to_prepare_job(cfg)
        report = run(job.prepare, job.cluster)
    except ConfigError as exc:
        print(f"Error in configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    print_report(report, job.prepare.output)


def print_report(report: dict, output: str) -> None:
    print(f"\n{'stage':<12} {'docs in':>10} {'docs out':>10} {'MB in':>9} {'MB out':>9} {'CPU s':>8}  removed / changed")
    for s in report["stages"]:
        what = ", ".join(f"{k} {v}" for k, v in s["removed"].items())
        if s.get("changed"):
            what = ", ".join(filter(None, [what, f"changed {s['changed']}"]))
        print(f"{s['stage']:<12} {s['docs_in']:>10,} {s['docs_out']:>10,} {s['bytes_in'] / 1e6:>9.2f} "
              f"{s['bytes_out'] / 1e6:>9.2f} {s['cpu_s']:>8.2f}  {what}")
    if "tokenize" in report:
        t = report["tokenize"]
        print(f"tokens: {t['tokens']:,} in {t['shards']} shards of {t['shard_tokens']:,} (vocab {t['vocab_size']}), "
              f"{t['seconds']:.2f} s")
    print(f"done in {report['seconds']:.1f} s (passes: {report.get('passes_s')}) -> {output} (prepare_report.json, prepare_report.png, documents/, "
          f"shards/, removed.parquet)")


def main() -> None:
    from hydra.core.config_store import ConfigStore

    from orchestrator.config import register_schemas
    from orchestrator.prepare.config import PrepareJob

    register_schemas()
    ConfigStore.instance().store(name="prepare_schema", node=PrepareJob)
    try:
        _prepare()
    except SystemExit as exc:
        if exc.code == 1 and not _entered:  # Hydra's composition errors: bad input
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
