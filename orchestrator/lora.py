"""LoRA finetuning through Hugging Face PEFT: adapters on the model's linear layers, the base frozen.

``apply`` injects the adapters into a materialized model (PEFT's ``inject_adapter_in_model``,
which works on any torch module and leaves only the adapters trainable). A target's weight then
lives at ``<module>.base_layer.weight`` and its adapters at ``<module>.lora_A.default.weight``
and ``<module>.lora_B.default.weight``.

Checkpoints of a LoRA job hold the adapters only (and their optimizer moments); the base is the
job's ``model.init_from``. ``merge`` folds adapters into full weights, W + (alpha / rank) B A,
which is what export and anything loading the run as pretrained weights use.
"""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_TAG = ".lora_"
BASE_TAG = ".base_layer"


def apply(model: nn.Module, lora, seed: int) -> nn.Module:
    """Injects adapters (in place) per a LoraConfig; adapter initialization is seeded, so every
    rank and every strategy starts from the same adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    devices = {p.device for p in model.parameters()}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = inject_adapter_in_model(config, model)
    finally:
        torch.random.set_rng_state(state)
    model.to(next(iter(devices)))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    return model


def is_adapter(name: str) -> bool:
    return ADAPTER_TAG in name


def is_adapted(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def canonical(name: str) -> str:
    """A parameter's name in the unadapted model."""
    return name.replace(BASE_TAG, "")


def saved_weights(model: nn.Module, weights: dict) -> dict:
    """What a checkpoint keeps of ``weights`` (the model's own names): all of them, or the
    adapters alone for an adapted model."""
    if not is_adapted(model):
        return weights
    return {k: v for k, v in weights.items() if is_adapter(k)}


def to_model_names(model: nn.Module, weights: dict) -> dict:
    """``weights`` under canonical or adapted names -> the model's own names, checked: every
    tensor must name a parameter, and every parameter but an adapter must be given (an adapter
    left out keeps its initialization: a LoRA job's first start)."""
    own = {name for name, _ in model.named_parameters()}
    by_canonical = {canonical(name): name for name in own}
    out = {}
    for name, t in weights.items():
        target = name if name in own else by_canonical.get(name)
        if target is None:
            raise KeyError(f"the state has {name!r}, which names no parameter of the model")
        out[target] = t
    missing = sorted(n for n in own - set(out) if not is_adapter(n))
    if missing:
        raise KeyError(f"the state lacks {', '.join(missing[:5])}")
    return out


def merge(base: dict, adapters: dict, rank: int, alpha: float) -> dict:
    """Full weights under canonical names: each adapted weight becomes W + (alpha / rank) B A."""
    out = dict(base)
    scale = alpha / rank
    for name, a in adapters.items():
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        key = canonical(module) + ".weight"
        w = base[key]
        out[key] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


