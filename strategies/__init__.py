"""Parallelism strategies: one file each, all behind the Engine interface of strategies.base.

A strategy module exposes:
  Config                          a dataclass subclassing orchestrator.config.StrategyConfig
  plan(cfg, world_size)           the validated orchestrator.plan.Plan it runs (raises ConfigError)
  check(cfg, plan, ...)           any further validation, taking by name only the job's config
                                  groups it needs (model, trainer, optim, data, precision, ...)
  build_engine(cfg, model, ctx)   turns a meta-device model into an Engine
  ALIGNMENT, LORA                 its capabilities (see ``capable``)
The controller and workers only ever go through ``get(name)``.

Strategy files import torch (and DeepSpeed) inside ``build_engine``, not at the
top: the driver reads their Config and plan to validate a job, and does not
pay for importing torch before it starts the cluster.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "single": "strategies.single",
    "ddp": "strategies.ddp",
    "zero1": "strategies.zero",
    "zero2": "strategies.zero",
    "zero3": "strategies.zero",
    "tp": "strategies.tp",
    "pp": "strategies.pp",
    "hybrid": "strategies.hybrid",
}


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str) -> ModuleType:
    if name not in _MODULES:
        from orchestrator.errors import ConfigError

        raise ConfigError("strategy", f"unknown strategy {name!r}; allowed: {', '.join(names())}")
    return importlib.import_module(_MODULES[name])


def check(job, plan) -> None:
    """Runs the job's strategy's ``check`` with the plan and the config groups it names."""
    import inspect

    fn = get(job.strategy.name).check
    wanted = list(inspect.signature(fn).parameters)[2:]  # after (cfg, plan)
    fn(job.strategy, plan, **{name: getattr(job, name) for name in wanted})


def capable(name: str, capability: str) -> bool:
    """Whether strategy ``name`` has a capability its module declares: ``ALIGNMENT`` (trains the
    alignment objectives) or ``LORA`` (trains LoRA adapters). A module serving several names
    declares a bool for all of them or the tuple of the names that have it."""
    value = getattr(get(name), capability)
    return name in value if isinstance(value, tuple) else bool(value)


def able(capability: str) -> list[str]:
    """The strategies with the capability."""
    return [n for n in names() if capable(n, capability)]


def config_classes() -> dict[str, type]:
    return {name: get(name).Config for name in names()}
