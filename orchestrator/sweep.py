"""The comparison of a Hydra sweep's jobs, written at the sweep's root when it ends.

``python -m launch.train -m strategy=ddp,zero2`` runs one job per combination, each in
``<sweep dir>/<n>/``; this Hydra callback (registered in conf/config.yaml) then reads every
job's summary.json and writes ``comparison.md``, ``comparison.csv`` and ``comparison.png``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from orchestrator.storage import SUMMARY_FILE

COLUMNS = ("job", "overrides", "strategy", "workers", "status", "final_loss", "tokens_per_s", "model_states_mib",
           "wall_s")


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


def comparison_rows(sweep_dir: Path) -> list[dict]:
    """One row per job; ``overrides`` holds only what differs between the jobs (the sweep's axes)."""
    paths = sorted(sweep_dir.glob(f"*/{SUMMARY_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name))
    per_job = [_overrides(p.parent) for p in paths]
    shared = set.intersection(*(set(o) for o in per_job)) if len(per_job) > 1 else set()
    rows = []
    for summary_path, job_overrides in zip(paths, per_job):
        s = json.loads(summary_path.read_text())
        states = [b for b in s["memory"].get("model_states_bytes_per_rank") or [] if b]
        overrides = " ".join(o for o in job_overrides if o not in shared)
        rows.append({
            "job": summary_path.parent.name, "overrides": overrides, "strategy": s["strategy"],
            "workers": s["world_size"], "status": s["status"], "final_loss": s["final_loss"],
            "tokens_per_s": s["tokens_per_s"], "model_states_mib": max(states) / 2**20 if states else None,
            "wall_s": s["wall_s"], "label": overrides or summary_path.parent.name,
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def write_comparison(sweep_dir: str | Path) -> list[dict]:
    """Writes the sweep's table (Markdown and CSV) and chart; returns the rows."""
    from orchestrator.plots import sweep_chart

    sweep_dir = Path(sweep_dir)
    rows = comparison_rows(sweep_dir)
    if not rows:
        return rows
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    with open(sweep_dir / "comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    sweep_chart(rows, sweep_dir / "comparison.png")
    return rows


class SweepComparison(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_comparison(sweep_dir)
        if rows:
            print((sweep_dir / "comparison.md").read_text())
            print(f"comparison written to {sweep_dir}/comparison.md, .csv and .png")
