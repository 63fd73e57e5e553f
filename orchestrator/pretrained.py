"""Starting weights for a job (``model.init_from``): one of our runs or checkpoints, or a local
Hugging Face directory of a Llama-architecture causal LM (safetensors weights, config.json,
tokenizer.json). Nothing is downloaded.

``locate`` and ``check`` run on the driver before any worker starts (JSON and the tokenizer
file only); ``load_weights`` runs in each rank and returns full tensors under our names.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator import checkpoint
from orchestrator.errors import ConfigError
from orchestrator.storage import CHECKPOINTS, JOB_FILE, REDACTED, TOKENIZER_FILE, Storage

KEY = "model.init_from"
# Our ModelConfig field -> Hugging Face LlamaConfig field.
HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
             "ffn_dim": "intermediate_size", "tie_embeddings": "tie_word_embeddings",
             "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps"}
EXACT = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


@dataclass(frozen=True)
class Pretrained:
    path: str
    kind: str  # "checkpoint" (ours) | "huggingface"
    tokenizer_path: str  # a local file (a run on an object store has its tokenizer copied here)
    arch: dict  # our ModelConfig fields (a run's whole model config)
    weight_files: tuple[str, ...] = ()  # huggingface: safetensors files
    checkpoint: Storage | None = None  # ours: the checkpoint folder
    run: Storage | None = None  # ours: the run's directory or storage root
    # A LoRA run's checkpoint holds adapters only: its base weights and finetune.lora options.
    base: str | None = None
    lora: dict | None = None


@functools.lru_cache(maxsize=8)
def locate(path: str) -> Pretrained:
    """What ``path`` (a local path, or a URL of a run's storage or checkpoint) holds. Cached per
    process: the driver asks while validating and again for the tokenizer, and choosing a run's
    checkpoint hashes its files."""
    where = Storage.at(path)
    try:
        if where.exists(JOB_FILE):  # a run directory or a run's storage: its newest verified checkpoint
            job = json.loads(where.read_text(JOB_FILE))
            ckpt = checkpoint.latest(run_checkpoints(where, job))
            if ckpt is None:
                raise ConfigError(KEY, f"{path} is a run without a verified checkpoint")
            return _ours(path, where, job, ckpt)
        if where.exists(checkpoint.MANIFEST):  # one checkpoint: <run>/checkpoints/step_N
            problems = checkpoint.verify(where)
            if problems:
                raise ConfigError(KEY, f"{path}: {'; '.join(problems)}")
            run = checkpoint.storage_of(where)
            if not run.exists(JOB_FILE):
                raise ConfigError(KEY, f"{path}: the run's {JOB_FILE} is not at {run.url(JOB_FILE)}")
            return _ours(path, run, json.loads(run.read_text(JOB_FILE)), where)
    except OSError as exc:
        raise ConfigError(KEY, f"{path} cannot be read: {type(exc).__name__}: {exc}") from None
    root = Path(os.path.expanduser(path))
    if where.is_local and (root / "config.json").is_file():
        return _huggingface(path, root)
    raise ConfigError(KEY, f"{path} is not a run directory, a checkpoint directory or a Hugging Face model "
                           "directory (config.json with safetensors weights)")


def run_checkpoints(run: Storage, job: dict) -> Storage:
    """A run's checkpoints: in its run.storage where it had one, else below the run itself."""
    run_cfg = job.get("run", {})
    if not run_cfg.get("storage"):
        return run.child(CHECKPOINTS)
    options = {k: v for k, v in (run_cfg.get("storage_options") or {}).items() if v != REDACTED}
    return Storage.at(run_cfg["storage"], options).child(CHECKPOINTS)


def _ours(path: str, run: Storage, job: dict, ckpt: Storage) -> Pretrained:
    if not run.exists(TOKENIZER_FILE):
        raise ConfigError(KEY, f"{path}: the run's {TOKENIZER_FILE} is missing")
    if run.is_local:
        tokenizer = run.url(TOKENIZER_FILE)
    else:  # a local copy: tokenizers reads files
        folder = Path(tempfile.mkdtemp(prefix="forgeline-tokenizer-"))
        run.download(folder / TOKENIZER_FILE, TOKENIZER_FILE)
        tokenizer = str(folder / TOKENIZER_FILE)
    lora = job.get("finetune", {}).get("lora", {})
    if lora.get("rank"):
        return Pretrained(path, "checkpoint", tokenizer, job["model"], checkpoint=ckpt, run=run,
                          base=job["model"]["init_from"], lora=lora)
    return Pretrained(path, "checkpoint", tokenizer, job["model"], checkpoint=ckpt, run=run)


def _huggingface(path: str, root: Path) -> Pretrained:
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ConfigError(KEY, f"{path} holds a {cfg.get('model_type')!r} model; only Llama-architecture "
                               "causal LMs (model_type 'llama') can be loaded")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({str(root / f) for f in json.loads(index.read_text())["weight_map"].values()})
    elif (root / "model.safetensors").is_file():
        files = [str(root / "model.safetensors")]
    else:
        raise ConfigError(KEY, f"{path} has no safetensors weights (model.safetensors or its index); "
                               "pickled .bin weights are not loaded")
    if not (root / "tokenizer.json").is_file():
        raise ConfigError(KEY, f"{path} has no tokenizer.json")
    arch = {ours: cfg[hf] for ours, hf in HF_FIELDS.items() if hf in cfg}
    arch.setdefault("n_kv_heads", arch.get("n_heads"))
    arch.setdefault("tie_embeddings", False)
    # The context the weights were trained for; not checked against model.max_seq_len (a job may
    # train on shorter sequences), and what serving the directory allows.
    arch["max_seq_len"] = cfg.get("max_position_embeddings", 2048)
    head_dim = cfg.get("head_dim")
    if head_dim and head_dim * arch["n_heads"] != arch["dim"]:
        raise ConfigError(KEY, f"{path}: head_dim {head_dim} * heads {arch['n_heads']} != hidden size {arch['dim']}")
    return Pretrained(path, "huggingface", str(root / "tokenizer.json"), arch, weight_files=tuple(files))


def check(pre: Pretrained, model) -> None:
    """The model config must describe the weights; the tokenizer must fit the embedding."""
    from tokenizers import Tokenizer

    for key in HF_FIELDS:
        if key not in pre.arch:
            continue
        have, want = pre.arch[key], getattr(model, key)
        same = math.isclose(have, want, rel_tol=1e-9) if key in ("rope_theta", "norm_eps") else have == want
        if not same:
            raise ConfigError(KEY, f"{pre.path} has {key}={have} but model.{key}={want}; set model.{key}={have} "
                                   "or choose a model preset that matches")
    n_tokens = Tokenizer.from_file(pre.tokenizer_path).get_vocab_size()
    if n_tokens > model.vocab_size:
        raise ConfigError(KEY, f"{pre.tokenizer_path} has {n_tokens} tokens, more than the embedding's "
                               f"model.vocab_size={model.vocab_size}")


def load_weights(pre: Pretrained) -> dict:
    """Full tensors under our parameter names (a checkpoint's weights only, not its optimizer)."""
    from safetensors.torch import load_file

    from orchestrator.export import hf_name

    weights: dict = {}
    if pre.checkpoint is not None:
        from orchestrator import dcp

        weights = dcp.read_full(pre.checkpoint.root, dict(pre.checkpoint.options), "model.")
    for f in pre.weight_files:
        weights.update(load_file(f))
    if pre.lora:  # adapters: fold them into their base
        from orchestrator import lora

        return lora.merge(load_weights(locate(pre.base)), weights, pre.lora["rank"], pre.lora["alpha"])
    if pre.kind == "huggingface":
        ours = {hf_name(n): n for n in parameter_names(pre.arch)}
        unknown = sorted(set(weights) - set(ours))
        if unknown:
            raise ConfigError(KEY, f"{pre.path} has tensors a Llama model does not: {', '.join(unknown[:5])}")
        weights = {ours[k]: v for k, v in weights.items()}
    if "output.weight" not in weights and pre.arch.get("tie_embeddings"):
        weights["output.weight"] = weights["tok_embeddings.weight"]
    missing = sorted(set(parameter_names(pre.arch)) - set(weights))
    if missing:
        raise ConfigError(KEY, f"{pre.path} lacks {', '.join(missing[:5])}")
    return weights


def parameter_names(arch: dict) -> list[str]:
    from orchestrator.export import HF_LAYER_NAMES

    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    names += [f"layers.{i}.{module}.weight" for i in range(arch["n_layers"]) for module in HF_LAYER_NAMES]
    return names
