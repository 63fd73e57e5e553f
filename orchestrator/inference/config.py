"""Typed configuration of ``launch.serve`` (Hydra schema ``serve_schema``, conf/serve.yaml)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, OmegaConf

from orchestrator.errors import ConfigError


@dataclass
class InferenceConfig:
    # Training jobs publish weights to this pool (their inference.pool); replicas are the Ray
    # actors "<name>/replica-<i>" in namespace "forgeline".
    name: str = "default"
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer token for every endpoint but /health; required when host is not a loopback address.
    token: Optional[str] = None
    max_batch: int = 32  # sequences decoded together by one replica
    block_size: int = 16  # token slots per KV-cache block
    kv_cache_tokens: int = 16384  # token slots in a replica's cache (all layers)
    # Instead of kv_cache_tokens: the cache's size in bytes per replica rank, or a fraction of the
    # memory free when the replica starts (the GPU's, or the machine's). At most one of the two.
    kv_cache_bytes: Optional[int] = None
    kv_cache_memory_fraction: Optional[float] = None
    max_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    max_sequences_per_request: int = 64  # prompts x n in one request
    queue_limit: int = 256  # requests in flight over the pool; beyond it the server answers 429
    cpus_per_replica: int = 1
    request_timeout_s: float = 300.0  # every request, streams included
    health_interval_s: float = 2.0  # how often the pool checks that idle replicas are alive
    quantize: str = "none"  # none | int8 (weight-only)
    # On the CPU (fp32, oneDNN): also keep the linear layers' weights in oneDNN's packed layout, a
    # second copy made again after each weight sync (its matmuls are 20-30% faster at 8-40 rows).
    pack_weights: bool = True
    # On the CPU (fp32): decode attention by the engine's C kernel, straight from the paged cache
    # (built at first use with the machine's C compiler; without one, as with false: the blocks
    # gathered and scaled_dot_product_attention).
    native_attention: bool = True
    # Tensor-parallel ranks per replica (each a Ray actor with cpus_per_replica CPUs, or a GPU):
    # heads and the MLP split Megatron-style; must divide the model's heads, KV heads and ffn_dim.
    tp: int = 1
    # The model id clients name (GET /v1/models); null: the checkpoint as given.
    model_name: Optional[str] = None


@dataclass
class ServeConfig:
    # A run directory, one of its checkpoints, or a local Hugging Face Llama directory.
    checkpoint: str = MISSING
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    # null: an embedded local Ray cluster; else the address of a running one.
    address: Optional[str] = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: ServeConfig) -> None:
    from orchestrator import pretrained

    from orchestrator.config import check_name

    i = cfg.inference
    check_name("inference.name", i.name)
    for key in ("replicas", "max_batch", "block_size", "kv_cache_tokens", "max_tokens_limit", "queue_limit",
                "cpus_per_replica", "max_sequences_per_request") + (("kv_cache_bytes",) if i.kv_cache_bytes is not None
                                                                     else ()):
        if getattr(i, key) < 1:
            raise ConfigError(f"inference.{key}", f"must be >= 1, got {getattr(i, key)}")
    for key in ("request_timeout_s", "health_interval_s"):
        if not 0 < getattr(i, key) < float("inf"):
            raise ConfigError(f"inference.{key}", f"must be a positive number of seconds, got {getattr(i, key)}")
    if not 0 <= i.port < 65536:
        raise ConfigError("inference.port", f"must be in [0, 65535], got {i.port}")
    if i.quantize not in ("none", "int8"):
        raise ConfigError("inference.quantize", f"{i.quantize!r} is not allowed; choose one of none, int8")
    if i.tp < 1:
        raise ConfigError("inference.tp", f"must be >= 1, got {i.tp}")
    if i.tp > 1 and i.quantize != "none":
        raise ConfigError("inference.tp", f"tensor-parallel replicas run unquantized; set inference.quantize=none "
                                          f"or inference.tp=1 (got quantize={i.quantize})")
    if not is_loopback(i.host) and not i.token:
        raise ConfigError("inference.token", f"binding to {i.host} (not loopback) needs a bearer token: set "
                                             "inference.token or FORGELINE_SERVE_TOKEN")
    pre = pretrained.locate(cfg.checkpoint)
    from orchestrator.inference.types import kv_bytes_per_token
    from orchestrator.models import llama_args

    shape = llama_args(pre.arch)
    if i.tp > 1:
        bad = {k: getattr(shape, k) for k in ("n_heads", "n_kv_heads", "ffn_dim") if getattr(shape, k) % i.tp}
        if bad:
            raise ConfigError("inference.tp", f"must divide the model's {', '.join(f'{k}={v}' for k, v in bad.items())}"
                                              f"; got {i.tp}")
    max_seq_len = shape.max_seq_len
    if i.kv_cache_bytes is not None and i.kv_cache_memory_fraction is not None:
        raise ConfigError("inference.kv_cache_bytes", "set inference.kv_cache_bytes or "
                                                      "inference.kv_cache_memory_fraction, not both")
    if i.kv_cache_memory_fraction is not None and not 0 < i.kv_cache_memory_fraction <= 0.95:
        raise ConfigError("inference.kv_cache_memory_fraction", f"must be in (0, 0.95], got "
                                                                f"{i.kv_cache_memory_fraction}")
    # fp32 weights, as replicas load them; this machine's free memory stands for a replica's.
    per_token = kv_bytes_per_token(shape.n_layers, shape.n_kv_heads, shape.head_dim, 4, i.tp)
    key, value = "inference.kv_cache_tokens", i.kv_cache_tokens
    if i.kv_cache_bytes is not None:
        key, value = "inference.kv_cache_bytes", i.kv_cache_bytes
    elif i.kv_cache_memory_fraction is not None:
        import psutil

        key, value = "inference.kv_cache_memory_fraction", i.kv_cache_memory_fraction
    blocks = engine_options(cfg).num_blocks(
        per_token, psutil.virtual_memory().available if i.kv_cache_memory_fraction is not None else None)
    if blocks * i.block_size < max_seq_len:
        raise ConfigError(key, f"{key}={value} in blocks of inference.block_size={i.block_size} ({blocks} whole "
                               f"blocks, {blocks * i.block_size} tokens at {per_token} bytes each) cannot hold one "
                               f"sequence of the model's context (max_seq_len={max_seq_len}); raise {key} or lower "
                               "inference.block_size")


def engine_options(cfg: ServeConfig):
    """A replica's EngineOptions from the serve config."""
    from orchestrator.inference.types import EngineOptions

    i = cfg.inference
    return EngineOptions(block_size=i.block_size, kv_cache_tokens=i.kv_cache_tokens, kv_cache_bytes=i.kv_cache_bytes,
                         kv_cache_memory_fraction=i.kv_cache_memory_fraction, max_batch=i.max_batch,
                         quantize=i.quantize, tp=i.tp, threads=i.cpus_per_replica, pack_weights=i.pack_weights,
                         native_attention=i.native_attention)


def compose(overrides: list[str] | None = None) -> ServeConfig:
    """The typed serve config for these overrides (``checkpoint=... inference.replicas=N``)."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "arguments are KEY=VALUE overrides" + (
                f"; did you mean checkpoint={item}?" if not item.startswith("-") else f"; {item} is not an option"))
    base = OmegaConf.structured(ServeConfig)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    except Exception as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from None
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint", "name a run directory, checkpoint or Hugging Face directory: checkpoint=PATH")
    serve: ServeConfig = OmegaConf.to_object(cfg)
    if serve.inference.token is None and os.environ.get("FORGELINE_SERVE_TOKEN"):
        serve.inference.token = os.environ["FORGELINE_SERVE_TOKEN"]
    validate(serve)
    return serve
