"""The inference pool against Hugging Face transformers' generate on the same model and prompts.

    python benchmarks/serve.py --checkpoint runs/pretrain [--prompts 64] [--max-tokens 64]

For 1, 8 and 32 concurrent clients: (a) our server (launch.serve's pool, one replica given all
the threads) driven over HTTP by that many client threads, each sending one prompt at a time;
(b) transformers' LlamaForCausalLM.generate on the exported model, the prompts in batches of that
size (left padding, its KV cache), in this process with the same threads. Greedy decoding, the same
prompts and max_tokens. Tokens/s counts generated tokens; latency is per request (for generate,
a request's latency is its batch's time). The two alternate, level by level, for --rounds
rounds (the machine's speed moves between runs: each level reports the median round of each,
and every round's ratio).

Then, on the engine alone: the cost of n=8 samples of one 128-token prompt (max_tokens=1: the
prefill and first token) against one sample, and against 8 different prompts of that length; and
the prefix cache on a shared-prefix workload (32 requests whose prompts share a 96-token prefix,
then differ) through the server: the hit rate /metrics reports.

Then weight sync, for 1 and 2 replicas: the model's full weights published by the direct path
(weights.DirectPublisher: the replicas run on this node, so through its two buffers in shared
memory; the JSON says how many replicas took which way) and through the store (Ray's object
store), against plain in-memory copies of the same tensors: a clone (new memory: "copy") and a
copy into memory already there ("memcpy"); medians of --sync-rounds, each timed from a short
pause; direct and copy rounds alternate, the store's come after.

The machine's ceiling at the largest client count: the time of one decode step's linear layers
alone (projections, MLP, output through F.linear; no attention, cache, sampling or serving) for
that many sequences, as tokens/s, measured in each round of that level between ours and
transformers'; its ratio to transformers' tokens/s, and our fraction of it (medians of the
rounds' ratios; a round's three run back to back, seconds apart). Prints one JSON line last,
which also names how the replica's decode steps attend ("native kernel", or gather + SDPA).
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
from orchestrator.inference.weights import DirectPublisher, publish


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


# Before each timed run, copy or publish: the one before it leaves threads spinning and pages to
# give back for a few milliseconds (a publish right after a clone and a copy took 10.7 ms, 8.9 ms
# after a pause; the copies alike), which would be charged to whichever came next.
SETTLE_S = 0.05


def sync_against_copy(pool: str, checkpoint: str, rounds: int) -> dict:
    """Direct and store sync of the full weights to every replica of ``pool`` against memcpy."""
    weights = {k: v.detach().clone() for k, v in load_model(checkpoint)[0].state_dict().items()
               if not k.startswith("rope_")}
    publisher = DirectPublisher(pool)
    times: dict[str, list[float]] = {"direct": [], "store": [], "copy": [], "memcpy": []}
    flat = torch.empty(sum(v.numel() for v in weights.values()))
    replicas = {}
    publisher.publish(weights)  # the connection is made at the first publish: not timed
    shared = 0

    def copy() -> None:
        time.sleep(SETTLE_S)
        t = time.perf_counter()
        copied = {k: v.clone() for k, v in weights.items()}
        times["copy"].append(time.perf_counter() - t)
        del copied
        time.sleep(SETTLE_S)
        t = time.perf_counter()
        offset = 0
        for v in weights.values():
            flat[offset:offset + v.numel()].copy_(v.reshape(-1))
            offset += v.numel()
        times["memcpy"].append(time.perf_counter() - t)

    # Direct and copy alternate; the store's rounds come after (each leaves the replicas and the
    # object store busy for a while, which would be charged to the next direct round).
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        t = time.perf_counter()
        result = publisher.publish(weights)
        times["direct"].append(time.perf_counter() - t)
        replicas["direct"], shared = result.replicas, result.shared_memory
        copy()
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        t = time.perf_counter()
        replicas["store"] = publish(pool, weights).replicas
        times["store"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bytes": sum(v.numel() * v.element_size() for v in weights.values()), "replicas": replicas,
            "direct_from_shared_memory": shared, "direct_through_group": replicas["direct"] - shared,
            "direct_s": med["direct"], "store_s": med["store"], "copy_s": med["copy"], "memcpy_s": med["memcpy"],
            "direct_over_copy": med["direct"] / med["copy"], "direct_over_memcpy": med["direct"] / med["memcpy"],
            "store_over_copy": med["store"] / med["copy"], "rounds_s": times}


def group_cost(checkpoint: str, threads: int, n: int = 8, length: int = 128, rounds: int = 5) -> dict:
    """Engine alone: the prefill (and first token) of n samples of one prompt against one sample,
    and against n different prompts of the same length; median seconds of ``rounds``."""
    from orchestrator.inference.engine import GenerationEngine
    from orchestrator.inference.types import Request

    torch.set_num_threads(threads)
    model, tok, eos = load_model(checkpoint)
    text = (SAMPLES_DIR / "tinyshakespeare.txt").read_text()
    ids = tok.encode(text[:20000]).ids

    def prompt(i: int) -> tuple[int, ...]:
        return tuple(ids[i * length:(i + 1) * length])

    def timed(requests: list) -> float:
        engine = GenerationEngine(model, tok, eos, block_size=16, num_blocks=512, max_batch=max(n, 1),
                                  prefix_cache=False)
        for r in requests:
            engine.add(r)
        t = time.perf_counter()
        while engine.busy:
            engine.step()
        return time.perf_counter() - t

    cases = {"one": lambda: [Request("0", prompt(0), 1)],
             "group": lambda: [Request(str(j), prompt(0), 1, temperature=1.0, seed=j) for j in range(n)],
             "distinct": lambda: [Request(str(j), prompt(j), 1) for j in range(n)]}
    for make in cases.values():
        timed(make())  # warm-up
    med = {k: statistics.median(timed(make()) for _ in range(rounds)) for k, make in cases.items()}
    return {"n": n, "prompt_tokens": length, "one_s": med["one"], "group_s": med["group"],
            "distinct_s": med["distinct"], "group_over_one": med["group"] / med["one"],
            "distinct_over_one": med["distinct"] / med["one"]}


def prefix_workload(url: str, tok, requests: int = 32, prefix_tokens: int = 96) -> dict:
    """Requests whose prompts share a ``prefix_tokens`` prefix: the prefix-cache hit rate."""
    text = (SAMPLES_DIR / "tinyshakespeare.txt").read_text()
    ids = tok(text[:4000])["input_ids"]
    shared = ids[:prefix_tokens]
    client = Client(url)
    before = metric(client.metrics(), "forgeline_serve_prefix_cache_tokens")
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: client.post("/v1/completions", {"prompt": shared + ids[200 + 8 * i:208 + 8 * i],
                                                               "max_tokens": 8, "temperature": 0}), range(requests)))
    after = metric(client.metrics(), "forgeline_serve_prefix_cache_tokens")
    queried = after["queried"] - before["queried"]
    hit = after["hit"] - before["hit"]
    return {"requests": requests, "prefix_tokens": prefix_tokens, "prompt_tokens": prefix_tokens + 8,
            "queried_tokens": queried, "hit_tokens": hit, "hit_rate": hit / queried if queried else 0.0}


def metric(text: str, name: str) -> dict[str, float]:
    """{label value: value} of a Prometheus gauge with one label."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            label = line.split('"')[1]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def median_round(rounds: list[dict]) -> dict:
    """The round of median tokens/s (the lower middle one of an even count)."""
    return sorted(rounds, key=lambda r: r["tokens_per_s"])[(len(rounds) - 1) // 2]


def linear_ceiling(model, batch: int, rounds: int = 50) -> dict:
    """Tokens/s if a decode step of ``batch`` sequences cost only its linear layers (``model``:
    ours, loaded in this process)."""
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
    ap.add_argument("--sync-rounds", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of ours and transformers' at each level")
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    prompts = prompts_from_corpus(args.prompts)
    levels = sorted(int(c) for c in args.clients.split(","))  # the largest last: its rounds carry the ceiling
    hf_dir = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "hf"
    export(args.checkpoint, hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tok.padding_side = "left"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    plain = load_model(args.checkpoint)[0]  # ours, for the linear layers' ceiling

    from orchestrator.cluster import init_loopback

    init_loopback(num_cpus=max(args.threads, 4), include_dashboard=False, log_to_driver=False)
    cfg = compose([f"checkpoint={args.checkpoint}", "inference.replicas=1", "inference.port=0",
                   f"inference.cpus_per_replica={args.threads}", f"inference.max_batch={max(levels)}",
                   f"inference.queue_limit={max(4 * max(levels), 32)}"])
    server = Background(build(cfg))
    results: dict = {"prompts": len(prompts), "max_tokens": args.max_tokens, "threads": args.threads, "levels": {},
                     "sync": {}, "decode_attention": server.server.pool.info[0].attention}
    try:
        ours(server.url, prompts[:4], 4, 8)  # warm-up
        transformers_generate(hf, tok, prompts[:4], 4, 8)
        ceilings = []
        for c in levels:  # alternate, so that a slow patch of the machine hits both
            rounds: dict[str, list] = {"ours": [], "transformers": []}
            for _ in range(args.rounds):
                time.sleep(SETTLE_S)
                rounds["ours"].append(ours(server.url, prompts, c, args.max_tokens))
                if c == max(levels):
                    time.sleep(SETTLE_S)
                    ceilings.append(linear_ceiling(plain, c))
                time.sleep(SETTLE_S)
                rounds["transformers"].append(transformers_generate(hf, tok, prompts, c, args.max_tokens))
            level = {k: median_round(v) for k, v in rounds.items()}
            level["round_ratios"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(*rounds.values())]
            level["tokens_per_s_ratio"] = statistics.median(level["round_ratios"])
            top_rounds = {k: [r["tokens_per_s"] for r in v] for k, v in rounds.items()}  # the last level's
            results["levels"][c] = level
            print(json.dumps({"clients": c, **level}), flush=True)
        results["prefix_cache"] = prefix_workload(server.url, tok)
        print(json.dumps({"prefix_cache": results["prefix_cache"]}), flush=True)
        results["sync"]["1"] = sync_against_copy(cfg.inference.name, args.checkpoint, args.sync_rounds)
        print(json.dumps({"sync_1_replica": results["sync"]["1"]}), flush=True)
    finally:
        server.stop()
    # Two replicas of one CPU each (the machine has 2 cores) for the sync to 2.
    cfg2 = compose([f"checkpoint={args.checkpoint}", "inference.replicas=2", "inference.port=0",
                    "inference.name=sync2", "inference.cpus_per_replica=1"])
    server = Background(build(cfg2))
    try:
        results["sync"]["2"] = sync_against_copy("sync2", args.checkpoint, args.sync_rounds)
        print(json.dumps({"sync_2_replicas": results["sync"]["2"]}), flush=True)
    finally:
        server.stop()
        ray.shutdown()
    results["group"] = group_cost(args.checkpoint, args.threads)
    print(json.dumps({"group": results["group"]}), flush=True)
    top = results["levels"][max(levels)]
    results["tokens_per_s_ratio_at_max_clients"] = top["tokens_per_s_ratio"]
    step_s = statistics.median(x["step_s"] for x in ceilings)
    ceiling_tps = [x["tokens_per_s"] for x in ceilings]
    fractions = [a / b for a, b in zip(top_rounds["ours"], ceiling_tps)]
    results["linear_ceiling"] = {"batch": max(levels), "step_s": step_s, "tokens_per_s": max(levels) / step_s,
                                 "ratio_to_transformers": statistics.median(
                                     a / b for a, b in zip(ceiling_tps, top_rounds["transformers"])),
                                 "our_fraction": statistics.median(fractions), "round_fractions": fractions}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
