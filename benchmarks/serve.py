"""The inference pool against Hugging Face transformers' generate on the same model and prompts.

    python benchmarks/serve.py --checkpoint runs/pretrain [--prompts 64] [--max-tokens 64]

For 1, 8 and 32 concurrent clients: (a) our server (launch.serve's pool, one replica given all
the threads) driven over HTTP by that many client threads, each sending one prompt at a time;
(b) transformers' LlamaForCausalLM.generate on the exported model, the prompts in batches of that
size (left padding, its KV cache), in this process with the same threads. Greedy decoding, the same
prompts and max_tokens. Tokens/s counts generated tokens; latency is per request (for generate,
a request's latency is its batch's time). Then a weight sync: the model's full weights published
to the running pool through Ray (what a training job with inference.sync_every does, replicas
swapping them between decode steps) against a plain in-memory copy of the same tensors, median of
--sync-rounds. Last, the machine's ceiling at the largest client count: the time of one decode
step's linear layers alone (projections, MLP, output; no attention, cache, sampling or serving)
for that many sequences, as tokens/s, and its ratio to transformers' measured tokens/s: no engine
can beat that ratio on this machine. Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from orchestrator.config import SAMPLES_DIR
from orchestrator.export import export
from orchestrator.inference.client import Client
from orchestrator.inference.config import compose
from orchestrator.inference.replica import load_model
from orchestrator.inference.server import Background, build
from orchestrator.inference.weights import publish


def prompts_from_corpus(n: int, chars: int = 48) -> list[str]:
    lines = [l for l in (SAMPLES_DIR / "tinyshakespeare.txt").read_text().splitlines() if len(l) > chars]
    step = max(1, len(lines) // n)
    return [lines[i * step][:chars] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ours(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    client = Client(url)
    latencies: list[float] = []

    def one(p: str) -> int:
        t = time.perf_counter()
        r = client.complete(p, max_tokens=max_tokens, temperature=0)
        latencies.append(time.perf_counter() - t)
        return r["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        tokens = sum(ex.map(one, prompts))
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "tokens": tokens}


def transformers_generate(model, tok, prompts: list[str], batch: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        enc = tok(chunk, return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        elapsed = time.perf_counter() - t
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new:  # up to and excluding the first EOS, as our server counts
            eos = (row == tok.eos_token_id).nonzero()
            tokens += int(eos[0, 0]) if len(eos) else len(row)
        latencies += [elapsed] * len(chunk)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "tokens": tokens}


def sync_against_copy(pool: str, checkpoint: str, rounds: int) -> dict:
    weights = {k: v.detach().clone() for k, v in load_model(checkpoint)[0].state_dict().items()
               if not k.startswith("rope_")}
    sync, copy = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        replicas = publish(pool, weights).replicas
        sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        copied = {k: v.clone() for k, v in weights.items()}
        copy.append(time.perf_counter() - t)
        del copied
    return {"bytes": sum(v.numel() * v.element_size() for v in weights.values()), "replicas": replicas,
            "sync_s": statistics.median(sync), "copy_s": statistics.median(copy),
            "sync_over_copy": statistics.median(sync) / statistics.median(copy)}


def linear_ceiling(checkpoint: str, batch: int, rounds: int = 50) -> dict:
    """Tokens/s if a decode step of ``batch`` sequences cost only its linear layers."""
    model = load_model(checkpoint)[0]
    x = torch.randn(batch, 1, model.args.dim)

    def step() -> torch.Tensor:
        h = x
        for layer in model.layers.values():
            a = layer.attn
            n = layer.attn_norm(h)
            a.wk(n), a.wv(n)
            h = h + a.wo(a.wq(n))
            h = h + layer.mlp(layer.mlp_norm(h))
        return model.output(model.norm(h))

    with torch.no_grad():
        for _ in range(5):
            step()
        t = time.perf_counter()
        for _ in range(rounds):
            step()
    step_s = (time.perf_counter() - t) / rounds
    return {"batch": batch, "step_s": step_s, "tokens_per_s": batch / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory of ours")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sync-rounds", type=int, default=5)
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    prompts = prompts_from_corpus(args.prompts)
    levels = [int(c) for c in args.clients.split(",")]
    hf_dir = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "hf"
    export(args.checkpoint, hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tok.padding_side = "left"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    cfg = compose([f"checkpoint={args.checkpoint}", "inference.replicas=1", "inference.port=0",
                   f"inference.cpus_per_replica={args.threads}", f"inference.max_batch={max(levels)}",
                   f"inference.queue_limit={4 * max(levels)}"])
    server = Background(build(cfg))
    results: dict = {"prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads, "levels": {}}
    try:
        ours(server.url, prompts[:4], 4, 8)  # warm-up
        transformers_generate(hf, tok, prompts[:4], 4, 8)
        for c in levels:  # alternate, so that a slow patch of the machine hits both
            a = ours(server.url, prompts, c, args.max_tokens)
            b = transformers_generate(hf, tok, prompts, c, args.max_tokens)
            results["levels"][c] = {"ours": a, "transformers": b, "tokens_per_s_ratio": a["tokens_per_s"] / b["tokens_per_s"]}
            print(json.dumps({"clients": c, **results["levels"][c]}), flush=True)
        results["sync"] = sync_against_copy(cfg.inference.name, args.checkpoint, args.sync_rounds)
        print(json.dumps({"sync": results["sync"]}), flush=True)
    finally:
        server.stop()
        ray.shutdown()
    top = results["levels"][max(levels)]
    results["tokens_per_s_ratio_at_max_clients"] = top["tokens_per_s_ratio"]
    ceiling = linear_ceiling(args.checkpoint, max(levels))
    results["linear_ceiling"] = {**ceiling, "ratio_to_transformers":
                                 ceiling["tokens_per_s"] / top["transformers"]["tokens_per_s"]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
