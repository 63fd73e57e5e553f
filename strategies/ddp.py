"""Replicated data parallel through torch DistributedDataParallel."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import StrategyConfig
from orchestrator.plan import Plan

# Capability: the engine trains any objective of orchestrator.alignment.losses (DPO, GRPO).
ALIGNMENT = True
# Capability: LoRA adapters on a frozen model (finetune.lora).
LORA = True


@dataclass
class Config(StrategyConfig):
    name: str = "ddp"
    bucket_cap_mb: int = 25
    gradient_as_bucket_view: bool = True
    static_graph: bool = False


def plan(cfg: Config, world_size: int) -> Plan:
    return Plan(world_size)


def check(cfg: Config, plan: Plan) -> None:
    """Nothing beyond the plan to check."""


def build_engine(cfg: Config, model, ctx):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from strategies.base import TorchEngine, materialize, prepare_blocks

    model = materialize(model, ctx)
    prepare_blocks(model, ctx.trainer)
    wrapped = DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
    )
    return TorchEngine(wrapped, model, ctx, dp_group=dist.group.WORLD, no_sync=wrapped.no_sync)
