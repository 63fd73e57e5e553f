"""A Llama-style decoder-only transformer, written for one device.

No torch.distributed here: strategies parallelize this module from outside.
The module can be built on the meta device and materialized later with
``to_empty`` followed by ``init_weights``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from orchestrator.tokens import IGNORE_INDEX


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_args(fields) -> LlamaArgs:
    """The one way to LlamaArgs: from a mapping or an object carrying its fields (a job's
    ModelConfig, a located checkpoint's or Hugging Face directory's ``arch``); a field it lacks
    keeps its default, fields LlamaArgs has not are ignored."""
    import dataclasses
    from collections.abc import Mapping

    have = fields if isinstance(fields, Mapping) else {f.name: getattr(fields, f.name)
                                                         for f in dataclasses.fields(fields)}
    return LlamaArgs(**{f.name: have[f.name] for f in dataclasses.fields(LlamaArgs) if f.name in have})


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x with shape (B, H, T, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope's tables as ``rotate`` takes them: (cos, cos) and (-sin, sin) on the last axis."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with the tables of ``rotation``, in four operations instead of seven: the same
    numbers (x1 * cos + x2 * -sin is x1 * cos - x2 * sin exactly; a sum does not depend on order)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend=None) -> torch.Tensor:
        """x (B, T, dim). cos and sin: the rope tables (positions 0.. on, 2-d), of which the first
        T rows are used, or rows already broadcastable against (B, heads, T, head_dim / 2) (an
        inference engine's positions per sequence). ``attend(q, k, v)`` -> (B, heads, T, head_dim)
        replaces causal attention over x itself: the hook an inference engine gives to attend
        over its cache (q, k rotated; k and v with the KV heads this module holds)."""
        bsz, seqlen, _ = x.shape
        if cos.dim() == 2:  # sliced here, after sequence parallel gathered the sequence
            cos, sin = cos[:seqlen], sin[:seqlen]
        # -1 rather than the configured head count: under tensor parallel the
        # projections hold a slice of the heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = (attend or causal_attention)(q, k, v)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)
        return self.wo(out)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_up = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_down = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = FeedForward(args)
        # Activation checkpointing: while gradients are recorded, keep only the block's input and
        # recompute the rest in the backward pass. A flag, not a wrapper module, so that the
        # parameters keep their names (checkpoints, tensor-parallel plans, initial values).
        self.checkpointed = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend=None) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, attend, use_reentrant=False)
        return self._forward(x, cos, sin, attend)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attend=attend)  # a keyword: tp hooks see 3 inputs
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps parameter names stable when a
        # pipeline stage deletes the layers it does not own.
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The initial value of parameter ``name`` (full shape, fp32, on the CPU).

        Each parameter draws from its own generator, seeded by (seed, name), so any
        part of the model (a pipeline stage, a tensor-parallel shard) initializes to
        exactly the numbers the whole model would have.
        """
        if len(shape) == 1:  # norm weights
            return torch.ones(shape)
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        std = self.args.init_std
        if name.endswith(("wo.weight", "w_down.weight")):
            std /= math.sqrt(2 * self.args.n_layers)  # GPT-2 style depth scaling of residual projections
        return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fills the rope tables (after ``to_empty``)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialization of plain (unsharded) parameters and the buffers."""
        for name, p in self.named_parameters():
            p.copy_(self.initial_value(name, p.shape, seed))
        self.init_buffers()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab).

        A pipeline stage holds a subset of the layers, and the embedding only on the
        first stage, the final norm and output only on the last (the others are None):
        it then maps its input activations to its output activations.
        """
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        return h if self.output is None else self.output(h)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross entropy over the positions whose target is not ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def num_params(model: nn.Module) -> int:
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
