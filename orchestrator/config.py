"""Typed job configuration.

Every Hydra group maps onto a dataclass registered in Hydra's ConfigStore under
``schema/<group>``; the YAML files in ``conf/`` extend those schemas, so a
misspelt key or a wrong type fails at composition with the key's name.
``validate`` then checks what types cannot express (sizes that must divide,
paths that must exist) before any worker starts.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from orchestrator.errors import ConfigError

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 688
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Start from these weights (and their tokenizer): a run directory or checkpoint of ours,
    # or a local Hugging Face Llama directory. null: a fresh initialization.
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    name: str = MISSING
    # Local files only: .txt (whole file is one document), .jsonl/.json, .parquet.
    paths: list[str] = MISSING
    # format=prepared: the output of launch.prepare (a folder or storage URL), whose tokenized
    # shards and tokenizer are read as they are (data.paths is not used).
    path: Optional[str] = None
    text_field: str = "text"
    # text: documents packed into blocks (pretraining). sft: one example per row, either
    # prompt_field/response_field or messages_field (a list of {role, content}), rendered
    # through the chat template, padded to seq_len + 1, loss on the response tokens only.
    # preference: one pair per row, prompt_field with chosen_field and rejected_field (strings,
    # or lists of messages: the prompt's turns, and the assistant's turns of each answer).
    format: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    seq_len: int = 128
    shuffle: bool = True
    # Tokenizer and tokenized blocks are cached here, keyed by content hash (on the driver, and on
    # each node that downloads a published copy).
    cache_dir: str = "~/.cache/forgeline"
    # Where the prepared data is published for ranks on other nodes (a path every node mounts, or
    # an object-store URL such as s3://bucket/forgeline-data), reused by every job with the same
    # data. null: run.storage's data/ folder where run.storage is set; else the ranks read the
    # driver's cache directly (one machine).
    storage: Optional[str] = None
    # Fraction of blocks held out for evaluation (0 disables evaluation).
    val_fraction: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    # Save every N steps (0: only at the end). The last step is always saved.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Write checkpoints in the background: training waits only for a copy of this rank's shards.
    checkpoint_async: bool = True
    # Evaluate on the held-out split every N steps (0: never).
    eval_every: int = 0
    # Stop cleanly after this step (saving a checkpoint) although max_steps is
    # larger, as Megatron's exit interval; resume later with run.resume=true.
    exit_at_step: int = 0
    max_restarts: int = 0
    # A step that does not finish within this many seconds (a rank stuck in a collective)
    # is handled as a failure. 0 disables the check.
    step_timeout_s: float = 600.0
    # A checkpoint save (rank 0 says when one starts) may take this long before it counts as a hang;
    # the step timeout does not run during a save.
    save_timeout_s: float = 3600.0
    # Text sample at the end of the job (0 tokens: none).
    sample_tokens: int = 64
    sample_prompt: str = "ROMEO:"
    # Recompute activations in the backward pass instead of keeping them: none, full (every
    # transformer block), or selective (every k-th block, k = activation_checkpointing_every,
    # counting from block 0). Applied after tensor parallel and before compilation and
    # data-parallel wrapping, by every strategy.
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
    # torch.compile of each transformer block (after activation checkpointing, before
    # data-parallel wrapping). Refused with tensor parallel (tp > 1): torch 2.13's compiled
    # blocks fail in the backward of DTensor's redistribution there.
    compile: bool = False


@dataclass
class ClusterConfig:
    # None: start an embedded local Ray cluster. Otherwise a Ray address.
    address: Optional[str] = None
    num_workers: int = 2
    cpus_per_worker: int = 1
    # auto: CUDA when the cluster has a GPU for every worker, else CPU.
    device: str = "auto"  # auto | cpu | cuda
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # Embedded cluster only: logical CPUs to advertise (0: max(cores, workers * cpus_per_worker)).
    num_cpus: int = 0
    include_dashboard: bool = False
    start_timeout_s: float = 120.0  # reserving the ranks' resources, and the rendezvous
    # Each rank's setup (process group, data, model, restored checkpoint), waited for by the driver.
    setup_timeout_s: float = 600.0
    # torch.distributed's timeout for one collective (gloo/NCCL): a rank that waits longer fails.
    collective_timeout_s: float = 1800.0
    # CPU ranks only: pin each rank's process to cpus_per_worker cores of its own on its node, so
    # that two ranks never share a core while another sits idle. null (auto): on an embedded
    # cluster, whose machine the job owns; true: on any cluster; false: never. Skipped on a node
    # whose cores do not go round.
    bind_cores: Optional[bool] = None


@dataclass
class WandbConfig:
    # offline: a local run directory that `wandb sync` can upload later.
    mode: str = "offline"  # offline | online | disabled
    project: str = "forgeline"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    # The driver's run directory: job.json, tokenizer, metrics, status, summary, report.
    dir: str = MISSING
    name: str = "job"
    resume: bool = False
    # Where checkpoints go, and what a rank on another node must read: a local or NFS path, or an
    # object store (s3://bucket/prefix; endpoint and credentials from AWS_* variables, fsspec's
    # configuration or storage_options). null: the run directory (one machine, or a shared disk).
    storage: Optional[str] = None
    # fsspec options for run.storage and data.storage (e.g. endpoint_url for s3://).
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    """Base of every strategy's options; each strategy file subclasses it."""

    name: str = MISSING


# The model's linear layers that LoRA can adapt (suffixes of module names).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "output")
# Strategies whose engines train a LoRA-adapted model (frozen base, trainable adapters).


@dataclass
class LoraConfig:
    # 0: no LoRA (every weight trains). > 0: the adapters' rank; only they train and are saved.
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass
class FinetuneConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PublishConfig:
    """Weight sync to a running inference pool (launch.serve inference.name=POOL on the same Ray
    cluster): every sync_every steps rank 0 sends the current weights through Ray, no checkpoint."""

    sync_every: int = 0  # 0: never
    pool: str = "default"


@dataclass
class RolloutConfig:
    """GRPO's rollout pool: inference replicas on the job's Ray cluster (orchestrator.inference)."""

    replicas: int = 1
    # false: each replica takes cpus_per_replica CPUs of its own (the cluster must have them
    # besides the ranks'); true: replicas take no CPUs of their own and share the ranks' cores
    # (generation and training alternate within a step, so they do not compete).
    colocate: bool = False
    cpus_per_replica: int = 1
    max_tokens: int = 32  # new tokens per sample at most
    block_size: int = 16
    kv_cache_tokens: int = 16384
    max_batch: int = 64  # sequences one replica decodes together
    start_timeout_s: float = 300.0
    # Write each step's samples (tokens, log-probabilities, per rank) under the run's storage, in
    # rollouts/; replay=LOCATION (a run directory or storage URL holding rollouts/) trains on such a
    # recording instead of a pool: the same samples in any layout.
    record: bool = False
    replay: Optional[str] = None


@dataclass
class AlignmentConfig:
    # none: the data's own loss (pretraining, SFT). dpo: preference pairs (data.format=preference)
    # against a frozen reference. grpo: online, on samples the rollout pool generates (data.format=sft).
    method: str = "none"  # none | dpo | grpo
    beta: float = 0.1  # DPO: the strength of the implicit KL constraint
    label_smoothing: float = 0.0  # DPO: the assumed fraction of flipped preference labels (cDPO)
    # DPO: weight of the chosen answers' negative log-likelihood (per token) added to the loss
    # (RPO, Pang et al. 2024); 0: plain DPO.
    sft_weight: float = 0.0
    # GRPO: trainer.global_batch_size counts samples, group_size of them per prompt.
    group_size: int = 8
    temperature: float = 1.0
    # module:function, or a built-in: exact_match, format. Called as fn(prompts, completions,
    # references) -> one number per completion.
    reward: str = "exact_match"
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0: a KL penalty to the reference (model.init_from), per token
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    inference: PublishConfig = field(default_factory=PublishConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    seed: int = 0
    # auto: bf16 on CUDA, fp32 on CPU.
    precision: str = "auto"  # auto | fp32 | bf16


CHOICES = {
    "precision": ("auto", "fp32", "bf16"),
    "cluster.device": ("auto", "cpu", "cuda"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "logging.wandb.mode": ("offline", "online", "disabled"),
    "optim.schedule": ("cosine", "constant"),
    "optim.name": ("adamw",),
    "data.format": ("text", "sft", "preference", "prepared"),
    "alignment.method": ("none", "dpo", "grpo"),
    "trainer.activation_checkpointing": ("none", "full", "selective"),
}


def register_schemas() -> None:
    """Registers the schemas with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    import strategies

    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", lambda name: str(SAMPLES_DIR / name))
    cs = ConfigStore.instance()
    # The root schema types every group; strategies differ in their options, so
    # each strategy's YAML extends its own schema from schema/strategy/<name>.
    cs.store(name="job_schema", node=JobConfig)
    for name, config_cls in strategies.config_classes().items():
        cs.store(group="schema/strategy", name=name, node=config_cls)


def to_job_config(cfg: Any) -> JobConfig:
    """A composed DictConfig (or plain dict) -> typed JobConfig, validated."""
    import strategies

    if not isinstance(cfg, dict):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    strategy = dict(cfg.get("strategy") or {})
    name = strategy.get("name")
    classes = strategies.config_classes()
    if name not in classes:
        raise ConfigError("strategy", f"unknown strategy {name!r}; allowed: {', '.join(sorted(classes))}")
    base = OmegaConf.structured(JobConfig)
    base.strategy = OmegaConf.structured(classes[name])
    job: JobConfig = typed(base, cfg)
    if job.model.init_from and "://" not in job.model.init_from:  # absolute: job.json names it from anywhere
        job.model.init_from = os.path.abspath(os.path.expanduser(job.model.init_from))
    validate(job)
    return job


def typed(base: Any, cfg: Any) -> Any:
    """``cfg`` merged onto the structured config ``base``, as its dataclass. omegaconf's errors (a
    misspelt key, a wrong type, a key left ??? such as data.paths of data=sft) become one
    ConfigError naming the full key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, cfg))
    except Exception as exc:  # omegaconf's errors name the full key
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(str(key), str(exc).splitlines()[0]) from None


def _check_choice(key: str, value: str) -> None:
    allowed = CHOICES[key]
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; choose one of {', '.join(allowed)}")


def validate(job: JobConfig) -> None:
    """Checks what types cannot. Raises ConfigError naming the key."""
    import strategies

    for key in CHOICES:
        obj: Any = job
        for part in key.split("."):
            obj = getattr(obj, part)
        _check_choice(key, obj)

    check_finite(job)
    c = job.cluster
    for key in ("start_timeout_s", "setup_timeout_s", "collective_timeout_s"):
        positive(f"cluster.{key}", getattr(c, key), "seconds")
    positive("trainer.save_timeout_s", job.trainer.save_timeout_s, "seconds")
    check_name("run.name", job.run.name)
    if not job.data.cache_dir.strip():
        raise ConfigError("data.cache_dir", "must name a folder")
    if Path(os.path.expanduser(job.data.cache_dir)).is_file():
        raise ConfigError("data.cache_dir", f"{job.data.cache_dir} is a file; name a folder")
    if c.num_workers < 1:
        raise ConfigError("cluster.num_workers", f"must be >= 1, got {c.num_workers}")
    if c.cpus_per_worker < 1:
        raise ConfigError("cluster.cpus_per_worker", f"must be >= 1, got {c.cpus_per_worker}")

    m = job.model
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    for key in ("init_std", "rope_theta", "norm_eps"):
        positive(f"model.{key}", getattr(m, key))
    if m.vocab_size < 258:
        raise ConfigError("model.vocab_size", f"a byte-level tokenizer needs at least 258 entries, got {m.vocab_size}")
    if m.dim % m.n_heads:
        raise ConfigError("model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError("model.dim", "the head size dim/n_heads must be even for rotary embeddings")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError("model.n_kv_heads", f"model.n_heads={m.n_heads} is not divisible by {m.n_kv_heads}")
    if m.init_from:
        from orchestrator import pretrained

        pretrained.check(pretrained.locate(m.init_from), m)

    for key, location in (("run.storage", job.run.storage), ("data.storage", job.data.storage)):
        if location:
            check_location(key, location)

    d = job.data
    if d.format == "prepared":
        from orchestrator.data import check_prepared

        check_prepared(d, job.run.storage_options, m)
    elif not d.paths:
        raise ConfigError("data.paths", "at least one file is needed")
    for p in d.paths if d.format != "prepared" else []:
        if not Path(os.path.expanduser(p)).is_file():
            raise ConfigError("data.paths", f"no such file: {p}")
    if d.seq_len < 2 or d.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", f"must be in [2, model.max_seq_len={m.max_seq_len}], got {d.seq_len}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")

    t = job.trainer
    for key in ("max_steps", "global_batch_size", "micro_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key}", f"must be >= 1, got {getattr(t, key)}")
    if job.inference.sync_every < 0:
        raise ConfigError("inference.sync_every", f"must be >= 0 (0: never), got {job.inference.sync_every}")
    for key in ("checkpoint_every", "eval_every", "exit_at_step", "max_restarts", "sample_tokens"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.step_timeout_s < 0:
        raise ConfigError("trainer.step_timeout_s", f"must be >= 0, got {t.step_timeout_s}")
    if t.keep_checkpoints < 1:
        raise ConfigError("trainer.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    if t.activation_checkpointing_every < 1:
        raise ConfigError("trainer.activation_checkpointing_every",
                          f"must be >= 1 (selective checkpointing of every k-th block), got {t.activation_checkpointing_every}")

    o = job.optim
    positive("optim.lr", o.lr)
    positive("optim.eps", o.eps)
    for key in ("weight_decay", "grad_clip"):
        value = getattr(o, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"optim.{key}", f"must be a finite number >= 0{' (0: no clipping)' if key == 'grad_clip' else ''}, "
                                              f"got {value}")
    if o.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError("optim.betas", f"two numbers in [0, 1) are needed, got {list(o.betas)}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")

    validate_lora(job)
    from orchestrator.plan import plan_of

    plan = plan_of(job)
    plan.check_model(m)
    strategies.check(job, plan)
    per_step = t.micro_batch_size * plan.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            "trainer.global_batch_size",
            f"{t.global_batch_size} is not divisible by trainer.micro_batch_size * data-parallel size "
            f"= {t.micro_batch_size} * {plan.dp} = {per_step}",
        )
    from orchestrator.alignment.checks import validate_alignment

    validate_alignment(job, plan.dp)


def check_finite(obj: Any, prefix: str = "") -> None:
    """No number in the config is NaN or infinite, used or not (a NaN passes every comparison)."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(key, f"must hold finite numbers, got {value}")


def positive(key: str, value: float, unit: str = "") -> None:
    """A finite number > 0 (NaN and infinity are refused too)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(key, f"must be a finite number > 0{' of ' + unit if unit else ''}, got {value}")


NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(key: str, value: str) -> None:
    """A name that becomes part of paths, Ray actor names and dashboards."""
    if not isinstance(value, str) or not NAME_CHARS.fullmatch(value):
        raise ConfigError(key, f"{value!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")


def check_location(key: str, location: str) -> None:
    """A storage location fsspec can open: a path, or a URL whose protocol has a filesystem here."""
    if "://" not in location or location.startswith("file://"):
        return
    protocol = location.split("://", 1)[0]
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(key, f"{location!r}: no filesystem for the protocol {protocol!r}; use a path or a URL "
                               f"such as s3://bucket/prefix") from None
    except ImportError as exc:
        raise ConfigError(key, f"{location!r}: the {protocol!r} filesystem needs a package that is not "
                               f"installed ({exc})") from None
    if not location.split("://", 1)[1].strip("/"):
        raise ConfigError(key, f"{location!r} names no bucket or folder")


def validate_lora(job: JobConfig) -> None:
    lora = job.finetune.lora
    if lora.rank < 0:
        raise ConfigError("finetune.lora.rank", f"must be >= 0 (0 disables LoRA), got {lora.rank}")
    if lora.rank == 0:
        return
    import strategies

    if not strategies.capable(job.strategy.name, "LORA"):
        raise ConfigError("finetune.lora", f"LoRA runs with strategy {', '.join(strategies.able('LORA'))}; "
                                           f"not with {job.strategy.name!r}")
    if not job.model.init_from:
        raise ConfigError("finetune.lora", "LoRA adapts pretrained weights: set model.init_from to a run, "
                                           "checkpoint or Hugging Face directory")
    if lora.alpha <= 0:
        raise ConfigError("finetune.lora.alpha", f"must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError("finetune.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ConfigError("finetune.lora.target_modules", f"name at least one of {', '.join(LORA_TARGETS)}")
    for name in lora.target_modules:
        if name not in LORA_TARGETS:
            raise ConfigError("finetune.lora.target_modules",
                              f"{name!r} names no module of the model; its linear layers are {', '.join(LORA_TARGETS)}")
    if "output" in lora.target_modules and job.model.tie_embeddings:
        raise ConfigError("finetune.lora.target_modules", "'output' shares its weight with the embedding "
                                                          "(model.tie_embeddings=true) and cannot be adapted")


def compose(overrides: list[str] | None = None) -> JobConfig:
    """The typed job for these Hydra overrides, composed from conf/ without a command line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    overrides = list(overrides or [])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra's composition errors: a misspelt key, an unknown group option
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(exc, (HydraException, OmegaConfBaseException)):
            raise
        message = " ".join(str(exc).split()).split(" Config search path")[0]
        raise ConfigError(_override_key(str(exc), overrides), message[:300]) from None
    return to_job_config(cfg)


def _override_key(message: str, overrides: list[str]) -> str:
    """The key of the override a Hydra error is about (the first one its message names)."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key and (key in message or key.replace(".", "/") in message):
            return key
    return "config"
