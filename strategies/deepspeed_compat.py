"""The DeepSpeed internals this project touches, in one place, with the version they were read from.

DeepSpeed's public state APIs gather whole tensors (``safe_get_full_*``) or cover ZeRO-3 only
(``safe_get_local_*``). A sharded checkpoint needs each rank's own slice of every parameter's fp32
master copy and AdamW moments, at every stage, without gathering; the places DeepSpeed keeps them
are read here. A DeepSpeed upgrade that moves them fails at import, naming this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import deepspeed

CHECKED = "0.19."
if not deepspeed.__version__.startswith(CHECKED):
    raise ImportError(f"strategies.deepspeed_compat was written against DeepSpeed {CHECKED}x (its ZeRO "
                      f"optimizers' partition layout); this is DeepSpeed {deepspeed.__version__}. Check the "
                      "functions in strategies/deepspeed_compat.py against the new release.")


def skip_op_probe() -> None:
    """DeepSpeed's torch backend, on creation, probes which of its C++ ops this machine can build
    (compiler subprocesses) and JIT-compiles its shared-memory all-reduce, which only its
    inference all-reduce uses: minutes of a 2-core machine's CPU in a fresh environment, for
    nothing training calls. The probe's result is a module-level dict that DeepSpeed caches and
    reads from there; an empty one marks no op as prebuilt or buildable."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}


def master_partitions(optimizer, stage: int) -> list:
    """This rank's flat fp32 partitions, one per parameter group: what AdamW steps over."""
    if stage == 3:
        return list(optimizer.fp32_partitioned_groups_flat)
    return list(optimizer.single_partition_of_fp32_groups)


def link_states(optimizer, stage: int) -> None:
    """Links parameters to their optimizer-state fragments once every group has state.

    DeepSpeed 0.19 (stage 1/2) links them after the first parameter group's first step,
    before the other groups have any state: with two groups (decay, no decay) the
    second stays unlinked and its parameters have no moments to read."""
    if stage in (1, 2):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def ensure_optimizer_states(optimizer, stage: int) -> None:
    """Creates AdamW's state (step 0, zero moments) as torch would at its first step, so that a
    checkpoint's moments can be loaded into it before training resumes."""
    import torch

    base = optimizer.optimizer
    for p in master_partitions(optimizer, stage):
        if not base.state.get(p):
            base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
    link_states(optimizer, stage)


@dataclass
class Fragment:
    """This rank's slice of one parameter, flattened: elements [start, start + numel) of it, in the
    fp32 master copy and in each AdamW moment (views into DeepSpeed's flat partitions)."""

    start: int
    master: object
    moments: dict


def local_fragment(optimizer, stage: int, param) -> Fragment | None:
    """This rank's fragment of a trainable parameter, or None where it holds none of it."""
    if stage == 3:
        rank = optimizer._get_param_partition_rank(param)
        size = param.ds_tensor.ds_numel  # every rank's partition size (the last one padded)
        start = rank * size
        numel = max(0, min(size, param.ds_numel - start))
        if numel == 0:
            return None
        def view(key):  # a view of the flat partition, wherever it lives (get_local_fp32_param moves it)
            return optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                           optim_state_key=key)[0].narrow(0, 0, numel)

        return Fragment(start, view(None), {k: view(k) for k in ("exp_avg", "exp_avg_sq")})
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    moments = {k: mapping.get_optim_state_fragment(k) for k in ("exp_avg", "exp_avg_sq")}
    return Fragment(mapping.lp_fragment_address.start, mapping.get_hp_fragment(), moments)


def parameter_shape(param) -> tuple[int, ...]:
    """A parameter's full shape (ZeRO-3 keeps an empty placeholder in ``param.data``)."""
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def refresh_working_weights(optimizer, stage: int) -> None:
    """Copies the fp32 master partitions into the working weights the forward pass uses, after
    they were loaded: stage 1/2 copy each rank's partition and all-gather the working copies
    (collective); stage 3 copies each rank's partition into its parameter shards."""
    if stage in (1, 2):
        optimizer.update_lp_params()
        return
    for group, (working, master) in enumerate(zip(optimizer.fp16_partitioned_groups_flat,
                                                  optimizer.fp32_partitioned_groups_flat)):
        working.data.copy_(master.data)
        shards = optimizer.unflatten(working, optimizer.fp16_partitioned_groups[group])
        for shard, value in zip(optimizer.fp16_partitioned_groups[group], shards):
            shard.data = value.data


def gradient_partitions(optimizer, stage: int) -> list:
    """The reduced gradient partitions this rank holds during a step (for memory accounting)."""
    if stage == 3:
        return list(getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition").values())
    if optimizer.cpu_offload:  # reduced partitions accumulate on the CPU master partitions
        return [g.grad for g in optimizer.single_partition_of_fp32_groups]
    return [g for group in optimizer.averaged_gradients.values() for g in (group or [])]
