"""The validated layout of the model-parallel strategies (tp, pp, hybrid), without torch.

``tp``, ``pp`` and ``hybrid`` are three views of one implementation (strategies.mesh):
each strategy's Config turns its options into a Layout, and these module-level
functions are the strategy interface they share. Everything here runs on the
driver before any worker starts, so every mistake is a ConfigError naming its key.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError
from orchestrator.topology import Topology

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DATA_PARALLEL = ("replicate", "shard")


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    data_parallel: str = "replicate"  # across the remaining ranks: replicate (DDP-style) | shard (FSDP/ZeRO-3)
    schedule: str = "1f1b"
    microbatches: int = 1
    virtual_stages: int = 1

    def topology(self) -> Topology:
        if self.tp < 1:
            raise ConfigError("strategy.tp", f"must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ConfigError("strategy.pp", f"must be >= 1, got {self.pp}")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError(
                "cluster.num_workers",
                f"{self.world_size} workers are not divisible by tp*pp = {self.tp}*{self.pp} = {self.tp * self.pp}",
            )
        return Topology(world_size=self.world_size, dp=self.world_size // (self.tp * self.pp), tp=self.tp, pp=self.pp)

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The pipeline stages a pipeline rank holds: looped, so stage s lives on rank s % pp."""
        return [pp_rank + k * self.pp for k in range(self.virtual_stages)]

    def stage_layers(self, stage: int, n_layers: int) -> list[int]:
        per = n_layers // self.n_stages
        return list(range(stage * per, (stage + 1) * per))

    def theoretical_bubble(self) -> float:
        """Idle fraction of a step with equal-cost stages: (p-1)/(m+p-1) for GPipe and 1F1B;
        interleaving v virtual stages per rank shrinks the bubble v-fold: (p-1)/(v*m+p-1)."""
        p, m, v = self.pp, self.microbatches, self.virtual_stages
        return (p - 1) / (v * m + p - 1)

    def check(self, job) -> None:
        m, t = job.model, job.trainer
        self.topology().check_model(m.n_heads, m.n_kv_heads, m.n_layers, m.vocab_size)
        if self.data_parallel not in DATA_PARALLEL:
            raise ConfigError("strategy.data_parallel",
                              f"{self.data_parallel!r} is not allowed; choose one of {', '.join(DATA_PARALLEL)}")
        if self.tp > 1:
            if t.compile:
                raise ConfigError("trainer.compile", f"torch.compile of the blocks is not supported with tensor parallel "
                                  f"(strategy.tp={self.tp}): torch's compiled blocks fail in the backward of DTensor's "
                                  "redistribution; set trainer.compile=false or strategy.tp=1")
            if m.ffn_dim % self.tp:
                raise ConfigError("model.ffn_dim", f"{m.ffn_dim} is not divisible by tp={self.tp}")
            if self.sequence_parallel and job.data.seq_len % self.tp:
                raise ConfigError("data.seq_len", f"{job.data.seq_len} is not divisible by tp={self.tp}, "
                                  "which strategy.sequence_parallel=true needs")
        if m.tie_embeddings and (self.tp > 1 or self.pp > 1):
            raise ConfigError("model.tie_embeddings", "tied embeddings are not supported with tp > 1 or pp > 1")
        if self.pp == 1:
            return
        if self.schedule not in SCHEDULES:
            raise ConfigError("strategy.schedule", f"{self.schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
        if self.virtual_stages < 1:
            raise ConfigError("strategy.virtual_stages", f"must be >= 1, got {self.virtual_stages}")
        if self.virtual_stages > 1 and self.schedule != "interleaved_1f1b":
            raise ConfigError("strategy.virtual_stages", f"{self.virtual_stages} virtual stages need "
                              f"strategy.schedule=interleaved_1f1b, not {self.schedule}")
        if m.n_layers % self.n_stages:
            raise ConfigError("model.n_layers", f"{m.n_layers} layers are not divisible by pp * virtual_stages "
                              f"= {self.pp} * {self.virtual_stages} = {self.n_stages}")
        if self.microbatches < 1:
            raise ConfigError("strategy.microbatches", f"must be >= 1, got {self.microbatches}")
        if self.schedule == "1f1b" and self.microbatches < self.pp:
            raise ConfigError("strategy.microbatches", f"the 1f1b schedule needs at least pp={self.pp} "
                              f"microbatches, got {self.microbatches}")
        rounds = max(1, self.microbatches // self.pp)
        if self.schedule == "interleaved_1f1b" and self.microbatches % rounds:
            raise ConfigError("strategy.microbatches", f"the interleaved_1f1b schedule runs microbatches in rounds "
                              f"of pp={self.pp}; {self.microbatches} is not a multiple of its {rounds} rounds")
        local_batch = t.global_batch_size // (self.world_size // (self.tp * self.pp))
        if local_batch % self.microbatches:
            raise ConfigError("strategy.microbatches", f"each data-parallel rank's batch of {local_batch} sequences "
                              f"(trainer.global_batch_size / dp) is not divisible into {self.microbatches} microbatches")


# The strategy interface, shared by strategies/tp.py, pp.py and hybrid.py; each Config has
# a ``layout(world_size) -> Layout`` method.

def topology(cfg, world_size: int) -> Topology:
    return cfg.layout(world_size).topology()


def check(cfg, job, topology: Topology) -> None:
    cfg.layout(topology.world_size).check(job)


def build_engine(cfg, model, ctx):
    from strategies.mesh import build

    return build(cfg.layout(ctx.topology.world_size), model, ctx)
