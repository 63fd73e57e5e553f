"""What checkpointing costs: sharded DCP saves, asynchronous against synchronous, against none.

    python benchmarks/checkpoint.py [--model medium] [--steps 20] [--every 5] [--strategies zero3 ddp]
                                    [--rounds 1] [--storage PATH_OR_URL]

For each strategy (2 ranks), one round runs three jobs through launch.train, in rotating order:
  never   no checkpoint during training (trainer.checkpoint_every=0; the save after the last step
          comes after the measured window)
  async   a checkpoint every --every steps, written in the background (trainer.checkpoint_async=true)
  sync    the same, training waiting for each save (trainer.checkpoint_async=false)
A run's throughput is tokens over wall time from the end of step 2 to the end of the last step
(metrics.jsonl's timestamps), so every second a save blocks or slows training counts; a median of
per-step figures would hide the steps that pay for a save. The cost of checkpointing is
1 - (async tokens/s) / (never tokens/s), within a round. Per save, summary.json gives the seconds
training was blocked and the total seconds to the manifest; printed here as medians over the
saves during training. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.foundation import in_turn, run  # noqa: E402

WARMUP = 2  # steps before the measured window (start-up, allocator warm-up)
MODES = {"never": ["trainer.checkpoint_every=0"], "async": ["trainer.checkpoint_async=true"],
         "sync": ["trainer.checkpoint_async=false"]}


def one(py: str, job: list[str], run_dir: Path, extra: list[str]) -> dict:
    run([py, "-m", "launch.train", *job, *extra, f"run.dir={run_dir}", "logging.progress=false"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in records[WARMUP:])  # tokens per step, exactly
    window = records[-1]["time"] - records[WARMUP - 1]["time"]
    last = records[-1]["step"]
    saves = [c for c in summary["checkpoints"] if c["step"] < last]  # the ones during training
    return {"tokens_per_s": tokens / window,
            "blocked_s": statistics.median(c["blocked_s"] for c in saves) if saves else None,
            "total_s": statistics.median(c["total_s"] for c in saves) if saves else None,
            "write_cpu_s": statistics.median(max(c["write_cpu_s_per_rank"]) for c in saves) if saves else None,
            "bytes_written_per_rank": saves[0]["bytes_written_per_rank"] if saves else None,
            "saves": len(saves)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--strategies", nargs="+", default=["zero3", "ddp"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--storage", default=None, help="run.storage for the runs (default: each run's directory)")
    args = ap.parse_args()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    base = [f"model={args.model}", "cluster.num_workers=2", f"trainer.max_steps={args.steps}",
            "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "precision=fp32",
            "trainer.sample_tokens=0", "logging.wandb.mode=disabled", f"trainer.checkpoint_every={args.every}",
            "trainer.keep_checkpoints=2"]
    result: dict = {"model": args.model, "steps": args.steps, "every": args.every, "rounds": args.rounds,
                    "storage": args.storage or "run directory", "strategies": {}}
    for strategy in args.strategies:
        rounds = []
        for r in range(args.rounds):
            def contender(mode: str):
                storage = [f"run.storage={args.storage}/{strategy}-{mode}-{r}"] if args.storage else []
                return lambda: one(py, base + [f"strategy={strategy}"], work / f"{strategy}-{mode}-{r}",
                                   MODES[mode] + storage)

            never, asyn, syn = in_turn(r, *(contender(m) for m in MODES))
            rounds.append({"never": never, "async": asyn, "sync": syn,
                           "async_over_never": asyn["tokens_per_s"] / never["tokens_per_s"],
                           "sync_over_never": syn["tokens_per_s"] / never["tokens_per_s"]})
            print(f"{strategy} round {r}: tokens/s never {never['tokens_per_s']:.0f}, "
                  f"async {asyn['tokens_per_s']:.0f} ({asyn['tokens_per_s'] / never['tokens_per_s']:.3f}), "
                  f"sync {syn['tokens_per_s']:.0f} ({syn['tokens_per_s'] / never['tokens_per_s']:.3f}); "
                  f"per save: async blocked {asyn['blocked_s']:.3f} s of {asyn['total_s']:.2f} s, "
                  f"sync blocked {syn['blocked_s']:.2f} s; CPU of each async write {asyn['write_cpu_s']:.2f} s; "
                  f"bytes per rank {asyn['bytes_written_per_rank']}",
                  flush=True)
        ratio = statistics.median(x["async_over_never"] for x in rounds)
        result["strategies"][strategy] = {
            "rounds": rounds, "async_over_never": ratio, "async_cost": 1 - ratio,
            "sync_over_never": statistics.median(x["sync_over_never"] for x in rounds),
            "async_blocked_s": statistics.median(x["async"]["blocked_s"] for x in rounds),
            "async_total_s": statistics.median(x["async"]["total_s"] for x in rounds),
            "sync_blocked_s": statistics.median(x["sync"]["blocked_s"] for x in rounds),
        }
    result["async_cost_max"] = max(v["async_cost"] for v in result["strategies"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
