"""The one validated description of how a job's ranks are laid out: the Plan.

A strategy turns its options and the world size into a Plan (``strategies.get(name).plan``);
the driver builds it once, while it validates the job (``plan_of``), and hands it to every rank,
where the trainer and the engines read the parallel degrees, pipeline stages and mesh shape from
it. Nothing else derives them. No torch here: the driver validates before it imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    world_size: int
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline ranks
    data_parallel: str = "replicate"  # across the remaining ranks: replicate (DDP-style) | shard (FSDP/ZeRO-3)
    sequence_parallel: bool = False
    schedule: str = "1f1b"  # pipeline schedule (pp > 1)
    microbatches: int = 1  # pipeline microbatches per step
    virtual_stages: int = 1  # pipeline stages per pipeline rank

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError("strategy.tp", f"must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ConfigError("strategy.pp", f"must be >= 1, got {self.pp}")
        if self.world_size % (self.tp * self.pp):
            raise ConfigError("cluster.num_workers", f"{self.world_size} workers are not divisible by tp*pp = "
                                                     f"{self.tp}*{self.pp} = {self.tp * self.pp}")

    @property
    def dp(self) -> int:
        """The data-parallel degree: the ranks left once tensor and pipeline parallel took theirs."""
        return self.world_size // (self.tp * self.pp)

    @property
    def sharded(self) -> bool:
        """Data parallel shards parameters, gradients and optimizer state (FSDP) across dp > 1 ranks."""
        return self.data_parallel == "shard" and self.dp > 1

    @property
    def ranks_per_pipeline_rank(self) -> int:
        """The ranks that share one pipeline position (its data- and tensor-parallel ranks)."""
        return self.dp * self.tp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """(pp, dp_replicate, dp_shard, tp), tp fastest: the device mesh of the mesh strategies."""
        shard = self.data_parallel == "shard"
        return self.pp, 1 if shard else self.dp, self.dp if shard else 1, self.tp

    def dp_rank(self, rank: int) -> int:
        """Data-parallel index of a global rank; mesh order is (pp, dp, tp), tp fastest."""
        return (rank // self.tp) % self.dp

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

    def check_model(self, m) -> None:
        """The model (orchestrator.config.ModelConfig or LlamaArgs) splits as the plan says."""
        if m.n_heads % self.tp:
            raise ConfigError("model.n_heads", f"{m.n_heads} heads are not divisible by tp={self.tp}")
        if m.n_kv_heads % self.tp:
            raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} key/value heads are not divisible by tp={self.tp}")
        if m.n_layers % self.pp:
            raise ConfigError("model.n_layers", f"{m.n_layers} layers are not divisible by pp={self.pp}")
        if m.vocab_size % self.tp:
            raise ConfigError("model.vocab_size", f"{m.vocab_size} is not divisible by tp={self.tp}")


def plan_of(job) -> Plan:
    """The job's plan, from its strategy's options and cluster.num_workers (not yet checked
    against the rest of the job: config.validate does that)."""
    import strategies

    return strategies.get(job.strategy.name).plan(job.strategy, job.cluster.num_workers)
