"""One replica's generation engine: a KV cache in fixed-size blocks, continuous batching,
shared prefixes.

Memory: the cache is one pool of ``num_blocks`` blocks of ``block_size`` token slots per layer
(keys and values of every KV head), stored slot by slot. A sequence holds a table of the blocks
its tokens occupy and takes a new block only when it crosses into one, so memory follows the
tokens actually held. When the pool runs dry, the newest running sequence is preempted: its blocks
are given back and it waits to be recomputed from its tokens (prompt and output so far).

Sharing: blocks are reference-counted. The ``n`` samples of one prompt admitted together run one
prefill; the others share all of its blocks and sample their first tokens from the same logits. A
sequence about to write into a block it shares copies that block first (copy-on-write), so samples
diverge only from the first block they write. Full blocks of prompts also enter a prefix cache,
keyed by a hash of every token up to the block's end (and checked token by token on a hit): a later
request whose prompt starts with the same blocks shares them and prefills only the rest. A cached
block nobody holds stays until its slots are needed (least recently used first).

Batching: each ``step`` admits waiting requests while blocks and batch slots allow (their
prefills, which yield their first tokens), then decodes one token for every running sequence
together, each attending over its own blocks; finished sequences leave at once.

The model's own modules do the arithmetic; the engine hands each block an attention hook
(``Block.forward(..., attend=)``) that writes the new keys and values into the cache and attends
over it.

Failures: a request the engine cannot take (``add``) or whose step fails (sampling, or a batched
forward that fails again when the request runs alone) ends with ``finish_reason`` "error" and a
message; its blocks are given back and every other request goes on.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from orchestrator.inference import kernels
from orchestrator.inference.types import MAX_LOGPROBS, MAX_SEED, Event, Request, Stats, TokenLogprob
from orchestrator.models.llama import Llama, causal_attention, rotate, rotation

__all__ = ["GenerationEngine", "Request", "Event", "check_request"]


@dataclass(eq=False)  # identity: the engine's lists compare sequences (field by field cost O(n^2) per step)
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
    """Reference-counted blocks. A block nobody holds is free, or, while the prefix cache keeps
    it, evictable: it counts as free and is reused last (least recently used first). Free blocks
    are reused newest first."""

    def __init__(self, n_blocks: int):
        self.total = n_blocks
        self.refs = [0] * n_blocks
        # A stack: the block given back last is taken first (its memory is likely still in cache).
        self.free_ids = list(range(n_blocks - 1, -1, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.on_evict = lambda block: None
        self.keeps = lambda block: False  # whether the prefix cache holds the block

    @property
    def n_free(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self.free_ids:
                block = self.free_ids.pop()
            else:
                block, _ = self.evictable.popitem(last=False)
                self.on_evict(block)
            self.refs[block] = 1
            out.append(block)
        return out

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def give(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.keeps(block):
                    self.evictable[block] = None
                else:
                    self.free_ids.append(block)
        blocks.clear()


class PrefixCache:
    """Full prompt blocks by the hash of every token up to their end."""

    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.blocks: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, its tokens from 0)
        self.hash_of: dict[int, int] = {}  # block -> hash
        self.queried = 0  # prompt tokens looked up
        self.hit = 0  # of those, tokens found
        pool.on_evict = self.drop
        pool.keeps = self.hash_of.__contains__

    def clear(self) -> None:
        """Forgets every entry (the weights changed: the cached keys and values are stale)."""
        for block in list(self.pool.evictable):
            del self.pool.evictable[block]
            self.pool.free_ids.append(block)
        self.blocks.clear()
        self.hash_of.clear()

    def drop(self, block: int) -> None:
        self.blocks.pop(self.hash_of.pop(block), None)

    def hashes(self, tokens: list[int], n_blocks: int) -> list[int]:
        bs = self.block_size
        return [hash(tuple(tokens[: (j + 1) * bs])) for j in range(n_blocks)]

    def lookup(self, tokens: list[int]) -> list[int]:
        """The cached blocks of the longest run of ``tokens``' full blocks, leaving at least the
        last token to compute (its logits give the next token)."""
        n = (len(tokens) - 1) // self.block_size
        found = []
        for j, h in enumerate(self.hashes(tokens, n)):
            entry = self.blocks.get(h)
            if entry is None or entry[1] != tuple(tokens[: (j + 1) * self.block_size]):
                break
            found.append(entry[0])
        return found

    def insert(self, tokens: list[int], blocks: list[int], n_tokens: int) -> None:
        """Registers the full blocks among the first ``n_tokens`` of a sequence just computed."""
        n = n_tokens // self.block_size
        for j, h in enumerate(self.hashes(tokens, n)):
            block = blocks[j]
            if h in self.blocks or block in self.hash_of:
                continue
            self.blocks[h] = (block, tuple(tokens[: (j + 1) * self.block_size]))
            self.hash_of[block] = h


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


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """One buffer holding every parameter of ``model`` end to end, in ``named_parameters`` order:
    the one they already point into, or a new one they are pointed at (a copy of their values)."""
    params = [p for _, p in model.named_parameters()]
    total = sum(p.numel() for p in params)
    head = params[0]
    storage = head.untyped_storage()
    offset = 0
    for p in params:
        if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset
                or not p.is_contiguous() or p.dtype != head.dtype):
            break
        offset += p.numel()
    else:
        if storage.nbytes() == total * head.element_size():
            return head.detach().new_empty(0).set_(storage, 0, (total,))
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    point_parameters(model, flat)
    return flat


def point_parameters(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Points the parameters at consecutive slices of ``flat`` (``named_parameters`` order)."""
    offset = 0
    for _, p in model.named_parameters():
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


def _joined(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights of linear layers that read the same input, as one (their rows end to end): a
    view where they lie end to end in one buffer, else a copy."""
    head = weights[0]
    offset = head.storage_offset()
    for w in weights:
        if (w.untyped_storage().data_ptr() != head.untyped_storage().data_ptr() or w.storage_offset() != offset
                or not w.is_contiguous()):
            return torch.cat(weights)
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return head.new_empty(0).set_(head.untyped_storage(), head.storage_offset(), (rows, head.shape[1]))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's own blocked layout (a copy), which ``_onednn_linear`` also takes."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _onednn_agrees(weight: torch.Tensor, prepare=lambda w: w) -> bool:
    """Whether ``_onednn_linear`` over ``prepare(weight)`` agrees with F.linear over the weight to
    rounding on a probe input (False where oneDNN cannot take it)."""
    x = torch.linspace(-1, 1, 8 * weight.shape[1]).view(8, -1)
    try:
        return torch.allclose(_onednn_linear(x, prepare(weight)), F.linear(x, weight), rtol=1e-4, atol=1e-5)
    except RuntimeError:
        return False


def pick_linear(weight: torch.Tensor):
    """The matmul of the engine's linear layers for weights like ``weight``. On the CPU in fp32,
    oneDNN's: measured 1.2-2x faster than F.linear for the 1-64 rows of a decode step on this
    project's CPU (faster again over packed weights: see GenerationEngine). Elsewhere, or if
    oneDNN is missing or disagrees beyond rounding, F.linear."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return F.linear
    return _onednn_linear if _onednn_agrees(weight) else F.linear


def fusable(model: Llama) -> bool:
    """Whether the engine may run the model's blocks from their weights (plain linear layers of
    plain tensors; not tensor-parallel shards or quantized layers)."""
    from torch.distributed.tensor import DTensor

    linears = [m for b in model.layers.values() for m in (b.attn.wq, b.attn.wk, b.attn.wv, b.attn.wo,
                                                         b.mlp.w_gate, b.mlp.w_up, b.mlp.w_down)]
    return (all(type(m) is torch.nn.Linear and m.bias is None for m in linears)
            and not any(isinstance(p, DTensor) for p in model.parameters()))


class GenerationEngine:
    def __init__(self, model: Llama, tokenizer, eos_id: int, block_size: int = 16, num_blocks: int = 512,
                 max_batch: int = 32, tp: int = 1, prefix_cache: bool = True, pack_weights: bool = True,
                 native_attention: bool = True):
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
        # Slot-major: slot block * block_size + offset. A tensor-parallel rank holds its own KV
        # heads only (see replica.shard_blocks).
        shape = (a.n_layers, num_blocks * block_size, a.n_kv_heads // tp, a.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.use_prefix_cache = prefix_cache
        # Decode steps on the CPU in fp32: attention by the native kernel straight from the cache
        # (kernels.py); elsewhere, for several new tokens per sequence, or where the kernel cannot
        # be built, the blocks gathered and scaled_dot_product_attention.
        self.kernel = None
        self.attention = "gather + SDPA"
        if native_attention and self.k.device.type == "cpu" and self.k.dtype == torch.float32:
            self.kernel = kernels.paged_decode_attention()
            self.attention = "native kernel" if self.kernel else f"{self.attention} ({kernels.unavailable_reason})"
        elif native_attention:
            self.attention += f" (no native kernel for {self.k.dtype} on {self.k.device.type})"
        # Blocks run from their weights, the projections that read one input joined into one
        # matrix (a view: the parameters are put end to end in one buffer here).
        self.fused = fusable(model)
        self.linear = F.linear
        if self.fused:
            flat_parameters(model)
            self.linear = pick_linear(model.output.weight)
        # With oneDNN: the matrices also packed in its blocked layout (a second copy of the linear
        # weights, made again after each weight change: 23-43 ms for the 12M model here), which its
        # matmuls read 20-30% faster at 8-40 rows here.
        self.pack = pack_weights and self.linear is _onednn_linear and _onednn_agrees(model.output.weight, _onednn_pack)
        # (the parameters' memory and versions, per block the weights _blocks reads, the output's)
        self._joined: tuple[tuple, list, torch.Tensor | None] = ((), [], None)
        self._held: list[torch.Tensor] = []
        self._parts = [(b.attn.wq.weight, b.attn.wk.weight, b.attn.wv.weight, b.mlp.w_gate.weight, b.mlp.w_up.weight,
                        b.attn.wo.weight, b.mlp.w_down.weight) for b in model.layers.values()] if self.fused else []
        self.reset()
        self.preemptions = 0
        self.failures = 0
        self.cancellations = 0  # requests ended by cancel() before they finished
        self.shared_prefills = 0  # sequences that took a group leader's prefill

    def reset(self) -> None:
        """Drops every request and cached block: the engine starts clean."""
        self.pool = BlockPool(self.k.shape[1] // self.block_size)
        self.prefix = PrefixCache(self.pool, self.block_size) if self.use_prefix_cache else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Event] = []  # refused or failed requests, reported by the next step

    def weights_changed(self) -> None:
        """New weights: no later request may reuse keys and values cached under the old ones."""
        if self.prefix is not None:
            self.prefix.clear()

    @property
    def cache_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

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
            done = self._isolated(self._forward_cached, decoding, events)
            self._emit_all([seq for seq, _ in done], [row for _, row in done], events)
        self._retire()
        return events

    def _isolated(self, forward, seqs: list[Sequence], events: list[Event]) -> list[tuple[Sequence, object]]:
        """(sequence, its output) of a batched forward; if it raises, each sequence runs alone and
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

    def _admit(self, events: list[Event]) -> None:
        """Takes waiting sequences while batch slots and blocks allow: a group's followers share
        their leader's blocks; the others share what the prefix cache holds of their prompt and
        take blocks for the rest. Then the prefills (fresh ones together, the others over their
        cached prefix), and the first token of each."""
        leaders: dict[tuple[int, ...], Sequence] = {}
        fresh, resumed, followers = [], [], []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            key = tuple(seq.tokens)
            shareable = not seq.wants_prompt_logprobs
            if shareable and key in leaders:
                followers.append((seq, leaders[key]))
            else:
                hits = self.prefix.lookup(seq.tokens) if self.prefix is not None and shareable else []
                need = self.blocks_for(min(len(seq.tokens) + 1, self.max_seq_len)) - len(hits)
                if need > self.pool.n_free - sum(self.pool.refs[b] == 0 for b in hits):
                    break  # memory scheduling: wait for blocks to come free
                for b in hits:
                    self.pool.share(b)
                if self.prefix is not None and shareable:
                    self.prefix.queried += len(seq.tokens)
                    self.prefix.hit += len(hits) * self.block_size
                seq.blocks = hits + self.pool.take(need)
                seq.cached = len(hits) * self.block_size
                (resumed if hits else fresh).append(seq)
                if shareable:
                    leaders[key] = seq
            self.waiting.popleft()
            self.running.append(seq)
        if not (fresh or resumed):
            return
        logits: dict[int, torch.Tensor] = {}
        prompt_logits: dict[int, torch.Tensor] = {}
        if fresh:
            for seq, (last, prompt) in self._isolated(self._prefill, fresh, events):
                logits[id(seq)] = last
                if prompt is not None:
                    prompt_logits[id(seq)] = prompt
        if resumed:
            for seq, last in self._isolated(self._forward_cached, resumed, events):
                logits[id(seq)] = last
        for seq in fresh + resumed:
            if id(seq) in logits and self.prefix is not None:
                self.prefix.insert(seq.tokens, seq.blocks, len(seq.tokens))
        taking = [s for s in fresh + resumed if id(s) in logits]
        for seq, leader in followers:  # one prefill for the group: share all of the leader's blocks
            if id(leader) not in logits:
                self._fail(seq, RuntimeError(f"its group's prefill failed: {leader.error}"), events)
                continue
            for b in leader.blocks:
                self.pool.share(b)
            seq.blocks, seq.cached = list(leader.blocks), leader.cached
            logits[id(seq)] = logits[id(leader)]
            self.shared_prefills += 1
            taking.append(seq)
        self._emit_all(taking, [logits[id(s)] for s in taking], events,
                       [prompt_logits.get(id(s)) for s in taking])

    def _reserve(self, decoding: list[Sequence]) -> list[Sequence]:
        """For each sequence, the block its next token is written to: a new one when it starts
        one, a private copy when it shares that block; preempts the newest when short."""
        bs = self.block_size
        for seq in list(decoding):
            if seq not in decoding:
                continue
            while True:
                j = seq.cached // bs
                if j < len(seq.blocks) and self.pool.refs[seq.blocks[j]] == 1:
                    break
                if self.pool.n_free:
                    new = self.pool.take(1)[0]
                    if j < len(seq.blocks):  # copy-on-write of a shared block
                        old = seq.blocks[j]
                        self.k[:, new * bs:(new + 1) * bs] = self.k[:, old * bs:(old + 1) * bs]
                        self.v[:, new * bs:(new + 1) * bs] = self.v[:, old * bs:(old + 1) * bs]
                        self.pool.give([old])
                        seq.blocks[j] = new
                    else:
                        seq.blocks.append(new)
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
    def _emit_all(self, seqs: list[Sequence], rows: list[torch.Tensor], events: list[Event],
                  prompt_logits: list | None = None) -> None:
        """Each sequence's next token from its logits (greedy rows in one call); a failure fails
        only its sequence."""
        if not seqs:
            return
        logits = torch.stack(rows).float().cpu()
        greedy = logits.argmax(-1).tolist()
        want = [n for n, s in enumerate(seqs) if s.request.logprobs is not None]
        logprobs = dict(zip(want, torch.log_softmax(logits[want], -1))) if want else {}
        for n, seq in enumerate(seqs):
            try:
                r = seq.request
                prompt_logprobs = None
                if prompt_logits is not None and prompt_logits[n] is not None:
                    prompt_logprobs = self._prompt_logprobs(seq, prompt_logits[n])
                if r.max_tokens == 0:  # echo only: the prompt and its log-probabilities
                    seq.finish_reason = "length"
                    events.append(Event(r.id, "", [], "length", len(r.prompt_ids), 0,
                                        logprobs=None if r.logprobs is None else [], prompt_logprobs=prompt_logprobs))
                    continue
                token = greedy[n] if r.temperature <= 0 else self._sample(seq, logits[n])
                event = self._append(seq, token)
                if r.logprobs is not None:
                    event.logprobs = [self._logprob(logprobs[n], token, r.logprobs)] if event.token_ids else []
                    if token == self.eos_id:
                        event.end_logprob = float(logprobs[n][token])
                event.prompt_logprobs = prompt_logprobs
                events.append(event)
            except Exception as exc:
                self._fail(seq, exc, events)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        r = seq.request
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
    def _joined_weights(self) -> list[tuple]:
        """Per block, what ``_blocks`` reads, (wq, wk, wv) and (w_gate, w_up) joined, the matrices
        packed where ``pack``; made again when a parameter changes (its memory, or in place)."""
        output = self.model.output.weight
        weights = [w for ws in self._parts for w in ws] + [output]
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if key != self._joined[0]:
            # The memory of the weights the key names stays held until the next change, so no
            # new tensor can take its address (with a fresh version counter) and match the key.
            self._held = [w.detach() for w in weights]
            pack = _onednn_pack if self.pack else (lambda w: w)
            layers = []
            for b, ws in zip(self.model.layers.values(), self._parts):
                a, n1, n2 = b.attn, b.attn_norm, b.mlp_norm
                layers.append((n1.normalized_shape, n1.weight, n1.eps, pack(_joined(list(ws[:3]))), a.n_heads,
                               a.n_kv_heads, a.head_dim, pack(ws[5]), n2.weight, n2.eps, pack(_joined(list(ws[3:5]))),
                               pack(ws[6])))
            self._joined = (key, layers, pack(output))
        return self._joined[1]

    def _blocks(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The model's blocks over h (n, t, dim), attention by ``attend(i)(q, k, v)``. With
        ``fused``, the arithmetic of Block.forward with the joined projections: the same numbers
        (a joined matmul's columns equal the separate ones), fewer and larger calls, through
        ``self.linear``."""
        m = self.model
        if not self.fused:
            for i, layer in enumerate(m.layers.values()):
                h = layer(h, cos, sin, attend=attend(i))
            return h
        n, t, _ = h.shape
        linear = self.linear
        cos, sin = rotation(cos.to(h.dtype), sin.to(h.dtype))
        for i, (shape, w1, eps1, qkv_w, heads, kv_heads, head_dim, wo, w2, eps2, gate_up_w, w_down) in enumerate(
                self._joined_weights()):
            x = F.rms_norm(h, shape, w1, eps1)
            qkv = linear(x, qkv_w).view(n, t, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            qk = rotate(qkv[:, :heads + kv_heads], cos, sin)
            out = attend(i)(qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:])
            h = h + linear(out.transpose(1, 2).reshape(n, t, -1), wo)
            x = F.rms_norm(h, shape, w2, eps2)
            gate, up = linear(x, gate_up_w).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, w_down)
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self.fused:
            return m.output(m.norm(h))
        # The output matrix as _blocks, earlier in this forward, left it (weights change between steps).
        return self.linear(F.rms_norm(h, m.norm.normalized_shape, m.norm.weight, m.norm.eps), self._joined[2])

    def _block_table(self, seqs: list[Sequence]) -> torch.Tensor:
        """(sequences, width): each sequence's blocks, padded with block 0."""
        width = max(len(s.blocks) for s in seqs)
        return torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.k.device)

    def _slots(self, table: torch.Tensor) -> torch.Tensor:
        """(sequences, span): the cache slot of every position of the blocks of a block table."""
        offsets = torch.arange(self.block_size, device=self.k.device)
        return (table[:, :, None] * self.block_size + offsets).reshape(len(table), -1)

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Prompts with nothing cached: all their tokens as one batch (right-padded: under the
        causal mask no real token sees the padding), filling their slots. Per sequence: the
        logits after its last token, and those of every prompt position where it echoes
        log-probabilities."""
        m = self.model
        dev = self.k.device
        lengths = torch.tensor([len(s.tokens) for s in seqs], device=dev)
        t = int(lengths.max())
        ids = torch.tensor([s.tokens + [0] * (t - len(s.tokens)) for s in seqs], device=dev)
        rows, pos = (torch.arange(t, device=dev)[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        slots = self._slots(self._block_table(seqs))[rows, pos]

        def attend(i: int):
            def fn(q, k, v):
                self.k[i].index_copy_(0, slots, k[rows, :, pos])
                self.v[i].index_copy_(0, slots, v[rows, :, pos])
                return causal_attention(q, k, v)
            return fn

        h = self._blocks(m.tok_embeddings(ids), m.rope_cos[:t], m.rope_sin[:t], attend)
        for s in seqs:
            s.cached = len(s.tokens)
        last = self._logits(h[torch.arange(len(seqs), device=dev), lengths - 1])
        out = []
        for n, s in enumerate(seqs):
            prompt = self._logits(h[n, : len(s.request.prompt_ids)]) if s.wants_prompt_logprobs else None
            out.append((last[n], prompt))
        return out

    def _forward_cached(self, seqs: list[Sequence]) -> torch.Tensor:
        """The tokens of each sequence past what the cache holds (one for a decode, the rest of a
        prompt after a prefix-cache hit), attending over their blocks; logits after each
        sequence's last token (S, vocab)."""
        m = self.model
        dev = self.k.device
        n = len(seqs)
        starts = torch.tensor([s.cached for s in seqs], device=dev)
        counts = [len(s.tokens) - s.cached for s in seqs]
        t = max(counts)
        counted = torch.tensor(counts, device=dev)
        ids = torch.tensor([s.tokens[s.cached:] + [0] * (t - len(s.tokens) + s.cached) for s in seqs], device=dev)
        table = self._block_table(seqs)
        pos = starts[:, None] + torch.arange(t, device=dev)[None, :]  # (n, t) positions of the new tokens
        clamped = pos.clamp(max=self.max_seq_len - 1)
        cos, sin = m.rope_cos[clamped][:, None], m.rope_sin[clamped][:, None]
        if t == 1:  # a decode step: one new token per sequence
            bs = self.block_size
            new_slots = torch.tensor([s.blocks[s.cached // bs] * bs + s.cached % bs for s in seqs], device=dev)

            def new(x: torch.Tensor) -> torch.Tensor:
                return x[:, :, 0]
        else:
            real = torch.arange(t, device=dev)[None, :] < counted[:, None]
            rows, cols = real.nonzero(as_tuple=True)
            new_slots = self._slots(table)[rows, pos[rows, cols]]

            def new(x: torch.Tensor) -> torch.Tensor:
                return x[rows, :, cols]

        def write(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.k[i], self.v[i]
            keys.index_copy_(0, new_slots, new(k))
            values.index_copy_(0, new_slots, new(v))
            return keys, values

        if t == 1 and self.kernel is not None:
            lengths = starts + 1
            kernel = self.kernel

            def attend(i: int):
                def fn(q, k, v):
                    keys, values = write(i, k, v)
                    out = torch.empty((n, 1, q.shape[1], q.shape[3]), dtype=q.dtype, device=dev)
                    kernel(q[:, :, 0], keys, values, table, lengths, self.block_size, out[:, 0])
                    return out.transpose(1, 2)
                return fn
        else:
            attend = self._gathered(write, table, pos)
        h = self._blocks(m.tok_embeddings(ids), cos, sin, attend)
        for s in seqs:
            s.cached = len(s.tokens)
        return self._logits(h[torch.arange(n, device=dev), counted - 1])

    def _gathered(self, write, table: torch.Tensor, pos: torch.Tensor):
        """Attention over each sequence's blocks gathered into one padded batch, with
        scaled_dot_product_attention (any device, dtype and number of new tokens)."""
        dev = self.k.device
        n = len(table)
        span = table.shape[1] * self.block_size
        # A query at position p sees the keys at positions 0..p: an additive mask, made once for
        # every layer (a boolean one is turned into this by each attention call).
        mask = torch.zeros((n, 1, pos.shape[1], span), dtype=self.k.dtype, device=dev).masked_fill_(
            (torch.arange(span, device=dev)[None, None, :] > pos[:, :, None])[:, None], float("-inf"))
        blocks = table.flatten()
        # One pair of buffers for every layer's gathered keys and values (a layer is done with
        # them before the next starts), gathered block by block (slot by slot: 1.5-2x slower).
        ks, vs = (torch.empty((n * span, *self.k.shape[2:]), dtype=self.k.dtype, device=dev) for _ in range(2))
        rows_of = (len(blocks), -1)

        def attend(i: int):
            def fn(q, k, v):
                keys, values = write(i, k, v)
                # index_select copies whole rows: 5x faster here than indexing with the table.
                torch.index_select(keys.view(-1, ks.numel() // len(blocks)), 0, blocks, out=ks.view(rows_of))
                torch.index_select(values.view(-1, ks.numel() // len(blocks)), 0, blocks, out=vs.view(rows_of))
                kt, vt = (x.view(n, span, *x.shape[1:]).transpose(1, 2) for x in (ks, vs))
                return F.scaled_dot_product_attention(q, kt, vt, attn_mask=mask, enable_gqa=q.shape[1] != kt.shape[1])
            return fn
        return attend

    def stats(self) -> Stats:
        p = self.prefix
        return Stats(len(self.waiting), len(self.running), self.pool.n_free, self.pool.total, self.preemptions,
                     failed_requests=self.failures, cancelled_requests=self.cancellations,
                     prefix_queried_tokens=p.queried if p else 0, prefix_hit_tokens=p.hit if p else 0,
                     shared_prefills=self.shared_prefills)
