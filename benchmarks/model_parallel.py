"""Tensor and pipeline parallel against data parallel, and the pipeline bubble against theory.

    python benchmarks/model_parallel.py [--steps 20] [--model small] [--rounds 2] [--bubble-steps 10]

Part 1: on 2 workers, the same model, global batch, data and steps, each round runs ddp,
tp=2 and pp=2 (1f1b, 4 microbatches) one after another; a run's figure is its median
tokens/s after 2 warm-up steps, the ratios (tp/ddp, pp/ddp) are taken within a round and
their median over rounds is reported.
Part 2: pp=2 with each schedule at m = 2, 4, 8 microbatches: the measured bubble (idle)
fraction, median over steps after warm-up (summary.json's pipeline.bubble_fraction), next
to the schedule's theoretical value. Interleaved 1F1B runs with 3 virtual stages per rank
(the small model's 6 layers in 6 stages).
All runs share one local Ray cluster. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bubble-steps", type=int, default=10)
    ap.add_argument("--model", default="small")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import ray

    from orchestrator.config import compose
    from orchestrator.job import run_job

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="bench-mp-"))
    base = [f"model={args.model}", "cluster.num_workers=2", "trainer.global_batch_size=16",
            "trainer.micro_batch_size=8", "precision=fp32", "trainer.sample_tokens=0", "logging.progress=false",
            "logging.wandb.mode=disabled"]
    n = 0

    def job(steps: int, *overrides: str) -> dict:
        nonlocal n
        n += 1
        summary = run_job(compose(base + [f"trainer.max_steps={steps}", f"run.dir={work / str(n)}", *overrides]))
        if summary["status"] != "succeeded":
            raise SystemExit(f"{overrides}: {summary['error']}")
        return summary

    layouts = {"ddp": ("strategy=ddp",), "tp2": ("strategy=tp", "strategy.tp=2"),
               "pp2": ("strategy=pp", "strategy.pp=2", "strategy.schedule=1f1b", "strategy.microbatches=4")}
    rounds = []
    for r in range(args.rounds):
        tps = {name: job(args.steps, *ov)["tokens_per_s"] for name, ov in layouts.items()}
        rounds.append(tps)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in tps.items())
              + f"; tp2/ddp {tps['tp2'] / tps['ddp']:.3f}, pp2/ddp {tps['pp2'] / tps['ddp']:.3f}", flush=True)
    throughput = {
        "tokens_per_s": {k: statistics.median(r[k] for r in rounds) for k in layouts},
        "tp2_over_ddp": statistics.median(r["tp2"] / r["ddp"] for r in rounds),
        "pp2_over_ddp": statistics.median(r["pp2"] / r["ddp"] for r in rounds),
        "rounds": rounds,
    }

    bubbles = []
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 3)):
        for m in (2, 4, 8):
            pipe = job(args.bubble_steps, "strategy=pp", "strategy.pp=2", f"strategy.schedule={schedule}",
                       f"strategy.microbatches={m}", f"strategy.virtual_stages={v}")
            row = {"schedule": schedule, "virtual_stages": v, "microbatches": m,
                   "measured": pipe["pipeline"]["bubble_fraction"],
                   "theory": pipe["pipeline"]["theoretical_bubble_fraction"], "tokens_per_s": pipe["tokens_per_s"]}
            bubbles.append(row)
            print(f"{schedule:>16} v={v} m={m}: bubble measured {row['measured']:.3f}, theory {row['theory']:.3f}, "
                  f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
    ray.shutdown()
    print(json.dumps({"model": args.model, "steps": args.steps, "throughput": throughput, "bubble": bubbles}))


if __name__ == "__main__":
    main()
