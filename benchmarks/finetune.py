"""The synthetic finetuning task end to end: a model pretrained by the project on the sample
corpus cannot reverse a word ("Reverse:\nc-a-t" -> "t-a-c"); after SFT, and after LoRA with under
5% of its parameters trainable, it can. Held-out rows (words never seen in training) are scored by
exact match: greedy output equals the reference (see strategies.base.evaluate).

    python benchmarks/finetune.py --out /tmp/finetune                  # pretrains the base first
    python benchmarks/finetune.py --base runs/pretrain --out /tmp/finetune

The defaults (tiny model, 1,500 pretraining steps, 2,000 finetuning steps) fit a 2-core CPU in
about ten minutes; --model small with the presets' rates is the same run at the main job's size.
Prints one JSON line last: exact match of the base, SFT and LoRA models on the held-out rows,
LoRA's trainable fraction, steps and wall times.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from orchestrator.config import compose
from orchestrator.evaluation import evaluate_init
from orchestrator.job import run_job
from orchestrator.synthetic import reverse_words, write_jsonl

QUIET = ["logging.wandb.mode=disabled", "logging.progress=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", help="a pretrained run directory (default: pretrain one with +experiment=pretrain)")
    ap.add_argument("--model", default="tiny", help="model config group option (tiny, small, medium)")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--sft-steps", type=int, default=2000)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--lora-steps", type=int, default=2000)
    ap.add_argument("--lora-lr", type=float, default=5e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-targets", default="wq,wk,wv,wo")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    result: dict = {"strategy": args.strategy, "workers": args.workers}
    base = args.base
    if base is None:
        base = str(out / "pretrain")
        t = time.time()
        summary = run_job(compose(["+experiment=pretrain", f"run.dir={base}", f"model={args.model}",
                                   f"trainer.max_steps={args.pretrain_steps}", f"trainer.checkpoint_every={args.pretrain_steps}",
                                   "optim.lr=3e-3", *QUIET]))
        assert summary["status"] == "succeeded", summary["error"]
        result["pretrain"] = {"steps": summary["steps"], "final_loss": summary["final_loss"],
                              "wall_s": round(time.time() - t, 1)}
    data = write_jsonl(reverse_words(args.rows, seed=7), out / "reverse.jsonl")
    common = [f"model={args.model}", f"model.init_from={Path(base).resolve()}", f"data.paths=[{data}]", f"strategy={args.strategy}",
              f"cluster.num_workers={args.workers}", *QUIET]
    runs = {
        "sft": (args.sft_steps, [f"optim.lr={args.sft_lr}"]),
        "lora": (args.lora_steps, [f"optim.lr={args.lora_lr}", f"finetune.lora.rank={args.lora_rank}",
                                   f"finetune.lora.target_modules=[{args.lora_targets}]"]),
    }
    for name, (steps, extra) in runs.items():
        job = compose([f"+experiment={name}", f"run.dir={out / name}", f"trainer.max_steps={steps}",
                       f"trainer.eval_every={max(steps // 4, 1)}", *common, *extra])
        if "base" not in result:
            result["base"] = evaluate_init(job)
        t = time.time()
        summary = run_job(job)
        assert summary["status"] == "succeeded", summary["error"]
        result[name] = {**summary["eval"], "steps": summary["steps"], "wall_s": round(time.time() - t, 1),
                        "trainable_params": summary["n_trainable_params"], "params": summary["n_params"],
                        "trainable_fraction": summary["n_trainable_params"] / summary["n_params"]}
        print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
