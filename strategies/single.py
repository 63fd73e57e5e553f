"""One process, no parallelism: the reference every other strategy is checked against."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import StrategyConfig
from orchestrator.errors import ConfigError
from orchestrator.plan import Plan

# Capability: the engine trains any objective of orchestrator.alignment.losses (DPO, GRPO).
ALIGNMENT = True
# Capability: LoRA adapters on a frozen model (finetune.lora).
LORA = True


@dataclass
class Config(StrategyConfig):
    name: str = "single"


def plan(cfg: Config, world_size: int) -> Plan:
    if world_size != 1:
        raise ConfigError("cluster.num_workers", f"strategy=single runs on exactly 1 worker, got {world_size}")
    return Plan(world_size=1)


def check(cfg: Config, plan: Plan) -> None:
    """Nothing beyond the plan to check."""


def build_engine(cfg: Config, model, ctx):
    from strategies.base import TorchEngine, materialize, prepare_blocks

    model = materialize(model, ctx)
    prepare_blocks(model, ctx.trainer)
    return TorchEngine(model, model, ctx)
