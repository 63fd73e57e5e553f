"""The typed values that cross Ray between the HTTP front, the pool and the replicas: engine
options, one generation request, and what a step produced for it."""
from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 5  # the most alternatives per position a request may ask for (OpenAI's limit)
MAX_SEED = 2**63 - 1


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, element_size: int, tp: int = 1) -> int:
    """Cache bytes one token takes on one rank: keys and values of its KV heads in every layer."""
    return 2 * n_layers * (n_kv_heads // tp) * head_dim * element_size


@dataclass(frozen=True)
class EngineOptions:
    block_size: int = 16  # token slots per KV-cache block
    kv_cache_tokens: int = 16384  # token slots in the cache (all layers)
    kv_cache_bytes: int | None = None  # instead: the cache's size in bytes (keys and values, all layers)
    kv_cache_memory_fraction: float | None = None  # instead: this fraction of the memory free at start
    max_batch: int = 32  # sequences decoded together
    quantize: str = "none"  # none | int8
    tp: int = 1  # tensor-parallel ranks
    threads: int = 1  # torch threads per rank
    pack_weights: bool = True  # on the CPU, a packed copy of the linear weights (see GenerationEngine)
    native_attention: bool = True  # on the CPU, decode attention by the C kernel (see kernels.py)
    tp_timeout_s: float = 120.0

    def num_blocks(self, bytes_per_token: int, free_bytes: int | None = None) -> int:
        """Blocks of the cache: from kv_cache_bytes, or the fraction of ``free_bytes``, or
        kv_cache_tokens."""
        if self.kv_cache_bytes is not None:
            tokens = self.kv_cache_bytes // bytes_per_token
        elif self.kv_cache_memory_fraction is not None:
            tokens = int(self.kv_cache_memory_fraction * free_bytes) // bytes_per_token
        else:
            tokens = self.kv_cache_tokens
        return tokens // self.block_size


@dataclass(frozen=True)
class Request:
    """One sequence to generate. ``logprobs``: None, or k in [0, 5]: each new token's
    log-probability and the k most likely tokens at its position; with ``echo`` the prompt's
    positions too (the first has none). ``max_tokens`` may be 0 only with ``echo``."""

    id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


@dataclass
class Event:
    """What one step produced for one request: new text and tokens, and the end where it ended.
    ``error`` names why a request failed (``finish_reason`` "error"); it fails alone."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo, in the request's first event
    error: str | None = None
    # With logprobs: the log-probability of the end-of-sequence token that ended the request
    # (token_ids leave that token out); what a trainer scoring the whole completion needs.
    end_logprob: float | None = None

    def merge(self, later: "Event") -> "Event":
        """This event followed by a later one of the same request, as one."""
        return Event(self.id, self.text + later.text, self.token_ids + later.token_ids, later.finish_reason,
                     later.prompt_tokens, later.completion_tokens,
                     None if self.logprobs is None and later.logprobs is None
                     else (self.logprobs or []) + (later.logprobs or []),
                     self.prompt_logprobs or later.prompt_logprobs, later.error or self.error,
                     later.end_logprob if later.end_logprob is not None else self.end_logprob)


@dataclass(frozen=True)
class ReplicaInfo:
    pid: int
    device: str
    weights_version: int  # 0: the checkpoint's weights; else the weight store's version
    kv_cache_tokens: int = 0
    kv_cache_bytes: int = 0
    attention: str = ""  # how decode steps attend: "native kernel", or why "gather + SDPA"


@dataclass
class Stats:
    waiting: int
    running: int
    free_blocks: int
    total_blocks: int
    preemptions: int
    steps: int = 0
    failed_requests: int = 0
    cancelled_requests: int = 0
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found there
    shared_prefills: int = 0  # samples that took their group's prefill
    weights_version: int = 0
    engine_faults: int = 0  # steps that raised outside any one request (the engine was reset)
