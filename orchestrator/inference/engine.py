"""One replica's generation engine: a KV cache in fixed-size blocks, continuous batching.

Memory: the cache is one pool of ``num_blocks`` blocks of ``block_size`` token slots per layer
(keys and values of every KV head). A sequence holds a table of the blocks its tokens occupy and
takes a new block only when it crosses into one, so memory follows the tokens actually held, not
the longest possible sequence. When the pool runs dry, the newest running sequence is preempted:
its blocks are freed and it waits to be recomputed from its tokens (prompt and output so far).

Batching: each ``step`` first admits waiting requests while blocks and batch slots allow (one
prefill of all their prompts together, which yields their first tokens), then runs one decode
step over every running sequence together, each attending over its own blocks. Finished sequences
leave at once; new ones join at the next step.

The model's own modules do the arithmetic; the engine hands each block an attention hook
(``Block.forward(..., attend=)``) that writes the new keys and values into the blocks and attends
over them.

Failures: a request the engine cannot take (``add``) or whose step fails (sampling, or a batched
forward that fails again when the request runs alone) ends with ``finish_reason`` "error" and a
message; its blocks are freed and every other request goes on.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from orchestrator.inference.types import MAX_LOGPROBS, MAX_SEED, Event, Request, Stats, TokenLogprob
from orchestrator.models.llama import Llama, causal_attention

__all__ = ["GenerationEngine", "Request", "Event", "check_request"]


@dataclass
class Sequence:
    request: Request
    tokens: list[int]  # prompt and output so far
    generator: torch.Generator
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache
    emitted: str = ""  # text already handed out
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs_sent: bool = False

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids):]

    @property
    def wants_prompt_logprobs(self) -> bool:
        r = self.request
        return r.echo and r.logprobs is not None and not self.prompt_logprobs_sent


class BlockPool:
    def __init__(self, n_blocks: int):
        self.total = n_blocks
        self.free_ids = deque(range(n_blocks))

    @property
    def n_free(self) -> int:
        return len(self.free_ids)

    def take(self, n: int) -> list[int]:
        return [self.free_ids.popleft() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free_ids.extend(blocks)
        blocks.clear()


def check_request(r: Request, vocab_size: int, max_seq_len: int) -> None:
    """Raises ValueError naming the field of a request the engine cannot run."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not r.prompt_ids:
        raise ValueError("prompt: empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in r.prompt_ids):
        raise ValueError(f"prompt: token ids must be integers in [0, {vocab_size})")
    if not isinstance(r.max_tokens, int) or r.max_tokens < (0 if r.echo else 1):
        raise ValueError(f"max_tokens: must be an integer >= {0 if r.echo else 1}, got {r.max_tokens!r}")
    limit = max_seq_len if r.max_tokens == 0 else max_seq_len - 1
    if len(r.prompt_ids) > limit:
        raise ValueError(f"prompt: {len(r.prompt_ids)} tokens; the context holds {max_seq_len} with the first "
                         "new token")
    if not number(r.temperature) or not 0 <= r.temperature <= 2:
        raise ValueError(f"temperature: must be a number in [0, 2], got {r.temperature!r}")
    if not number(r.top_p) or not 0 < r.top_p <= 1:
        raise ValueError(f"top_p: must be a number in (0, 1], got {r.top_p!r}")
    if r.seed is not None and (not isinstance(r.seed, int) or not 0 <= r.seed <= MAX_SEED):
        raise ValueError(f"seed: must be an integer in [0, {MAX_SEED}], got {r.seed!r}")
    if r.logprobs is not None and (not isinstance(r.logprobs, int) or not 0 <= r.logprobs <= MAX_LOGPROBS):
        raise ValueError(f"logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {r.logprobs!r}")
    if not all(isinstance(s, str) and s for s in r.stop):
        raise ValueError("stop: must be non-empty strings")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


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
        self.vocab_size = a.vocab_size
        if num_blocks * block_size < a.max_seq_len:
            raise ValueError(f"a cache of {num_blocks} blocks of {block_size} tokens cannot hold one sequence of "
                             f"the model's context ({a.max_seq_len} tokens)")
        p = next(model.parameters())
        # A tensor-parallel rank holds its own KV heads only (see replica.shard_blocks).
        shape = (a.n_layers, num_blocks, a.n_kv_heads // tp, block_size, a.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.pool = BlockPool(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Event] = []  # refused or failed requests, reported by the next step
        self.preemptions = 0
        self.failures = 0
        self.cancellations = 0  # requests ended by cancel() before they finished

    # -- the queue ---------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queues a request; one the engine cannot run ends at the next step with an error event."""
        try:
            check_request(request, self.vocab_size, self.max_seq_len)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(request.seed if request.seed is not None else torch.seed())
        except Exception as exc:
            self.failures += 1
            self.failed.append(Event(request.id, "", [], "error", len(request.prompt_ids), 0, error=describe(exc)))
            return
        self.waiting.append(Sequence(request, list(request.prompt_ids), gen))

    def cancel(self, request_id: str) -> None:
        for seq in list(self.waiting):
            if seq.request.id == request_id:
                self.waiting.remove(seq)
                self.cancellations += 1
        for seq in self.running:
            if seq.request.id == request_id and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                self.cancellations += 1
        self._retire()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.failed)

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    # -- one engine step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Event]:
        events, self.failed = self.failed, []
        self._admit(events)
        decoding = [s for s in self.running if s.finish_reason is None and s.cached == len(s.tokens) - 1]
        decoding = self._reserve(decoding)
        if decoding:
            for seq, row in self._isolated(self._decode, decoding, events):
                self._emit(seq, row, events)
        self._retire()
        return events

    def _isolated(self, forward, seqs: list[Sequence], events: list[Event]):
        """(sequence, logits) of a batched forward; if it raises, each sequence runs alone and
        only those that fail alone fail."""
        try:
            return list(zip(seqs, forward(seqs)))
        except Exception as exc:
            if len(seqs) == 1:
                self._fail(seqs[0], exc, events)
                return []
        out = []
        for seq in seqs:
            out += self._isolated(forward, [seq], events)
        return out

    def _fail(self, seq: Sequence, exc: BaseException, events: list[Event]) -> None:
        self.failures += 1
        seq.finish_reason, seq.error = "error", describe(exc)
        events.append(Event(seq.request.id, "", [], "error", len(seq.request.prompt_ids), len(seq.output),
                            error=seq.error))

    def _emit(self, seq: Sequence, logits: torch.Tensor, events: list[Event], prompt_logits=None) -> None:
        """The event of one sequence's step from its next-token logits; a failure fails it alone."""
        try:
            prompt_logprobs = None
            if prompt_logits is not None:
                prompt_logprobs = self._prompt_logprobs(seq, prompt_logits)
            if seq.request.max_tokens == 0:  # echo only: the prompt and its log-probabilities
                seq.finish_reason = "length"
                events.append(Event(seq.request.id, "", [], "length", len(seq.request.prompt_ids), 0,
                                    logprobs=None if seq.request.logprobs is None else [],
                                    prompt_logprobs=prompt_logprobs))
                return
            logits = logits.float().cpu()
            token = self._sample(seq, logits)
            event = self._append(seq, token)
            if seq.request.logprobs is not None:
                event.logprobs = [self._logprob(torch.log_softmax(logits, -1), token, seq.request.logprobs)
                                  ] if event.token_ids else []
            event.prompt_logprobs = prompt_logprobs
            events.append(event)
        except Exception as exc:
            self._fail(seq, exc, events)

    def _admit(self, events: list[Event]) -> None:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.blocks_for(min(len(seq.tokens) + 1, self.max_seq_len))
            if need > self.pool.n_free:
                break  # memory scheduling: wait for blocks to come free
            self.waiting.popleft()
            seq.blocks = self.pool.take(need)
            self.running.append(seq)
            admitted.append(seq)
        if admitted:  # one prefill for all of them
            for seq, (logits, prompt_logits) in self._isolated(self._prefill, admitted, events):
                self._emit(seq, logits, events, prompt_logits)

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

    # -- sampling, log-probabilities and stopping ----------------------------------------
    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        r = seq.request
        if r.temperature <= 0:
            return int(logits.argmax())
        # In float64 (where every positive number JSON can write is above zero) and with the
        # largest logit subtracted first, any positive temperature gives finite numbers: the most
        # likely token 1, the others 0 or more.
        logits = logits.double()
        probs = torch.softmax((logits - logits.max()) / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < r.top_p  # the smallest set reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    @staticmethod
    def _logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """The token's log-probability under the model (before temperature) and the top k."""
        top = ()
        if k:
            values, ids = logprobs.topk(k)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> list[TokenLogprob]:
        """logits (prompt length, vocab): the first prompt token has none; each later one is
        scored by the logits after the token before it."""
        seq.prompt_logprobs_sent = True
        ids = list(seq.request.prompt_ids)
        logprobs = torch.log_softmax(logits.float().cpu(), -1)
        k = seq.request.logprobs
        return [TokenLogprob(ids[0], None)] + [self._logprob(logprobs[j - 1], ids[j], k) for j in range(1, len(ids))]

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
    def _slots(self, seqs: list[Sequence], positions: torch.Tensor, rows: torch.Tensor):
        """(block, offset) of each (row, position) pair's cache slot."""
        width = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.k.device)
        return table, table[rows, positions // self.block_size], positions % self.block_size

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Runs all tokens of the sequences as one batch (right-padded: under the causal mask no
        real token sees the padding) and fills their blocks. Per sequence: the logits after its
        last token, and those of every prompt position where its request echoes log-probabilities."""
        m = self.model
        dev = self.k.device
        lengths = torch.tensor([len(s.tokens) for s in seqs], device=dev)
        t = int(lengths.max())
        ids = torch.tensor([s.tokens + [0] * (t - len(s.tokens)) for s in seqs], device=dev)
        rows, pos = (torch.arange(t, device=dev)[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        _, block_of, offset = self._slots(seqs, pos, rows)

        def attend(i: int):
            def fn(q, k, v):
                self.k[i][block_of, :, offset] = k[rows, :, pos]
                self.v[i][block_of, :, offset] = v[rows, :, pos]
                return causal_attention(q, k, v)
            return fn

        h = m.tok_embeddings(ids)
        cos, sin = m.rope_cos[:t], m.rope_sin[:t]
        for i, layer in enumerate(m.layers.values()):
            h = layer(h, cos, sin, attend=attend(i))
        for s in seqs:
            s.cached = len(s.tokens)
        last = m.output(m.norm(h[torch.arange(len(seqs), device=dev), lengths - 1]))
        out = []
        for n, s in enumerate(seqs):
            prompt = m.output(m.norm(h[n, : len(s.request.prompt_ids)])) if s.wants_prompt_logprobs else None
            out.append((last[n], prompt))
        return out

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for each sequence, attending over its blocks; logits (S, vocab)."""
        m = self.model
        dev = self.k.device
        n = len(seqs)
        pos = torch.tensor([s.cached for s in seqs], device=dev)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        table, block_of, offset = self._slots(seqs, pos, torch.arange(n, device=dev))
        span = table.shape[1] * self.block_size
        mask = (torch.arange(span, device=dev)[None, :] <= pos[:, None])[:, None, None, :]

        def attend(i: int):
            def fn(q, k, v):
                keys, values = self.k[i], self.v[i]
                keys[block_of, :, offset] = k[:, :, 0]
                values[block_of, :, offset] = v[:, :, 0]
                heads = keys.shape[1]
                ks = keys[table].transpose(1, 2).reshape(n, heads, span, -1)
                vs = values[table].transpose(1, 2).reshape(n, heads, span, -1)
                return F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=q.shape[1] != heads)
            return fn

        h = m.tok_embeddings(ids)
        cos, sin = m.rope_cos[pos][:, None, None, :], m.rope_sin[pos][:, None, None, :]
        for i, layer in enumerate(m.layers.values()):
            h = layer(h, cos, sin, attend=attend(i))
        for s in seqs:
            s.cached += 1
        return m.output(m.norm(h[:, -1]))

    def stats(self) -> Stats:
        return Stats(len(self.waiting), len(self.running), self.pool.n_free, self.pool.total, self.preemptions,
                     failed_requests=self.failures, cancelled_requests=self.cancellations)
