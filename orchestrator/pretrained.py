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
from dataclasses import dataclass
from pathlib import Path

from orchestrator import checkpoint
from orchestrator.errors import ConfigError

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
    weight_files: tuple[str, ...]
    tokenizer_path: str
    arch: dict  # our ModelConfig fields
    # A LoRA run's checkpoint holds adapters only: its base weights and finetune.lora options.
    base: str | None = None
    lora: dict | None = None


@functools.lru_cache(maxsize=8)
def locate(path: str) -> Pretrained:
    """What ``path`` holds. Cached per process: the driver asks while validating and again for
    the tokenizer, and choosing a run's checkpoint hashes its files."""
    root = Path(os.path.expanduser(path))
    if (root / "job.json").is_file():  # a run directory: its newest verified checkpoint
        ckpt = checkpoint.latest(root)
        if ckpt is None:
            raise ConfigError(KEY, f"{path} is a run directory without a verified checkpoint")
        return _ours(path, root, ckpt)
    if (root / "trainer.json").is_file() and (root / "model.safetensors").is_file():  # one checkpoint
        problems = checkpoint.verify(root)
        if problems:
            raise ConfigError(KEY, f"{path}: {'; '.join(problems)}")
        return _ours(path, root.parent.parent, root)
    if (root / "config.json").is_file():
        return _huggingface(path, root)
    raise ConfigError(KEY, f"{path} is not a run directory, a checkpoint directory or a Hugging Face model "
                           "directory (config.json with safetensors weights)")


def _ours(path: str, run_dir: Path, ckpt: Path) -> Pretrained:
    tokenizer = run_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConfigError(KEY, f"{path}: the run's tokenizer.json is missing")
    job = json.loads((run_dir / "job.json").read_text())
    lora = job.get("finetune", {}).get("lora", {})
    if lora.get("rank"):
        return Pretrained(path, "checkpoint", (str(ckpt / "model.safetensors"),), str(tokenizer), job["model"],
                          base=job["model"]["init_from"], lora=lora)
    return Pretrained(path, "checkpoint", (str(ckpt / "model.safetensors"),), str(tokenizer), job["model"])


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
    head_dim = cfg.get("head_dim")
    if head_dim and head_dim * arch["n_heads"] != arch["dim"]:
        raise ConfigError(KEY, f"{path}: head_dim {head_dim} * heads {arch['n_heads']} != hidden size {arch['dim']}")
    return Pretrained(path, "huggingface", tuple(files), str(root / "tokenizer.json"), arch)


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
    """Full tensors under our parameter names."""
    from safetensors.torch import load_file

    from orchestrator.export import hf_name

    weights: dict = {}
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
