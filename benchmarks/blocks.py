"""torch.compile of the blocks and activation checkpointing against the eager run, side by side.

    python benchmarks/blocks.py [--model small] [--strategy ddp] [--workers 2] [--steps 30] [--rounds 2]

Each round runs python -m launch.train three times on the same job (in turn, a different one
first each round): eager, trainer.compile=true, and trainer.activation_checkpointing=full. A
run's tokens/s is summary.json's (the median after the warm-up steps); its start-up is the
time to its first step, where compilation happens. Prints each run, then the ratios to eager
(medians over rounds) and the activation bytes per micro-batch on rank 0; the last line is one
JSON object. The inductor cache is a fresh folder per run, so every compiled run compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.foundation import ROOT, in_turn  # noqa: E402

import subprocess  # noqa: E402

VARIANTS = {"eager": [], "compile": ["trainer.compile=true"], "checkpointing": ["trainer.activation_checkpointing=full"]}


def one(py: str, job: list[str], run_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(run_dir.parent / f"{run_dir.name}-inductor"))
    proc = subprocess.run([py, "-m", "launch.train", *job, f"run.dir={run_dir}", "logging.progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"launch.train failed ({proc.returncode})")
    s = json.loads((run_dir / "summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s"], "time_to_first_step_s": s["time_to_first_step_s"],
            "final_loss": s["final_loss"], "activation_bytes": s["memory"]["activation_bytes_per_rank"][0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    job = [f"model={args.model}", f"strategy={args.strategy}", f"cluster.num_workers={args.workers}",
           f"trainer.max_steps={args.steps}", "trainer.sample_tokens=0", "logging.wandb.mode=disabled",
           "precision=fp32"]
    root = Path(tempfile.mkdtemp(prefix="bench-blocks-"))
    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    for r in range(args.rounds):
        def contender(name: str):
            return lambda: one(sys.executable, job + VARIANTS[name], root / f"{name}-{r}")

        results = in_turn(r, *(contender(k) for k in VARIANTS))
        for name, res in zip(VARIANTS, results):
            runs[name].append(res)
            print(json.dumps({"round": r, "variant": name, **res}), flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("tokens_per_s", "time_to_first_step_s")}
           for k, v in runs.items()}
    out = {"job": job, "rounds": args.rounds, "median": med,
           "compile_tokens_per_s_ratio": med["compile"]["tokens_per_s"] / med["eager"]["tokens_per_s"],
           "compile_extra_start_s": med["compile"]["time_to_first_step_s"] - med["eager"]["time_to_first_step_s"],
           "checkpointing_tokens_per_s_ratio": med["checkpointing"]["tokens_per_s"] / med["eager"]["tokens_per_s"],
           "activation_bytes": {k: v[0]["activation_bytes"] for k, v in runs.items()},
           "final_loss": {k: v[0]["final_loss"] for k, v in runs.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
