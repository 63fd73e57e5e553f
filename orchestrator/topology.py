"""The one validated description of how ranks are laid out.

A Topology is built once (from the strategy's options and the world size),
validated before any worker starts, and handed to whoever needs it. There is no
module-level parallel state.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    world_size: int
    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"strategy.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.dp * self.tp * self.pp != self.world_size:
            raise ConfigError(
                "cluster.num_workers",
                f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.dp * self.tp * self.pp} "
                f"must equal the number of workers ({self.world_size})",
            )

    @classmethod
    def data_parallel(cls, world_size: int) -> "Topology":
        return cls(world_size=world_size, dp=world_size)

    def dp_rank(self, rank: int) -> int:
        """Data-parallel index of a global rank; mesh order is (pp, dp, tp), tp fastest."""
        return (rank // self.tp) % self.dp

    def check_model(self, n_heads: int, n_kv_heads: int, n_layers: int, vocab_size: int) -> None:
        if n_heads % self.tp:
            raise ConfigError("model.n_heads", f"{n_heads} heads are not divisible by tp={self.tp}")
        if n_kv_heads % self.tp:
            raise ConfigError("model.n_kv_heads", f"{n_kv_heads} key/value heads are not divisible by tp={self.tp}")
        if n_layers % self.pp:
            raise ConfigError("model.n_layers", f"{n_layers} layers are not divisible by pp={self.pp}")
        if vocab_size % self.tp:
            raise ConfigError("model.vocab_size", f"{vocab_size} is not divisible by tp={self.tp}")
