"""Weight-only int8 (inference.quantize=int8) against the same model unquantized.

    python benchmarks/quantize.py --checkpoint runs/pretrain [--clients 8] [--prompts 32] [--max-tokens 32]

(a) Perplexity on held-out text: the last 2% of the sample corpus (the part +experiment=pretrain
holds out), in blocks of the model's context, for the fp32 and the int8 model in this process.
(b) Tokens/s and p50/p99 latency of the pool (one replica with all the threads) over HTTP, greedy,
with --clients concurrent clients, first unquantized then int8, the same prompts.
(c) Weight bytes of each. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import math

import ray
import torch
import torch.nn.functional as F

from orchestrator.config import SAMPLES_DIR
from orchestrator.inference.config import compose
from orchestrator.inference.quantize import weight_bytes
from orchestrator.inference.replica import load_model
from orchestrator.inference.server import Background, build
from serve import ours, prompts_from_corpus


def held_out_perplexity(model, tok, context: int, max_blocks: int) -> tuple[float, int]:
    text = (SAMPLES_DIR / "tinyshakespeare.txt").read_text()
    ids = torch.tensor(tok.encode(text[int(len(text) * 0.98):]).ids)
    n = min(max_blocks, (len(ids) - 1) // context)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            block = ids[i * context : (i + 1) * context + 1]
            logits = model(block[None, :-1])
            total += F.cross_entropy(logits[0], block[1:], reduction="sum").item()
            count += context
    return math.exp(total / count), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory of ours")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=64, help="held-out blocks scored for perplexity")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"checkpoint": args.checkpoint, "clients": args.clients, "threads": args.threads}
    for q in ("none", "int8"):
        model, tok, _ = load_model(args.checkpoint, "cpu", q)
        ppl, tokens = held_out_perplexity(model, tok, min(model.args.max_seq_len, 256), args.blocks)
        result[q] = {"perplexity": ppl, "scored_tokens": tokens, "weight_bytes": weight_bytes(model)}
        del model

    prompts = prompts_from_corpus(args.prompts)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        for q in ("none", "int8"):
            cfg = compose([f"checkpoint={args.checkpoint}", "inference.replicas=1", "inference.port=0",
                           f"inference.cpus_per_replica={args.threads}", f"inference.max_batch={args.clients}",
                           f"inference.quantize={q}", f"inference.name=bench-{q}"])
            server = Background(build(cfg))
            try:
                ours(server.url, prompts[:4], 4, 8)  # warm-up
                result[q].update(ours(server.url, prompts, args.clients, args.max_tokens))
            finally:
                server.stop()
            print(json.dumps({q: result[q]}), flush=True)
    finally:
        ray.shutdown()
    result["perplexity_ratio"] = result["int8"]["perplexity"] / result["none"]["perplexity"]
    result["tokens_per_s_ratio"] = result["int8"]["tokens_per_s"] / result["none"]["tokens_per_s"]
    result["weight_bytes_ratio"] = result["int8"]["weight_bytes"] / result["none"]["weight_bytes"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
