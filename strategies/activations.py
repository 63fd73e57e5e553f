"""Activation checkpointing and compilation of transformer blocks, and the measure of the
activation memory they save. No torch import at the top: strategy modules that the driver reads
to validate a job (strategies.zero) subclass ``MetersActivations``."""
from __future__ import annotations

import contextlib
from typing import ContextManager

from orchestrator.config import TrainerConfig


def checkpointed(trainer: TrainerConfig, index: int) -> bool:
    """Whether block ``index`` (of the whole model) recomputes its activations in backward."""
    mode = trainer.activation_checkpointing
    return mode == "full" or (mode == "selective" and index % trainer.activation_checkpointing_every == 0)


def prepare_blocks(model, trainer: TrainerConfig) -> None:
    """Activation checkpointing, then torch.compile, of each transformer block of ``model`` (a
    whole model or a pipeline stage, whose layer names are the whole model's indices). Every
    strategy calls it after tensor parallel and before data-parallel wrapping, the design's
    fixed order. Neither changes a parameter's name."""
    for name, block in model.layers.items():
        block.checkpointed = checkpointed(trainer, int(name))
        if trainer.compile:
            block.compile()


class ActivationMeter:
    """Bytes autograd keeps for the backward pass from the forward run inside it: the distinct
    storages of the saved tensors that are not leaves (weights and inputs are leaves and are
    not counted). A checkpointed block keeps its input only, and this sees exactly that."""

    def __init__(self):
        import torch

        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        from strategies.base import local_tensor

        if not t.is_leaf:
            local = local_tensor(t)
            try:
                storage = local.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a wrapper without storage of its own (an async collective's result)
                self.storages[id(t)] = local.numel() * local.element_size()
        return t

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class MetersActivations:
    """An engine that measures, once, the activation bytes of its first micro-batch's forward."""

    activation_bytes: int | None = None

    def activation_meter(self) -> ContextManager:
        if self.activation_bytes is not None:
            return contextlib.nullcontext()
        meter = ActivationMeter()

        @contextlib.contextmanager
        def measure():
            with meter:
                yield
            self.activation_bytes = meter.bytes

        return measure()

    def activation_report(self, trainer: TrainerConfig) -> dict:
        mode = trainer.activation_checkpointing
        if mode == "selective":
            mode += f" (every {trainer.activation_checkpointing_every} blocks)"
        return {"activation_bytes": self.activation_bytes, "activation_checkpointing": mode}
