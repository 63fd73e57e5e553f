"""Orchestrator vs. bare torchrun (tokens/s) and vs. Ray Train (time to first step).

    python benchmarks/foundation.py [--steps 30] [--rounds 3] [--ttfs-rounds 5] [--model small]

Runs, on the same model, batch, data and steps:
  (a) python -m launch.train with strategy=ddp on 2 workers (an embedded Ray cluster,
      default logging: progress bar and an offline wandb run),
  (b) benchmarks/torchrun_ddp.py under torchrun --nproc_per_node=2,
  (c) benchmarks/ray_train_ttfs.py: the same training function under Ray Train's TorchTrainer,
  (d) benchmarks/ray_start_floor.py: no job at all, only Ray's own start (the orchestrator's
      embedded cluster) up to two actors with torch imported: a reference point.
Each round runs its contenders once each, in rotating order (ours first in round 0).
Tokens/s: (a) and (b) alternate for --rounds rounds; a run's figure is its median tokens/s after
2 warm-up steps, and the ratio is the median over rounds of (a)/(b) within a round (adjacent runs
see the same machine: on a shared 2-core machine speed drifts over minutes).
Time to first step: (a) and (c) alternate for --ttfs-rounds rounds, each a fresh process with a
fresh cluster running 3 steps; time runs from the command's process start (read from /proc to the
clock tick, the same clock for both) to the end of step 1 on rank 0. The ratio is the median over
rounds of (a)/(c) within a round; the medians of each side are printed too. (d) runs in the same
rounds (the three in rotating order); its time plus step 1's own compute in (a) is the least that any
design with one Ray actor per rank could reach here with Ray's public start-up, and
time_to_first_step_floor_ratio puts that over (c).
The last line printed is one JSON object with the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.metrics import WARMUP_STEPS, read_history

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], timeout: float = 1800) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")


def steady_median(values: list[float]) -> float:
    """A run's tokens/s as summary.json defines it: the median after the warm-up steps."""
    return statistics.median(values[WARMUP_STEPS:] or values)


def in_turn(round_index: int, *contenders) -> tuple:
    """Runs every contender once, starting with contender number round_index (mod their count),
    so that none always runs right after another's start-up or teardown; returns their results
    in the order given."""
    n = len(contenders)
    results = [None] * n
    for k in range(n):
        i = (round_index + k) % n
        results[i] = contenders[i]()
    return tuple(results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="small")
    ap.add_argument("--ttfs-rounds", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-foundation-"))
    job = [f"model={args.model}", "strategy=ddp", "cluster.num_workers=2", f"trainer.max_steps={args.steps}",
           "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "precision=fp32",
           "trainer.sample_tokens=0"]
    py = sys.executable

    # Warm the data cache once so that no contender pays for tokenizer training.
    run([py, "-c", f"from orchestrator.config import compose; from orchestrator.data import prepare; "
                   f"j = compose({job + ['run.dir=' + str(work / 'warm')]!r}); prepare(j.data, j.model.vocab_size)"])

    def ours(overrides: list[str], run_dir: Path) -> dict:
        run([py, "-m", "launch.train", *overrides, f"run.dir={run_dir}", "logging.progress=false"])
        return json.loads((run_dir / "summary.json").read_text())

    def torchrun(out: Path) -> float:
        run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             str(ROOT / "benchmarks" / "torchrun_ddp.py"), str(out), str(args.steps), *job,
             f"run.dir={work / 'unused'}"])
        return steady_median(json.loads(out.read_text())["tokens_per_s"])

    def ray_train(overrides: list[str], out: Path) -> float:
        run([py, str(ROOT / "benchmarks" / "ray_train_ttfs.py"), str(out), "3", *overrides,
             f"run.dir={work / 'unused'}"])
        return json.loads(out.read_text())["time_to_first_step_s"]

    def ray_floor(out: Path) -> float:
        run([py, str(ROOT / "benchmarks" / "ray_start_floor.py"), str(out)])
        return json.loads(out.read_text())["actors_ready_s"]

    ours_tps, base_tps, ours_ttfs, ray_ttfs, floors, step1 = [], [], [], [], [], []
    for r in range(args.rounds):
        summary, tps = in_turn(r, lambda: ours(job, work / f"ours-{r}"), lambda: torchrun(work / f"torchrun-{r}.json"))
        ours_tps.append(summary["tokens_per_s"])
        base_tps.append(tps)
        print(f"round {r}: tokens/s orchestrator {ours_tps[-1]:.0f}, torchrun {tps:.0f}", flush=True)

    short = [a for a in job if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=3"]
    for r in range(args.ttfs_rounds):
        summary, ttfs, floor = in_turn(r, lambda: ours(short, work / f"ttfs-ours-{r}"),
                                       lambda: ray_train(short, work / f"raytrain-{r}.json"),
                                       lambda: ray_floor(work / f"floor-{r}.json"))
        ours_ttfs.append(summary["time_to_first_step_s"])
        ray_ttfs.append(ttfs)
        floors.append(floor)
        step1.append(read_history(work / f"ttfs-ours-{r}" / "metrics.jsonl", 1)[0]["step_time_s"])
        print(f"round {r}: time to first step: orchestrator {ours_ttfs[-1]:.2f}s (phases {summary['startup_s']}, "
              f"step 1 itself {step1[-1]:.2f}s), Ray Train {ttfs:.2f}s; Ray's own start with 2 ready actors "
              f"{floor:.2f}s", flush=True)

    result = {
        "model": args.model, "steps": args.steps, "rounds": args.rounds, "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if ours_tps:
        result["tokens_per_s_ours"] = statistics.median(ours_tps)
        result["tokens_per_s_torchrun"] = statistics.median(base_tps)
        result["tokens_per_s_ratio_per_round"] = [a / b for a, b in zip(ours_tps, base_tps)]
        result["tokens_per_s_ratio"] = statistics.median(result["tokens_per_s_ratio_per_round"])
    if ours_ttfs:
        result["time_to_first_step_s_ours"] = statistics.median(ours_ttfs)
        result["time_to_first_step_s_ray_train"] = statistics.median(ray_ttfs)
        result["time_to_first_step_s_ours_runs"] = ours_ttfs
        result["time_to_first_step_s_ray_train_runs"] = ray_ttfs
        result["time_to_first_step_ratio_per_round"] = [a / b for a, b in zip(ours_ttfs, ray_ttfs)]
        result["time_to_first_step_ratio"] = statistics.median(result["time_to_first_step_ratio_per_round"])
        result["time_to_first_step_ratio_of_medians"] = (result["time_to_first_step_s_ours"]
                                                         / result["time_to_first_step_s_ray_train"])
        # The least any one-actor-per-rank design on Ray could reach here: Ray's own start up to two
        # ready actors with torch imported (benchmarks/ray_start_floor.py), plus the first step's own
        # compute (step 1's step_time_s in our run), over Ray Train's time in the same round.
        result["ray_start_floor_s_runs"] = floors
        result["first_step_time_s_ours_runs"] = step1
        result["time_to_first_step_floor_ratio_per_round"] = [(f + s1) / b for f, s1, b in zip(floors, step1, ray_ttfs)]
        result["time_to_first_step_floor_ratio"] = statistics.median(result["time_to_first_step_floor_ratio_per_round"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
