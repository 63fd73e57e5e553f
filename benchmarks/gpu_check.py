"""One prepared check of the CUDA, NCCL and bf16 paths, for the few minutes a GPU is lent.

    python benchmarks/gpu_check.py [--steps 20] [--peak-tflops N] [--smoke-on-cpu]

On a machine without a CUDA GPU it prints one JSON line saying so and exits 0 at once.
With one, it runs, in this order (about 5 minutes on one H100-class GPU):
  1. training: single-process bf16 training of model=medium and model=large through launch.train
     (strategy=single, an embedded Ray cluster that sees the GPU), side by side with a bare
     PyTorch loop of the same model, batch, data, optimizer and precision (torch.autocast bf16 over
     fp32 weights, which is what strategy=single does) in this process: tokens/s (median after 2
     warm-up steps) and their ratio (target at least 0.97), and MFU = model FLOPs per token x
     tokens/s / the device's peak dense bf16 FLOP/s. FLOPs per token are 6 N + 12 L d T (N
     parameters without the embedding, L layers, d model width, T sequence length; PaLM's
     accounting); the peak comes from the table below by device name, or --peak-tflops.
  2. zero3 on one CUDA rank (DeepSpeed's bf16 mode) against single (bf16 autocast), model=small:
     losses within 2e-2 relative (bf16, and DeepSpeed keeps bf16 working weights where autocast
     keeps fp32 ones).
  3. the inference engine on CUDA against transformers' generate, on the exported model, fp32:
     greedy outputs at 1 and 32 sequences (ours batched, transformers one prompt at a time, so no
     padding enters its numerics) equal token for token; tokens/s of both at both sizes
     (transformers batched with left padding for the 32).
  4. a checkpoint on CUDA: a run stopped at step 5 and resumed to step 10 against an uninterrupted
     run, losses within 1e-5 relative.
The last line printed is one JSON object; the exit code is 0 when it ran (whatever it found) and
1 when a step crashed (the JSON then names it). --smoke-on-cpu runs the same sequence on the CPU
with model=tiny in fp32, to test this script where no GPU is; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 125.0, "A10": 125.0, "V100": 125.0, "RTX 4090": 165.0}
WARMUP = 2


def peak_tflops(name: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"table entry {key!r}"
    return None, "unknown device: pass --peak-tflops"


def launch_train(overrides: list[str], run_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "launch.train", *overrides, f"run.dir={run_dir}",
                           "logging.progress=false", "logging.wandb.mode=disabled", "trainer.sample_tokens=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.train {' '.join(overrides)} exited {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def flops_per_token(job, n_params: int) -> float:
    m = job.model
    embedding = m.vocab_size * m.dim
    return 6 * (n_params - embedding) + 12 * m.n_layers * m.dim * job.data.seq_len


def bare_loop(overrides: list[str], device: str, steps: int) -> dict:
    """The same model, data, optimizer, schedule and precision as strategy=single, in plain torch."""
    import torch

    from orchestrator.config import compose
    from orchestrator.data import BlockSampler, TokenBlocks, prepare
    from orchestrator.models import Llama, causal_lm_loss, num_params
    from orchestrator.optim import build_optimizer, build_scheduler
    from orchestrator.trainer import model_args

    job = compose(overrides + ["run.dir=/tmp/gpu-check-unused"])
    data = prepare(job.data, job.model.vocab_size)
    torch.manual_seed(job.seed)
    with torch.device("meta"):
        model = Llama(model_args(job))
    model = model.to_empty(device=device)
    model.init_weights(job.seed)
    opt = build_optimizer(model, job.optim)
    sched = build_scheduler(opt, job.optim, job.trainer.max_steps)
    blocks = TokenBlocks(data.tokens_path, job.data.seq_len, job.data.val_fraction)  # the trainer's split
    t = job.trainer
    sampler = BlockSampler(blocks.n_train, t.global_batch_size, t.micro_batch_size, 0, 1, job.seed)
    bf16 = job.precision == "bf16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates, losses = [], []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        micro = sampler.next_step()
        total = torch.zeros((), device=device)
        for ids in micro:
            x, y = (v.to(device, non_blocking=True) for v in blocks.batch(ids))
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = causal_lm_loss(model(x), y)
            (loss / len(micro)).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total / len(micro)))  # a host sync, as the orchestrator's step has
        sync()
        rates.append(t.global_batch_size * job.data.seq_len / (time.perf_counter() - start))
    return {"tokens_per_s": statistics.median(rates[WARMUP:] or rates), "losses": losses,
            "flops_per_token": flops_per_token(job, num_params(model))}


def training(work: Path, device: str, steps: int, peak: float | None, smoke: bool) -> dict:
    sizes = {"tiny": ("trainer.global_batch_size=8", "trainer.micro_batch_size=8", "data.seq_len=64")} if smoke else {
        "medium": ("trainer.global_batch_size=32", "trainer.micro_batch_size=32", "data.seq_len=512"),
        "large": ("trainer.global_batch_size=16", "trainer.micro_batch_size=16", "data.seq_len=1024")}
    precision = "precision=fp32" if smoke else "precision=bf16"
    out = {}
    for model, batch in sizes.items():
        job = [f"model={model}", "strategy=single", "cluster.num_workers=1", precision, f"trainer.max_steps={steps}",
               "optim.warmup_steps=2", *batch]
        bare = bare_loop(job, device, steps)
        ours = launch_train(job, work / f"train-{model}")
        ratio = ours["tokens_per_s"] / bare["tokens_per_s"]
        mfu = (lambda rate: rate * bare["flops_per_token"] / (peak * 1e12)) if peak else (lambda rate: None)
        out[model] = {"params": ours["n_params"], "tokens_per_s_ours": ours["tokens_per_s"],
                      "tokens_per_s_bare": bare["tokens_per_s"], "ratio": ratio, "mfu_ours": mfu(ours["tokens_per_s"]),
                      "mfu_bare": mfu(bare["tokens_per_s"]), "flops_per_token": bare["flops_per_token"],
                      "max_loss_rel_diff_vs_bare": max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], bare["losses"])),
                      "target_met": ratio >= 0.97}
        print(json.dumps({"training": {model: out[model]}}), flush=True)
    return out


def zero3(work: Path, steps: int, smoke: bool) -> dict:
    common = ["model=tiny" if smoke else "model=small", "cluster.num_workers=1", f"trainer.max_steps={steps}",
              "precision=fp32" if smoke else "precision=bf16", "trainer.global_batch_size=16",
              "trainer.micro_batch_size=8"]
    single = launch_train(common + ["strategy=single"], work / "z-single")
    z3 = launch_train(common + ["strategy=zero3"], work / "z-zero3")
    rel = max(abs(a - b) / abs(b) for a, b in zip(z3["losses"], single["losses"]))
    return {"losses_single": single["losses"], "losses_zero3": z3["losses"], "max_rel_diff": rel,
            "tolerance": 2e-2, "passed": rel <= 2e-2}


def checkpoint(work: Path, smoke: bool) -> dict:
    common = ["model=tiny" if smoke else "model=small", "strategy=single", "cluster.num_workers=1",
              "trainer.max_steps=10", "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
              "precision=fp32" if smoke else "precision=bf16"]
    full = launch_train(common, work / "c-full")
    launch_train(common + ["trainer.exit_at_step=5"], work / "c-split")
    resumed = launch_train(common + ["run.resume=true"], work / "c-split")
    rel = max(abs(a - b) / abs(b) for a, b in zip(resumed["losses"], full["losses"]))
    return {"max_rel_diff": rel, "tolerance": 1e-5, "passed": rel <= 1e-5 and len(resumed["losses"]) == 10,
            "checkpoints": resumed["checkpoints"], "run_dir": str(work / "c-split")}


def inference(run_dir: str, device: str, max_tokens: int = 32) -> dict:
    import torch
    import transformers

    from benchmarks.serve import prompts_from_corpus
    from orchestrator.export import export
    from orchestrator.inference.engine import GenerationEngine, Request
    from orchestrator.inference.replica import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tok, eos = load_model(run_dir, device)
    hf_dir = Path(tempfile.mkdtemp(prefix="gpu-check-hf-")) / "hf"
    export(run_dir, hf_dir)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf_tok.padding_side = "left"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    prompts = prompts_from_corpus(32)
    out = {}
    for n in (1, 32):
        batch = prompts[:n]
        engine = GenerationEngine(model, tok, eos, max_batch=n)
        ids = [tok.encode(p).ids for p in batch]
        for i, p in enumerate(ids):
            engine.add(Request(id=str(i), prompt_ids=p, max_tokens=max_tokens, temperature=0.0))
        outputs: dict[str, list[int]] = {str(i): [] for i in range(n)}
        sync()
        start = time.perf_counter()
        while engine.busy:
            for ev in engine.step():
                outputs[ev.id] += ev.token_ids
        sync()
        ours_s = time.perf_counter() - start
        theirs = []
        with torch.no_grad():
            for p in ids:  # one at a time: no padding in transformers' numerics
                x = torch.tensor([p], device=device)
                g = hf.generate(x, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
                row = g[0, len(p):].tolist()
                theirs.append(row[:row.index(eos)] if eos in row else row)
            enc = hf_tok(batch, return_tensors="pt", padding=True).to(device)
            sync()
            start = time.perf_counter()
            hf.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                        pad_token_id=hf_tok.pad_token_id)
            sync()
            hf_s = time.perf_counter() - start
        equal = sum(outputs[str(i)] == theirs[i] for i in range(n))
        produced = sum(len(v) for v in outputs.values())
        out[str(n)] = {"equal_sequences": equal, "sequences": n, "passed": equal == n,
                       "tokens_per_s_ours": produced / ours_s, "tokens_per_s_transformers": n * max_tokens / hf_s}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps of each run in part 1 (at least 4)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    ap.add_argument("--smoke-on-cpu", action="store_true", help="run every part on the CPU with model=tiny")
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error(f"--steps must be at least 4 (2 warm-up steps and 2 measured), got {args.steps}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        ap.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    import torch

    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.smoke_on_cpu:
        print(json.dumps({"gpu": None, "ran": False, "reason": "no CUDA GPU on this machine; nothing to check"}))
        return 0
    device = "cuda" if has_gpu and not args.smoke_on_cpu else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run)"
    peak, peak_source = peak_tflops(name, args.peak_tflops) if device == "cuda" else (None, "cpu")
    result: dict = {"gpu": name, "ran": True, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "peak_bf16_tflops": peak, "peak_source": peak_source, "steps": args.steps}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.time()
    failed = []
    parts = [("training", lambda: training(work, device, args.steps, peak, args.smoke_on_cpu)),
             ("zero3", lambda: zero3(work, 10, args.smoke_on_cpu)),
             ("checkpoint", lambda: checkpoint(work, args.smoke_on_cpu)),
             ("inference", lambda: inference(result["checkpoint"]["run_dir"], device))]
    for part, run in parts:
        try:
            result[part] = run()
        except Exception as exc:
            failed.append(part)
            result[part] = {"error": f"{type(exc).__name__}: {exc}"[-3000:], "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps({part: result[part]}), flush=True)
        result["wall_s"] = time.time() - started
    result["failed_parts"] = failed
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
