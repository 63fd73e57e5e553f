"""Tensor x pipeline x data parallel on one named device mesh (pp, dp_replicate, dp_shard, tp).

The data-parallel degree is inferred: world_size / (tp * pp). Parallelisms are applied
in one fixed order: pipeline stages are split first, then each stage gets tensor
parallel, then data-parallel sharding. Implemented in strategies.mesh.
"""
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
    name: str = "hybrid"
    tp: int = 2
    pp: int = 1
    sequence_parallel: bool = False
    data_parallel: str = "replicate"  # replicate (DDP-style) | shard (FSDP/ZeRO-3-style)
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (when pp > 1)
    microbatches: int = 4
    virtual_stages: int = 1

    def plan_for(self, world_size: int) -> Plan:
        return Plan(world_size=world_size, tp=self.tp, pp=self.pp, sequence_parallel=self.sequence_parallel,
                      data_parallel=self.data_parallel, schedule=self.schedule, microbatches=self.microbatches,
                      virtual_stages=self.virtual_stages)
