"""Pipeline parallel on torch.distributed.pipelining: layers split into stages, run by a
GPipe, 1F1B or interleaved 1F1B schedule; data parallel across the remaining ranks.
Implemented in strategies.mesh."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import StrategyConfig
from orchestrator.plan import Plan
from strategies.layout import build_engine, check, plan  # noqa: F401  (the strategy interface)

# Capability: alignment objectives (DPO, GRPO) need whole logits per micro-batch; not on this mesh.
ALIGNMENT = False
# Capability: LoRA adapters on a frozen model (finetune.lora).
LORA = False


@dataclass
class Config(StrategyConfig):
    name: str = "pp"
    pp: int = 2
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    microbatches: int = 4
    virtual_stages: int = 1  # stages per rank; > 1 with interleaved_1f1b
    data_parallel: str = "replicate"  # replicate | shard, across world_size / pp ranks

    def plan_for(self, world_size: int) -> Plan:
        return Plan(world_size=world_size, pp=self.pp, schedule=self.schedule, microbatches=self.microbatches,
                      virtual_stages=self.virtual_stages, data_parallel=self.data_parallel)
