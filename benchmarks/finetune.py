"""The synthetic finetuning task end to end: a model pretrained by the project on the sample
corpus cannot reverse spaced letters; after SFT, and after LoRA, it can. Held-out examples are
scored by exact match (greedy output equals the reference, see strategies.base.evaluate).

    python benchmarks/finetune.py --out /tmp/finetune                    # pretrains first
    python benchmarks/finetune.py --base runs/pretrain --out /tmp/finetune

Prints one JSON line last: exact match of the base, SFT and LoRA models on the held-out rows,
LoRA's trainable fraction, steps and wall times.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch

from orchestrator import pretrained
from orchestrator.config import compose
from orchestrator.data import open_blocks, prepare
from orchestrator.job import run_job
from orchestrator.models import Llama
from orchestrator.synthetic import reverse_words, write_jsonl
from orchestrator.trainer import model_args
from strategies.base import evaluate

QUIET = ["logging.wandb.mode=disabled", "logging.progress=false"]


def base_exact_match(job) -> dict:
    """The base model, unchanged, on the same held-out rows the finetuning jobs evaluate."""
    data = prepare(job.data, job.model.vocab_size, pretrained.locate(job.model.init_from).tokenizer_path)
    examples = open_blocks(data, job.data.seq_len, job.data.val_fraction)
    model = Llama(model_args(job))
    model.load_state_dict(pretrained.load_weights(pretrained.locate(job.model.init_from)))
    model.init_buffers()
    model.eval()
    mb = job.trainer.micro_batch_size
    batches = [examples.batch(list(range(i, min(i + mb, examples.n_val))), split="val")
               for i in range(0, examples.n_val - examples.n_val % mb, mb)]
    return {**evaluate(model, batches, torch.device("cpu"), None), "val_examples": len(batches) * mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", help="a pretrained run directory (default: pretrain one with +experiment=pretrain)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--lora-steps", type=int, default=300)
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
        summary = run_job(compose(["+experiment=pretrain", f"run.dir={base}", *QUIET]))
        assert summary["status"] == "succeeded", summary["error"]
        result["pretrain"] = {"steps": summary["steps"], "final_loss": summary["final_loss"],
                              "wall_s": round(time.time() - t, 1)}
    data = write_jsonl(reverse_words(args.rows, seed=7), out / "reverse.jsonl")
    common = [f"model.init_from={Path(base).resolve()}", f"data.paths=[{data}]", f"strategy={args.strategy}",
              f"cluster.num_workers={args.workers}", *QUIET]
    for name, steps in (("sft", args.sft_steps), ("lora", args.lora_steps)):
        job = compose([f"+experiment={name}", f"run.dir={out / name}", f"trainer.max_steps={steps}",
                       f"trainer.eval_every={steps}", *common])
        if "base" not in result:
            result["base"] = base_exact_match(job)
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
