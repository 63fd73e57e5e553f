"""ZeRO data parallel through DeepSpeed: stages 1, 2 and 3 (strategies zero1, zero2, zero3).

Stage 1 partitions optimizer states, stage 2 also gradients, stage 3 also parameters,
across the data-parallel ranks. Optimizer states (and stage-3 parameters) can be
offloaded to CPU memory. The job's optimizer (AdamW) and schedule are handed to
DeepSpeed as client objects, so every strategy runs the same update rule.

DeepSpeed is imported inside ``build_engine``: the driver only validates options.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from orchestrator.config import OptimConfig, StrategyConfig, TrainerConfig
from orchestrator.errors import ConfigError
from orchestrator.plan import Plan
from orchestrator.results import MemoryReport
from strategies.activations import MetersActivations

# Capability: the engine trains any objective of orchestrator.alignment.losses (DPO, GRPO).
ALIGNMENT = True
# Capability: LoRA adapters on a frozen model (finetune.lora).
LORA = ("zero1", "zero2")  # not zero3

OFFLOAD_CHOICES = ("none", "cpu")


@dataclass
class Config(StrategyConfig):
    name: str = MISSING  # zero1 | zero2 | zero3
    offload_optimizer: str = "none"  # none | cpu
    offload_params: str = "none"  # none | cpu (zero3 only)
    # Unset (null) options are left to DeepSpeed's defaults or to ds_config.
    overlap_comm: Optional[bool] = None
    reduce_bucket_size: Optional[int] = None
    allgather_bucket_size: Optional[int] = None  # zero1, zero2
    prefetch_bucket_size: Optional[int] = None  # zero3
    # A DeepSpeed JSON file merged with what the job implies; a conflict is an error.
    ds_config: Optional[str] = None


def stage(cfg: Config) -> int:
    return int(cfg.name[-1])


def plan(cfg: Config, world_size: int) -> Plan:
    if cfg.name not in ("zero1", "zero2", "zero3"):
        raise ConfigError("strategy.name", f"{cfg.name!r} is not a ZeRO strategy; allowed: zero1, zero2, zero3")
    for key in ("offload_optimizer", "offload_params"):
        if getattr(cfg, key) not in OFFLOAD_CHOICES:
            raise ConfigError(f"strategy.{key}", f"{getattr(cfg, key)!r} is not allowed; choose one of none, cpu")
    if cfg.offload_params != "none" and stage(cfg) != 3:
        raise ConfigError("strategy.offload_params", f"parameter offload needs zero3, not {cfg.name}")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"strategy.{key}", f"must be >= 1, got {value}")
    if cfg.allgather_bucket_size is not None and stage(cfg) == 3:
        raise ConfigError("strategy.allgather_bucket_size", "applies to zero1 and zero2; zero3 uses prefetch_bucket_size")
    if cfg.prefetch_bucket_size is not None and stage(cfg) != 3:
        raise ConfigError("strategy.prefetch_bucket_size", f"applies to zero3, not {cfg.name}")
    return Plan(world_size)


def check(cfg: Config, plan: Plan, trainer: TrainerConfig, optim: OptimConfig, precision: str) -> None:
    """Builds the merged DeepSpeed config once on the driver, so conflicts fail before workers start."""
    deepspeed_config(cfg, trainer, optim, plan.dp, None if precision == "auto" else precision)


# Where each key of the implied DeepSpeed config comes from, for error messages.
_ORIGIN = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (trainer.micro_batch_size * data-parallel size)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "strategy",
    "zero_optimization.overlap_comm": "strategy.overlap_comm",
    "zero_optimization.reduce_bucket_size": "strategy.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "strategy.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "strategy.prefetch_bucket_size",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_params",
    "bf16.enabled": "precision",
}
# Sections the job owns outright: DeepSpeed must use the job's optimizer and schedule.
_FORBIDDEN = {"optimizer": "optim.*", "scheduler": "optim.* (warmup_steps, schedule)", "fp16": "precision (fp16 is not supported)"}


def implied_config(cfg: Config, t: TrainerConfig, optim: OptimConfig, dp: int, precision: str | None) -> dict:
    zero: dict = {"stage": stage(cfg), "contiguous_gradients": True}
    optional = {"overlap_comm": cfg.overlap_comm, "reduce_bucket_size": cfg.reduce_bucket_size,
                "allgather_bucket_size": cfg.allgather_bucket_size,
                "stage3_prefetch_bucket_size": cfg.prefetch_bucket_size}
    zero.update({k: v for k, v in optional.items() if v is not None})
    if cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        # The job's torch AdamW is the optimizer, offloaded or not.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision is not None:
        out["bf16"] = {"enabled": precision == "bf16"}
    return out


def _merge(implied: dict, user: dict, source: str, path: str = "") -> dict:
    out = dict(implied)
    for key, value in user.items():
        dotted = f"{path}{key}"
        if not path and key in _FORBIDDEN:
            raise ConfigError("strategy.ds_config", f"{source}: {key!r} is set by {_FORBIDDEN[key]}; remove it from the file")
        if key not in implied:
            out[key] = value
        elif isinstance(implied[key], dict) and isinstance(value, dict):
            out[key] = _merge(implied[key], value, source, dotted + ".")
        elif implied[key] != value:
            origin = _ORIGIN.get(dotted, "the job config")
            raise ConfigError(
                "strategy.ds_config",
                f"{source}: {dotted}={value!r} conflicts with {origin} = {implied[key]!r}",
            )
    return out


def deepspeed_config(cfg: Config, trainer: TrainerConfig, optim: OptimConfig, dp: int, precision: str | None) -> dict:
    implied = implied_config(cfg, trainer, optim, dp, precision)
    if not cfg.ds_config:
        return implied
    path = Path(cfg.ds_config).expanduser()
    if not path.is_file():
        raise ConfigError("strategy.ds_config", f"no such file: {cfg.ds_config}")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("strategy.ds_config", f"{cfg.ds_config} is not valid JSON: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError("strategy.ds_config", f"{cfg.ds_config} must hold a JSON object")
    return _merge(implied, user, str(cfg.ds_config))


def build_engine(cfg: Config, model, ctx) -> "ZeroEngine":
    return ZeroEngine(cfg, model, ctx)


class ZeroEngine(MetersActivations):
    """The Engine interface over a DeepSpeed engine."""

    def __init__(self, cfg: Config, model, ctx):
        import deepspeed

        from strategies import deepspeed_compat as compat

        compat.skip_op_probe()

        from orchestrator.optim import build_optimizer, build_scheduler
        from strategies.base import materialize, prepare_blocks

        self.cfg = cfg
        self.ctx = ctx
        self.stage = stage(cfg)
        model = materialize(model, ctx)
        prepare_blocks(model, ctx.trainer)
        self.n_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, ctx.optim)
        scheduler = build_scheduler(optimizer, ctx.optim, ctx.max_steps)
        ds_cfg = deepspeed_config(cfg, ctx.trainer, ctx.optim, ctx.plan.dp, ctx.precision)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False,
        )
        self._memory: dict | None = None
        self._states_linked = False

    def _link_states(self) -> None:
        from strategies import deepspeed_compat as compat

        compat.link_states(self.optimizer, self.stage)
        self._states_linked = True

    @property
    def base_optimizer(self):
        """The torch AdamW that DeepSpeed steps over its flat fp32 partitions."""
        return self.optimizer.optimizer

    def train_step(self, micro_batches):
        import torch

        from orchestrator.alignment.losses import reduce_stats
        from strategies.base import StepResult, mean_over_group

        lr = self.engine.get_lr()[0]
        total = torch.zeros((), device=self.ctx.device)
        # Model states are measured in the first step that starts with optimizer moments
        # (stage 3 creates them at its first step).
        measure = self._memory is None and bool(self.base_optimizer.state)
        peak: dict = {}
        stats = []
        objective = self.ctx.loss_of
        for batch in micro_batches:
            with self.activation_meter():
                loss, extra = objective.loss(self.engine(batch[0]), batch)
            stats.append(extra)
            self.engine.backward(loss)  # scaled by 1/accumulation steps inside
            if measure:  # the peak over the step's micro-batches: gradients are held now
                sample = self._measure_model_states()
                if sample["model_states_bytes"] > peak.get("model_states_bytes", -1):
                    peak = sample
            self.engine.step()  # applies the update at the accumulation boundary
            total += loss.detach().float()
        if not self._states_linked:
            self._link_states()
        if measure:
            self._memory = peak
        grad_norm = self.engine.get_global_grad_norm()
        return StepResult(loss=mean_over_group(total / len(micro_batches), None), grad_norm=float(grad_norm or 0.0),
                          lr=lr, extra=reduce_stats(stats, None))

    def logits(self, x):
        """The model's logits for ``x`` in evaluation mode, without gradients (collective under
        stage 3: every rank must call it as often)."""
        import torch

        self.engine.eval()
        try:
            with torch.no_grad():
                return self.engine(x).float()
        finally:
            self.engine.train()

    def eval_step(self, micro_batches) -> dict:
        from strategies.base import evaluate

        self.engine.eval()
        try:
            return evaluate(self.engine, micro_batches, self.ctx.device, None, self.ctx.objective)
        finally:
            self.engine.train()

    def _named(self):
        return list(self.engine.module.named_parameters())

    def checkpoint_state(self) -> dict:
        """This rank's fragment of every trainable parameter's fp32 master copy and moments, as
        Chunks over DeepSpeed's flat partitions (no gathering); a LoRA job's trainable parameters
        are its adapters, the only weights its checkpoints hold."""
        from orchestrator.dcp import Chunks
        from strategies import deepspeed_compat as compat

        out: dict = {}
        for name, p in self._named():
            if not p.requires_grad:
                continue
            shape = compat.parameter_shape(p)
            frag = compat.local_fragment(self.optimizer, self.stage, p)
            for key, view in [("model", None), ("optim.exp_avg", "exp_avg"), ("optim.exp_avg_sq", "exp_avg_sq")]:
                if frag is None:
                    out[f"{key}.{name}"] = Chunks(shape, [])
                else:
                    out[f"{key}.{name}"] = Chunks.of_flat_range(shape, frag.start,
                                                                frag.master if view is None else frag.moments[view])
        return out

    def counters(self) -> dict:
        steps = [int(st["step"]) for st in self.base_optimizer.state.values() if "step" in st]
        return {"optimizer_step": steps[0] if steps else 0, "scheduler": self.scheduler.state_dict()}

    def prepare_load(self) -> None:
        from strategies import deepspeed_compat as compat

        compat.ensure_optimizer_states(self.optimizer, self.stage)
        self._states_linked = True

    def finish_load(self, counters: dict) -> None:
        """The loaded master copies become the working weights (collective); counters and schedule."""
        import torch

        from strategies import deepspeed_compat as compat
        from strategies.base import restore_schedule

        compat.refresh_working_weights(self.optimizer, self.stage)
        for st in self.base_optimizer.state.values():
            if "step" in st:
                st["step"] = torch.full_like(st["step"], float(counters["optimizer_step"])) if torch.is_tensor(
                    st["step"]) else counters["optimizer_step"]
        restore_schedule(self.scheduler, counters["scheduler"])

    def gather_weights(self) -> dict:
        """Full fp32 weights under the model's names, complete on rank 0 (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        from orchestrator import lora

        weights = {name: safe_get_full_fp32_param(p) for name, p in self._named()
                   if p.requires_grad or not lora.is_adapted(self.engine.module)}
        return lora.saved_weights(self.engine.module, weights)

    def load_weights(self, weights: dict) -> None:
        """Whole weights (pretrained ones): into the working copies and, for trainable parameters,
        the fp32 master partitions. Each parameter is whole on every rank one at a time."""
        import deepspeed
        import torch
        from deepspeed.utils import safe_set_full_fp32_param

        from strategies.base import model_weights

        weights = model_weights(self.engine.module, weights)
        named = [(name, p) for name, p in self._named() if name in weights]
        params = [p for _, p in named]
        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if self.stage == 3 else nullcontext()
        with gather, torch.no_grad():
            for name, p in named:
                p.data.copy_(weights[name].to(p.device, p.dtype))
        for name, p in named:
            if p.requires_grad:
                safe_set_full_fp32_param(p, weights[name].to(self.ctx.device, torch.float32))

    def _measure_model_states(self) -> dict:
        """Bytes of parameters, gradients and optimizer state this rank holds, from the tensors."""
        from strategies.base import tensor_bytes

        from strategies import deepspeed_compat as compat

        params = [p for _, p in self._named()]
        full_grads = tensor_bytes(p.grad for p in params)  # unreduced gradients, where still held
        working = tensor_bytes(p.ds_tensor for p in params) if self.stage == 3 else tensor_bytes(params)
        master = tensor_bytes(compat.master_partitions(self.optimizer, self.stage))
        grads = full_grads + tensor_bytes(compat.gradient_partitions(self.optimizer, self.stage))
        moments = tensor_bytes(v for st in self.base_optimizer.state.values() for k, v in st.items()
                               if k in ("exp_avg", "exp_avg_sq"))
        return {"params_bytes": working, "grads_bytes": grads, "master_params_bytes": master,
                "optimizer_bytes": moments, "model_states_bytes": working + grads + master + moments}

    def memory_report(self) -> MemoryReport:
        from strategies.base import zero_formula

        param_bytes = 2 if self.ctx.precision == "bf16" else 4
        # DeepSpeed keeps an fp32 master partition whatever the working precision: K = 12.
        formula = zero_formula(self.stage, self.n_params, self.ctx.plan.dp, param_bytes, param_bytes, 12)
        formula_no_master = zero_formula(self.stage, self.n_params, self.ctx.plan.dp, param_bytes, param_bytes, 8)
        return MemoryReport(**(self._memory or {}), **formula,
                            formula_bytes_without_master_copy=formula_no_master["formula_bytes"],
                            **self.activation_report(self.ctx.trainer))

    def generation_model(self):
        # Stage 3 holds a slice of every weight; the trainer rebuilds a full model from its last checkpoint.
        return None if self.stage == 3 else self.engine.module

