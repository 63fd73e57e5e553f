"""One replica's generation engine: a KV cache in fixed-size blocks, continuous batching.

Memory: the cache is one pool of ``num_blocks`` blocks of ``block_size`` token slots per layer
(keys and values of every KV head). A sequence holds a table of the blocks its tokens occupy and
takes a new block only when it crosses into one, so memory follows the tokens actually held, not
the longest possible sequence. When the pool runs dry, the newest running sequence is preempted:
its blocks are freed and it waits to be recomputed from its tokens (prompt and output so far).

Batching: each ``step`` first admits waiting requests while blocks and batch slots allow (one
prefill of all their prompts together, which yields their first tokens), then runs one decode
step over every running sequence together, each attending over its own blocks. Finished sequences leave at
once; new ones join at the next step.

The model's own modules (norms, projections, SwiGLU, output) do the arithmetic; only attention
is rewritten here, to read and write the blocks.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from orchestrator.models.llama import Llama, apply_rope


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Sequence:
    request: Request
    tokens: list[int]  # prompt and output so far
    generator: torch.Generator
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    emitted: str = ""  # text already handed out
    finish_reason: str | None = None

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids):]


@dataclass
class Event:
    """What one step produced for one request: new text, and the end where it ended."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BlockPool:
    def __init__(self, n_blocks: int):
        self.free_ids = deque(range(n_blocks))

    @property
    def n_free(self) -> int:
        return len(self.free_ids)

    def take(self, n: int) -> list[int]:
        return [self.free_ids.popleft() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free_ids.extend(blocks)
        blocks.clear()


class GenerationEngine:
    def __init__(self, model: Llama, tokenizer, eos_id: int, block_size: int = 16, num_blocks: int = 512,
                 max_batch: int = 32, tp: int = 1):
        a = model.args
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_seq_len = a.max_seq_len
        p = next(model.parameters())
        # A tensor-parallel rank holds its own KV heads only (see replica.shard_blocks).
        shape = (a.n_layers, num_blocks, a.n_kv_heads // tp, block_size, a.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.pool = BlockPool(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # -- the queue ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(request.seed if request.seed is not None else torch.seed())
        self.waiting.append(Sequence(request, list(request.prompt_ids), gen))

    def cancel(self, request_id: str) -> None:
        for seq in list(self.waiting):
            if seq.request.id == request_id:
                self.waiting.remove(seq)
        for seq in self.running:
            if seq.request.id == request_id:
                seq.finish_reason = "cancelled"
        self._retire()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    # -- one engine step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._admit(events)
        decoding = [s for s in self.running if s.finish_reason is None and s.cached == len(s.tokens) - 1]
        decoding = self._reserve(decoding)
        if decoding:
            logits = self._decode(decoding)
            for seq, row in zip(decoding, logits):
                events.append(self._append(seq, self._sample(seq, row)))
        self._retire()
        return events

    def _admit(self, events: list[Event]) -> None:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.blocks_for(len(seq.tokens) + 1)
            if need > self.pool.n_free:
                break  # memory scheduling: wait for blocks to come free
            self.waiting.popleft()
            seq.blocks = self.pool.take(need)
            self.running.append(seq)
            admitted.append(seq)
        if admitted:  # one prefill for all of them
            for seq, logits in zip(admitted, self._prefill(admitted)):
                events.append(self._append(seq, self._sample(seq, logits)))

    def _reserve(self, decoding: list[Sequence]) -> list[Sequence]:
        """A block for each sequence whose next token starts one; preempts the newest when short."""
        for seq in list(decoding):
            if seq not in decoding:
                continue
            while self.blocks_for(seq.cached + 1) > len(seq.blocks):
                if self.pool.n_free:
                    seq.blocks += self.pool.take(1)
                    continue
                victim = decoding[-1]
                self._preempt(victim)
                decoding.remove(victim)
                if victim is seq:
                    break
        return decoding

    def _preempt(self, seq: Sequence) -> None:
        self.pool.give(seq.blocks)
        seq.cached = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _retire(self) -> None:
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self.pool.give(seq.blocks)
            self.running.remove(seq)

    # -- sampling and stopping -----------------------------------------------------------
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        r = seq.request
        logits = logits.float().cpu()
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < r.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _append(self, seq: Sequence, token: int) -> Event:
        r = seq.request
        if token == self.eos_id:
            seq.finish_reason = "stop"
        else:
            seq.tokens.append(token)
        text = self.tokenizer.decode(seq.output)
        if r.stop:
            cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, seq.finish_reason = text[:cut], "stop"
        if seq.finish_reason is None and (len(seq.output) >= r.max_tokens or len(seq.tokens) >= self.max_seq_len):
            seq.finish_reason = "length"
        # Hold back a trailing partial character (byte-level tokens can split one).
        ready = text if seq.finish_reason or not text.endswith("\ufffd") else text[: len(seq.emitted)]
        delta = ready[len(seq.emitted):] if ready.startswith(seq.emitted) else ""
        seq.emitted = ready if ready.startswith(seq.emitted) else seq.emitted
        return Event(r.id, delta, [] if token == self.eos_id else [token], seq.finish_reason,
                     prompt_tokens=len(r.prompt_ids), completion_tokens=len(seq.output))

    # -- the model with the block cache --------------------------------------------------
    def _qkv(self, attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = h.shape
        hd = attn.head_dim
        q = attn.wq(h).view(b, t, -1, hd).transpose(1, 2)
        k = attn.wk(h).view(b, t, -1, hd).transpose(1, 2)
        v = attn.wv(h).view(b, t, -1, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Runs all tokens of the sequences as one batch (right-padded: under the causal mask no
        real token sees the padding), fills their blocks; the logits after each one's last token."""
        m = self.model
        dev = self.k.device
        lengths = torch.tensor([len(s.tokens) for s in seqs], device=dev)
        t = int(lengths.max())
        ids = torch.tensor([s.tokens + [0] * (t - len(s.tokens)) for s in seqs], device=dev)
        width = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=dev)
        # The cache slot of every real token: (row, position) -> (block, offset).
        rows, pos = (torch.arange(t, device=dev)[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        block_of, offset = table[rows, pos // self.block_size], pos % self.block_size
        cos, sin = m.rope_cos[:t], m.rope_sin[:t]
        h = m.tok_embeddings(ids)
        for i, layer in enumerate(m.layers.values()):
            q, k, v = self._qkv(layer.attn, layer.attn_norm(h), cos, sin)  # (batch, heads, t, head_dim)
            self.k[i][block_of, :, offset] = k[rows, :, pos]
            self.v[i][block_of, :, offset] = v[rows, :, pos]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            h = h + layer.attn.wo(out.transpose(1, 2).reshape(len(seqs), t, -1))
            h = h + layer.mlp(layer.mlp_norm(h))
        for s in seqs:
            s.cached = len(s.tokens)
        last = h[torch.arange(len(seqs), device=dev), lengths - 1]
        return m.output(m.norm(last))

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for each sequence, attending over its blocks; logits (S, vocab)."""
        m = self.model
        dev = self.k.device
        pos = torch.tensor([s.cached for s in seqs], device=dev)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        width = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=dev)
        block_of = table.gather(1, (pos // self.block_size)[:, None])[:, 0]
        offset = pos % self.block_size
        visible = torch.arange(width * self.block_size, device=dev)[None, :] <= pos[:, None]
        mask = visible[:, None, None, :]
        cos, sin = m.rope_cos[pos][:, None, None, :], m.rope_sin[pos][:, None, None, :]
        h = m.tok_embeddings(ids)
        n = len(seqs)
        for i, layer in enumerate(m.layers.values()):
            q, k, v = self._qkv(layer.attn, layer.attn_norm(h), cos, sin)
            keys, values = self.k[i], self.v[i]
            keys[block_of, :, offset] = k[:, :, 0]
            values[block_of, :, offset] = v[:, :, 0]
            kv_heads = keys.shape[1]
            ks = keys[table].transpose(1, 2).reshape(n, kv_heads, width * self.block_size, -1)
            vs = values[table].transpose(1, 2).reshape(n, kv_heads, width * self.block_size, -1)
            out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=q.shape[1] != kv_heads)
            h = h + layer.attn.wo(out.transpose(1, 2).reshape(n, 1, -1))
            h = h + layer.mlp(layer.mlp_norm(h))
        for s in seqs:
            s.cached += 1
        return m.output(m.norm(h[:, -1]))

    def stats(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.running), "free_blocks": self.pool.n_free,
                "preemptions": self.preemptions}
