"""Alignment on the reversal task ("Reverse:\nc-a-t" -> "t-a-c"), end to end on the tiny model:
pretrain on the sample corpus, SFT briefly (held-out greedy exact match low but not zero), then
from that same start:
  - GRPO with the rollout pool: group_size samples per prompt at temperature 1, rewarded by
    orchestrator.synthetic:reversal_score (partial credit per character; exact match is 1);
  - DPO on preference pairs of the same words (chosen: the right answer; rejected: a wrong one),
    plain, then with RPO's likelihood term on the chosen answers (alignment.sft_weight).
Held-out rows are words never trained on; greedy exact match is scored as the trainer scores it
(every answer token and the closing EOS the model's greedy choice).

    python benchmarks/alignment.py --out /tmp/alignment

Prints each method's curve (start and end, and the held-out figures at every evaluation), the
GRPO step's time split (generate, score, train, sync) and the largest gap between the pool's and
the trainer's log-probabilities of the same tokens; one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from orchestrator.cluster import init_loopback
from orchestrator.config import compose
from orchestrator.evaluation import evaluate_init
from orchestrator.job import run_job
from orchestrator.synthetic import reverse_pairs, reverse_words, write_jsonl

COMMON = ["model=tiny", "precision=fp32", "strategy=single", "cluster.num_workers=1", "logging.wandb.mode=disabled",
          "logging.progress=false", "trainer.sample_tokens=0"]
TASK = [*COMMON, "data.seq_len=48"]  # every prompt and answer whole


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], round(m[key], 4)) for m in rows if key in m]


def run(overrides: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = run_job(compose(overrides))
    if summary["status"] != "succeeded":
        raise SystemExit(f"failed: {summary['error']}")
    return summary, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=140)
    ap.add_argument("--grpo-steps", type=int, default=1200)
    ap.add_argument("--grpo-schedule", default="cosine", help="optim.schedule: cosine (to 0.1 of the rate) or constant")
    ap.add_argument("--grpo-lr", type=float, default=1e-3)
    ap.add_argument("--grpo-batch", type=int, default=128, help="samples per step (group_size per prompt)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--dpo-lr", type=float, default=1e-3)
    ap.add_argument("--dpo-sft-weight", type=float, default=1.0,
                    help="alignment.sft_weight of the second DPO run (RPO); the first is plain DPO")
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = f"data.cache_dir={out / 'cache'}"
    init_loopback(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = write_jsonl(reverse_words(2000, seed=11, min_len=3, max_len=4), out / "reverse.jsonl")
    pairs = write_jsonl(reverse_pairs(2000, seed=11, min_len=3, max_len=4), out / "pairs.jsonl")
    result: dict = {}

    _, result["pretrain_s"] = run(["+experiment=pretrain", *COMMON, cache, f"run.dir={out / 'base'}",
                                   f"trainer.max_steps={args.pretrain_steps}", "optim.lr=3e-3"])
    sft, result["sft_s"] = run(["+experiment=sft", *TASK, cache, f"run.dir={out / 'sft'}",
                                f"model.init_from={out / 'base'}", f"data.paths=[{rows}]",
                                f"trainer.max_steps={args.sft_steps}", f"trainer.eval_every={args.sft_steps}",
                                "optim.lr=3e-3"])
    start = str(out / "sft")
    result["start_exact_match"] = sft["eval"]["val_exact_match"]
    print(f"start (SFT {args.sft_steps} steps): held-out greedy exact match {result['start_exact_match']:.3f}")

    grpo_job = ["+experiment=grpo", *TASK, cache, f"run.dir={out / 'grpo'}", f"model.init_from={start}",
                f"data.paths=[{rows}]", f"trainer.max_steps={args.grpo_steps}",
                f"trainer.eval_every={args.eval_every}", f"trainer.global_batch_size={args.grpo_batch}",
                f"alignment.group_size={args.group_size}", f"optim.lr={args.grpo_lr}",
                f"optim.schedule={args.grpo_schedule}",
                "alignment.reward=orchestrator.synthetic:reversal_score", "alignment.rollout.max_tokens=16"]
    before = evaluate_init(compose(grpo_job))["val_exact_match"]
    grpo, grpo_s = run(grpo_job)
    a = grpo["alignment"]
    split = {k: statistics.mean(a[f"{k}_s_per_step"]) for k in ("generate", "score", "train", "sync")}
    total = sum(split.values())
    result["grpo"] = {
        "steps": args.grpo_steps, "wall_s": round(grpo_s, 1), "exact_match_before": before,
        "exact_match_after": grpo["eval"]["val_exact_match"],
        "exact_match_curve": curve(out / "grpo", "val_exact_match"),
        "reward_mean_first_10": statistics.mean(a["reward_mean_per_step"][:10]),
        "reward_mean_last_10": statistics.mean(a["reward_mean_per_step"][-10:]),
        "step_time_split_s": {k: round(v, 4) for k, v in split.items()},
        "step_time_split_fraction": {k: round(v / total, 3) for k, v in split.items()},
        "logprob_diff_max": max(a["logprob_diff_max_per_step"]),
    }
    g = result["grpo"]
    print(f"GRPO {args.grpo_steps} steps in {grpo_s:.0f} s: held-out exact match {before:.3f} -> "
          f"{g['exact_match_after']:.3f}; reward (first/last 10 steps) {g['reward_mean_first_10']:.3f} -> "
          f"{g['reward_mean_last_10']:.3f}")
    print(f"  curve {g['exact_match_curve']}")
    print("  step time: " + ", ".join(f"{k} {v * 1000:.0f} ms ({g['step_time_split_fraction'][k]:.0%})"
                                      for k, v in split.items()))
    print(f"  largest |pool - trainer| log-probability of a sampled token: {g['logprob_diff_max']:.2e}")

    for name, weight in (("dpo", 0.0), ("dpo_rpo", args.dpo_sft_weight)):
        dpo_job = ["+experiment=dpo", *TASK, cache, f"run.dir={out / name}", f"model.init_from={start}",
                   f"data.paths=[{pairs}]", f"trainer.max_steps={args.dpo_steps}",
                   f"trainer.eval_every={args.eval_every}", f"optim.lr={args.dpo_lr}", f"alignment.sft_weight={weight}"]
        before = evaluate_init(compose(dpo_job))
        dpo, dpo_s = run(dpo_job)
        result[name] = d = {
            "sft_weight": weight, "steps": args.dpo_steps, "wall_s": round(dpo_s, 1),
            "preference_accuracy_before": before["val_preference_accuracy"],
            "preference_accuracy_after": dpo["eval"]["val_preference_accuracy"],
            "exact_match_before": before["val_exact_match"], "exact_match_after": dpo["eval"]["val_exact_match"],
            "preference_accuracy_curve": curve(out / name, "val_preference_accuracy"),
            "exact_match_curve": curve(out / name, "val_exact_match"),
            "loss_first": dpo["losses"][0], "loss_last": dpo["losses"][-1],
        }
        print(f"DPO (alignment.sft_weight={weight}) {args.dpo_steps} steps in {dpo_s:.0f} s: held-out preference "
              f"accuracy {d['preference_accuracy_before']:.3f} -> {d['preference_accuracy_after']:.3f}, exact match "
              f"{d['exact_match_before']:.3f} -> {d['exact_match_after']:.3f}; loss {d['loss_first']:.4f} -> "
              f"{d['loss_last']:.4f}")
        print(f"  preference accuracy curve {d['preference_accuracy_curve']}")
        print(f"  exact match curve {d['exact_match_curve']}")
    print(json.dumps(result))
    ray.shutdown()


if __name__ == "__main__":
    main()
