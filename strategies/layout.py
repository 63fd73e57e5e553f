"""The checks of the model-parallel strategies (tp, pp, hybrid), without torch.

``tp``, ``pp`` and ``hybrid`` are three views of one implementation (strategies.mesh):
each strategy's Config turns its options into a Plan (orchestrator.plan), and these
module-level functions are the strategy interface they share. Everything here runs on the
driver before any worker starts, so every mistake is a ConfigError naming its key.
"""
from __future__ import annotations

from orchestrator.errors import ConfigError
from orchestrator.plan import Plan

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DATA_PARALLEL = ("replicate", "shard")


def check_layout(plan: Plan, model, trainer, data) -> None:
    """What the mesh strategies need of the model, trainer and data config (the plan's own
    degrees were checked when it was built, its model split by config.validate)."""
    m, t = model, trainer
    if plan.data_parallel not in DATA_PARALLEL:
        raise ConfigError("strategy.data_parallel",
                          f"{plan.data_parallel!r} is not allowed; choose one of {', '.join(DATA_PARALLEL)}")
    if plan.tp > 1:
        if t.compile:
            raise ConfigError("trainer.compile", f"torch.compile of the blocks is not supported with tensor parallel "
                              f"(strategy.tp={plan.tp}): torch's compiled blocks fail in the backward of DTensor's "
                              "redistribution; set trainer.compile=false or strategy.tp=1")
        if m.ffn_dim % plan.tp:
            raise ConfigError("model.ffn_dim", f"{m.ffn_dim} is not divisible by tp={plan.tp}")
        if plan.sequence_parallel and data.seq_len % plan.tp:
            raise ConfigError("data.seq_len", f"{data.seq_len} is not divisible by tp={plan.tp}, "
                              "which strategy.sequence_parallel=true needs")
    if m.tie_embeddings and (plan.tp > 1 or plan.pp > 1):
        raise ConfigError("model.tie_embeddings", "tied embeddings are not supported with tp > 1 or pp > 1")
    if plan.pp == 1:
        return
    if plan.schedule not in SCHEDULES:
        raise ConfigError("strategy.schedule", f"{plan.schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    if plan.virtual_stages < 1:
        raise ConfigError("strategy.virtual_stages", f"must be >= 1, got {plan.virtual_stages}")
    if plan.virtual_stages > 1 and plan.schedule != "interleaved_1f1b":
        raise ConfigError("strategy.virtual_stages", f"{plan.virtual_stages} virtual stages need "
                          f"strategy.schedule=interleaved_1f1b, not {plan.schedule}")
    if m.n_layers % plan.n_stages:
        raise ConfigError("model.n_layers", f"{m.n_layers} layers are not divisible by pp * virtual_stages "
                          f"= {plan.pp} * {plan.virtual_stages} = {plan.n_stages}")
    if plan.microbatches < 1:
        raise ConfigError("strategy.microbatches", f"must be >= 1, got {plan.microbatches}")
    if plan.schedule == "1f1b" and plan.microbatches < plan.pp:
        raise ConfigError("strategy.microbatches", f"the 1f1b schedule needs at least pp={plan.pp} "
                          f"microbatches, got {plan.microbatches}")
    rounds = max(1, plan.microbatches // plan.pp)
    if plan.schedule == "interleaved_1f1b" and plan.microbatches % rounds:
        raise ConfigError("strategy.microbatches", f"the interleaved_1f1b schedule runs microbatches in rounds "
                          f"of pp={plan.pp}; {plan.microbatches} is not a multiple of its {rounds} rounds")
    local_batch = t.global_batch_size // plan.dp
    if local_batch % plan.microbatches:
        raise ConfigError("strategy.microbatches", f"each data-parallel rank's batch of {local_batch} sequences "
                          f"(trainer.global_batch_size / dp) is not divisible into {plan.microbatches} microbatches")


# The strategy interface, shared by strategies/tp.py, pp.py and hybrid.py; each Config has
# a ``plan_for(world_size) -> Plan`` method.

def plan(cfg, world_size: int) -> Plan:
    return cfg.plan_for(world_size)


def check(cfg, plan: Plan, model, trainer, data) -> None:
    check_layout(plan, model, trainer, data)


def build_engine(cfg, model, ctx):
    from strategies.mesh import build

    return build(ctx.plan, model, ctx)
