"""Megatron-style tensor parallel on torch DTensor; data parallel across the remaining ranks.

Attention q/k/v and the MLP's gate/up projections are column-parallel, the attention
output and MLP down projections row-parallel, the embedding and output layer
vocabulary-parallel, with a cross entropy that never gathers the full logits
(torch's loss_parallel). Optional sequence parallel shards the norms' activations
along the sequence. Implemented in strategies.mesh.
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
    name: str = "tp"
    tp: int = 2
    sequence_parallel: bool = False
    data_parallel: str = "replicate"  # replicate | shard, across world_size / tp ranks

    def plan_for(self, world_size: int) -> Plan:
        return Plan(world_size=world_size, tp=self.tp, sequence_parallel=self.sequence_parallel,
                      data_parallel=self.data_parallel)
