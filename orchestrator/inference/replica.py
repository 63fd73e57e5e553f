"""A replica: one Ray actor holding the model and its GenerationEngine.

The actor is asynchronous: requests arrive as calls of ``generate`` (a streaming generator of
events), join the engine's queue, and the engine loop runs one step at a time in the actor's
event loop, so new requests and weight swaps land between decode steps.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import asdict

import torch

from orchestrator.inference.engine import GenerationEngine, Request


def load_model(checkpoint: str, device: str = "cpu", quantize: str = "none"):
    """(model, tokenizer, eos id) for a run directory, checkpoint or Hugging Face directory."""
    from tokenizers import Tokenizer

    from orchestrator import pretrained
    from orchestrator.export import EOS
    from orchestrator.models import Llama, LlamaArgs

    pre = pretrained.locate(checkpoint)
    tok = Tokenizer.from_file(pre.tokenizer_path)
    model = Llama(LlamaArgs(**model_shape(pre)))
    model.load_state_dict(pretrained.load_weights(pre))
    model.init_buffers()
    model = model.to(device).eval()
    if quantize == "int8":
        from orchestrator.inference.quantize import quantize_int8

        quantize_int8(model)
    return model, tok, tok.token_to_id(EOS)


def model_shape(pre) -> dict:
    """LlamaArgs fields of a located checkpoint."""
    import json
    from pathlib import Path

    a = dict(pre.arch)
    if "max_seq_len" not in a:  # a Hugging Face directory
        a["max_seq_len"] = json.loads((Path(pre.path).expanduser() / "config.json").read_text()).get(
            "max_position_embeddings", 2048)
    keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len", "rope_theta",
            "norm_eps", "tie_embeddings")
    return {k: a[k] for k in keys if k in a}


class Replica:
    def __init__(self, checkpoint: str, options: dict, threads: int = 1):
        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.tokenizer, eos = load_model(checkpoint, device, options.get("quantize", "none"))
        self.engine = GenerationEngine(model, self.tokenizer, eos, block_size=options["block_size"],
                                       num_blocks=options["kv_cache_tokens"] // options["block_size"],
                                       max_batch=options["max_batch"])
        self.queues: dict[str, asyncio.Queue] = {}
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.Task | None = None
        self.steps = 0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.engine.k.device)}

    async def _run(self) -> None:
        while True:
            if not self.engine.busy:
                self.wake.clear()
                await self.wake.wait()
            for event in self.engine.step():
                queue = self.queues.get(event.id)
                if queue is not None:
                    queue.put_nowait(event)
            self.steps += 1
            await asyncio.sleep(0)  # let new requests and weight swaps in between steps

    def _ensure_loop(self) -> None:
        if self.loop is None or self.loop.done():
            self.wake = self.wake or asyncio.Event()
            self.loop = asyncio.get_running_loop().create_task(self._run())

    async def generate(self, request: dict):
        """Streams the request's events (dicts) until it finishes."""
        self._ensure_loop()
        rid = request["id"]
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = queue
        self.engine.add(Request(**request))
        self.wake.set()
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield asdict(event)
        finally:
            self.queues.pop(rid, None)
            if not finished:
                self.engine.cancel(rid)

    async def complete(self, request: dict) -> dict:
        """The whole request at once (one Ray round trip rather than one per token): an event
        with all of its text and tokens."""
        text, tokens, last = [], [], None
        async for event in self.generate(request):
            text.append(event["text"])
            tokens += event["token_ids"]
            last = event
        return {**last, "text": "".join(text), "token_ids": tokens}

    async def load_weights(self, weights: dict) -> int:
        """Swaps in new weights (our parameter names) between two engine steps; returns the step."""
        from orchestrator.inference.quantize import Int8Linear

        model = self.engine.model
        if any(isinstance(m, Int8Linear) for m in model.modules()):
            # The int8 layers hold no parameters of those names: a sync would keep the old weights.
            raise ValueError("weight sync into an int8-quantized replica is not supported")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name].to(p.device, p.dtype))
        return self.steps

    def stats(self) -> dict:
        return {**self.engine.stats(), "steps": self.steps}
