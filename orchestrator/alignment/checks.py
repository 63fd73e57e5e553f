"""Validation of the ``alignment`` group, on the driver, before any worker starts."""
from __future__ import annotations

import math

from orchestrator.errors import ConfigError


def validate_alignment(job, dp: int) -> None:
    import strategies

    a, d, t = job.alignment, job.data, job.trainer
    if a.method == "none":
        if d.format == "preference":
            raise ConfigError("data.format", "preference pairs train with alignment.method=dpo (+experiment=dpo)")
        return
    if not strategies.capable(job.strategy.name, "ALIGNMENT"):
        able = strategies.able("ALIGNMENT")
        raise ConfigError("alignment.method", f"{a.method} runs with strategy {', '.join(able)}; "
                                              f"not with {job.strategy.name!r}")
    if not job.model.init_from:
        raise ConfigError("model.init_from", f"{a.method} tunes a trained model (its reference, and the rollout "
                                             "pool's starting weights): set model.init_from to a run, checkpoint or "
                                             "Hugging Face directory")
    if a.method == "dpo":
        if d.format != "preference":
            raise ConfigError("data.format", f"DPO trains on preference pairs: data=preference (data.format="
                                             f"preference), not {d.format!r}")
        if not (0 < a.beta < math.inf):
            raise ConfigError("alignment.beta", f"must be > 0, got {a.beta}")
        if not 0 <= a.label_smoothing < 0.5:
            raise ConfigError("alignment.label_smoothing", f"must be in [0, 0.5), got {a.label_smoothing}")
        if not 0 <= a.sft_weight < math.inf:
            raise ConfigError("alignment.sft_weight", f"must be >= 0, got {a.sft_weight}")
        return
    # GRPO
    if d.format != "sft":
        raise ConfigError("data.format", f"GRPO draws prompts and reference answers from SFT rows: data=sft, not "
                                         f"{d.format!r}")
    if a.group_size < 2:
        raise ConfigError("alignment.group_size", f"must be >= 2 (advantages are relative within a group), "
                                                  f"got {a.group_size}")
    if t.global_batch_size % (a.group_size * dp):
        raise ConfigError("trainer.global_batch_size", f"GRPO's batch counts samples: {t.global_batch_size} is not "
                                                       f"divisible by alignment.group_size * data-parallel size = "
                                                       f"{a.group_size} * {dp}")
    if not 0 < a.temperature <= 2:
        raise ConfigError("alignment.temperature", f"must be in (0, 2], got {a.temperature}")
    if not 0 < a.clip_eps < 1:
        raise ConfigError("alignment.clip_eps", f"must be in (0, 1), got {a.clip_eps}")
    if not 0 <= a.kl_coef < math.inf:
        raise ConfigError("alignment.kl_coef", f"must be >= 0, got {a.kl_coef}")
    r = a.rollout
    for key in ("replicas", "cpus_per_replica", "max_tokens", "block_size", "kv_cache_tokens", "max_batch"):
        if getattr(r, key) < 1:
            raise ConfigError(f"alignment.rollout.{key}", f"must be >= 1, got {getattr(r, key)}")
    if not 0 < r.start_timeout_s < math.inf:
        raise ConfigError("alignment.rollout.start_timeout_s", f"must be > 0, got {r.start_timeout_s}")
    if r.kv_cache_tokens < job.model.max_seq_len:
        raise ConfigError("alignment.rollout.kv_cache_tokens", f"must hold one sequence of model.max_seq_len="
                                                               f"{job.model.max_seq_len}, got {r.kv_cache_tokens}")
    if r.replay:
        from orchestrator.config import check_location

        check_location("alignment.rollout.replay", r.replay)
    from orchestrator.alignment import rewards

    fn = rewards.load(a.reward)  # ConfigError when it cannot be imported
    # One number per completion: tried on two made-up completions before anything starts.
    rewards.score(fn, a.reward, ["probe prompt", "probe prompt"], ["probe answer", "other answer"],
                  ["probe answer", "probe answer"])
