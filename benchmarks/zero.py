"""ZeRO through the orchestrator vs. the same DeepSpeed config under the `deepspeed` launcher,
and overlap_comm on vs. off.

    python benchmarks/zero.py [--steps 20] [--model small] [--stages 1 2 3] [--rounds 1]

For each stage, one round runs (in alternating order, ours first in even rounds) (a) python -m launch.train strategy=zeroN on 2 workers and
(b) benchmarks/deepspeed_direct.py under `deepspeed --num_gpus 2`, given the DeepSpeed
config that (a) builds (strategies.zero.deepspeed_config), on the same model, batch, data,
optimizer and steps. A run's figure is its median tokens/s after 2 warm-up steps; the ratio
is (a)/(b) within a round, the median over rounds (also printed, as a diagnostic: the same ratio
over the steps after step 5, past our dashboards' start-up). Then (a) runs for stages 2 and 3 with
strategy.overlap_comm=true and =false. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.foundation import ROOT, in_turn, run, steady_median  # noqa: E402


# Diagnostic only: the ratio of medians over the steps after this one. Our dashboards (wandb,
# TensorBoard) start once step 1 is in, and their start-up (about 0.85 s of the driver's CPU,
# mostly wandb's import and init) lands in steps 2-4; the deepspeed script logs nothing.
LATE_WARMUP = 5


def ours_steps(py: str, job: list[str], run_dir: Path) -> list[float]:
    """Per-step tokens/s of a run through the orchestrator (its summary's figure is their steady median)."""
    run([py, "-m", "launch.train", *job, f"run.dir={run_dir}", "logging.progress=false"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["tokens_per_s"] for line in lines]


def ours(py: str, job: list[str], run_dir: Path) -> float:
    return steady_median(ours_steps(py, job, run_dir))


def direct_steps(py: str, job: list[str], work: Path, tag: str, steps: int) -> list[float]:
    from orchestrator.config import compose
    from strategies.zero import deepspeed_config

    j = compose(job + [f"run.dir={work / 'unused'}"])
    ds_path = work / f"{tag}.ds.json"
    ds_path.write_text(json.dumps(deepspeed_config(j.strategy, j.trainer, j.optim, j.cluster.num_workers, "fp32")))
    out = work / f"{tag}.json"
    run([str(Path(py).parent / "deepspeed"), "--num_gpus", "2", str(ROOT / "benchmarks" / "deepspeed_direct.py"),
         str(out), str(steps), str(ds_path), *job, f"run.dir={work / 'unused'}"])
    return json.loads(out.read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="small")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="bench-zero-"))
    base = [f"model={args.model}", "cluster.num_workers=2", f"trainer.max_steps={args.steps}",
            "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "precision=fp32",
            "trainer.sample_tokens=0"]
    result: dict = {"model": args.model, "steps": args.steps, "rounds": args.rounds, "stages": {}, "overlap_comm": {}}
    for stage in args.stages:
        job = base + [f"strategy=zero{stage}"]
        pairs = []
        for r in range(args.rounds):
            sa, sb = in_turn(r, lambda: ours_steps(py, job, work / f"ours-{stage}-{r}"),
                             lambda: direct_steps(py, job, work, f"direct-{stage}-{r}", args.steps))
            a, b = steady_median(sa), steady_median(sb)
            late = statistics.median(sa[LATE_WARMUP:]) / statistics.median(sb[LATE_WARMUP:])
            pairs.append((a, b, late))
            print(f"zero{stage} round {r}: orchestrator {a:.0f} tokens/s, deepspeed launcher {b:.0f} tokens/s "
                  f"(ratio {a / b:.3f}; after step {LATE_WARMUP}: {late:.3f})", flush=True)
        result["stages"][f"zero{stage}"] = {
            "tokens_per_s_ours": [a for a, _, _ in pairs], "tokens_per_s_deepspeed": [b for _, b, _ in pairs],
            "tokens_per_s_ratio_per_round": [a / b for a, b, _ in pairs],
            "tokens_per_s_ratio": statistics.median(a / b for a, b, _ in pairs),
            f"tokens_per_s_ratio_after_step_{LATE_WARMUP}": statistics.median(late for _, _, late in pairs),
        }
    for stage in [s for s in args.stages if s >= 2]:
        on = ours(py, base + [f"strategy=zero{stage}", "strategy.overlap_comm=true"], work / f"overlap-on-{stage}")
        off = ours(py, base + [f"strategy=zero{stage}", "strategy.overlap_comm=false"], work / f"overlap-off-{stage}")
        print(f"zero{stage}: overlap_comm on {on:.0f} tokens/s, off {off:.0f} tokens/s", flush=True)
        result["overlap_comm"][f"zero{stage}"] = {"on": on, "off": off, "on_over_off": on / off}
    result["tokens_per_s_ratio_min"] = min(v["tokens_per_s_ratio"] for v in result["stages"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
