"""Training objectives: from one micro-batch's logits to its loss and statistics.

Every alignment-capable engine computes ``objective.loss(logits, batch)`` for each micro-batch,
where ``batch[0]`` is the input ids the model runs on and the rest is what the objective needs.
The loss of a micro-batch is a mean over its rows (sequences, pairs), and every micro-batch of a
step has the same number of rows, so averaging micro-batches and data-parallel ranks gives the
same loss in every layout. Statistics are per micro-batch means (names ending in ``_max``: the
largest value), reduced the same way by ``reduce_stats``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.sft import IGNORE


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token, 0 where the target is IGNORE; the mask of trained
    positions), both (B, T). In float32 whatever the logits' precision."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def pair_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows of B chosen answers then B rejected ones -> (B, 2): each answer's summed
    log-probability over its trained tokens (what DPO's reference holds)."""
    seq = token_logps(logits, targets)[0].sum(-1)
    half = seq.shape[0] // 2
    return torch.stack([seq[:half], seq[half:]], dim=1)


def greedy_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, whether the greedy choice at every trained position is the target (greedy
    decoding then reproduces the reference answer): (B,) float."""
    hit = (logits.argmax(-1) == targets) | (targets == IGNORE)
    return hit.all(dim=1).float()


class LanguageModeling:
    """The data's own next-token loss (pretraining, SFT: the mean over trained tokens)."""

    def loss(self, logits, batch):
        from orchestrator.models import causal_lm_loss

        return causal_lm_loss(logits, batch[1]), {}

    def eval_stats(self, logits, batch) -> dict[str, torch.Tensor]:
        from orchestrator.models import causal_lm_loss

        y = batch[1]
        return {"val_loss": causal_lm_loss(logits, y), "val_exact_match": greedy_hits(logits, y).mean()}


class DPO:
    """Direct preference optimization (Rafailov et al., 2023) with cDPO label smoothing and,
    optionally, RPO's negative log-likelihood of the chosen answers (``sft_weight``), which keeps
    DPO from lowering the likelihood of both answers.

    A batch is (inputs, targets, reference log-probabilities): the B chosen sequences, then the
    B rejected ones, each row's reference value the sum of the frozen reference's log-probabilities
    over its trained (response) tokens. The implicit reward of a response is beta times its
    log-probability ratio to the reference; the loss is -log sigmoid(reward margin)."""

    def __init__(self, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight

    def _parts(self, logits, batch):
        _, y, ref = batch
        logp, mask = token_logps(logits, y)
        seq = logp.sum(-1)
        half = seq.shape[0] // 2
        chosen, rejected = seq[:half], seq[half:]
        reward_c = self.beta * (chosen - ref[:half])
        reward_r = self.beta * (rejected - ref[half:])
        margin = reward_c - reward_r
        eps = self.label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)).mean()
        if self.sft_weight:  # RPO: the chosen answers' negative log-likelihood per token, per pair
            nll = -chosen / mask[:half].sum(-1).clamp(min=1)
            loss = loss + self.sft_weight * nll.mean()
        return loss, chosen, rejected, reward_c, reward_r, margin

    def loss(self, logits, batch):
        loss, chosen, rejected, reward_c, reward_r, margin = self._parts(logits, batch)
        stats = {
            "alignment.reward_accuracy": (margin > 0).float().mean(),
            "alignment.reward_margin": margin.mean(),
            "alignment.reward_chosen": reward_c.mean(),
            "alignment.reward_rejected": reward_r.mean(),
            "alignment.logp_chosen": chosen.mean(),
            "alignment.logp_rejected": rejected.mean(),
        }
        return loss, {k: v.detach() for k, v in stats.items()}

    def eval_stats(self, logits, batch) -> dict[str, torch.Tensor]:
        loss, _, _, _, _, margin = self._parts(logits, batch)
        half = logits.shape[0] // 2
        return {"val_loss": loss, "val_preference_accuracy": (margin > 0).float().mean(),
                "val_reward_margin": margin.mean(),
                # the chosen answers are the right ones: greedy decoding reproduces them or not
                "val_exact_match": greedy_hits(logits[:half], batch[1][:half]).mean()}


class GRPO:
    """Group relative policy optimization (Shao et al., 2024): a PPO-style clipped surrogate with
    group-normalized advantages and no value model.

    A batch is (inputs, targets, rollout log-probabilities, advantages, reference log-probabilities):
    targets IGNORE outside each sample's completion, the log-probabilities (B, T) aligned with the
    targets, one advantage per row, and the reference's log-probabilities where ``kl_coef`` > 0
    (else an empty tensor). Per token: -min(r A, clip(r, 1 - eps, 1 + eps) A) + kl_coef * KL,
    with r the probability ratio to the rollout's and KL the k3 estimator of KL(policy || reference);
    averaged over each completion's tokens, then over the rows."""

    def __init__(self, clip_eps: float, kl_coef: float):
        self.clip_eps = clip_eps
        self.kl_coef = kl_coef

    def loss(self, logits, batch):
        _, y, old, advantages, ref = batch
        logp, mask = token_logps(logits, y)
        maskf = mask.float()
        delta = (logp - old) * maskf
        ratio = torch.exp(delta)
        adv = advantages.unsqueeze(1)
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - self.clip_eps, 1 + self.clip_eps) * adv)
        per_token = -surrogate
        n_tokens = maskf.sum().clamp(min=1)
        stats = {}
        if self.kl_coef > 0:
            d = (ref - logp) * maskf
            kl = torch.exp(d) - d - 1
            per_token = per_token + self.kl_coef * kl
            stats["alignment.kl"] = ((kl * maskf).sum() / n_tokens).detach()
        per_row = (per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)
        clipped = ((ratio - 1).abs() > self.clip_eps) & mask
        stats["alignment.clip_fraction"] = (clipped.float().sum() / n_tokens).detach()
        # Before the update the policy is the rollout's: the gap is what the two computations of
        # the same log-probabilities disagree by (a silent mismatch is a classic RL bug).
        stats["alignment.logprob_diff_max"] = delta.abs().max().detach()
        return per_row.mean(), stats

    def eval_stats(self, logits, batch) -> dict[str, torch.Tensor]:
        """Held out: the reference answers' loss and greedy exact match (SFT rows)."""
        return LanguageModeling().eval_stats(logits, batch)


def reduce_stats(per_micro_batch: list[dict[str, torch.Tensor]], group) -> dict[str, float]:
    """Mean over micro-batches and the group's ranks (``_max`` names: the largest), as floats."""
    import torch.distributed as dist

    if not per_micro_batch or not per_micro_batch[0]:
        return {}
    out = {}
    for key in per_micro_batch[0]:
        values = torch.stack([s[key].float() for s in per_micro_batch])
        largest = key.endswith("_max")
        value = values.max() if largest else values.mean()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM, group=group)
            if not largest:
                value /= dist.get_world_size(group)
        out[key] = float(value)
    return out


def objective_of(alignment) -> "LanguageModeling | DPO | GRPO":
    if alignment is None or alignment.method == "none":
        return LanguageModeling()
    if alignment.method == "dpo":
        return DPO(alignment.beta, alignment.label_smoothing, alignment.sft_weight)
    return GRPO(alignment.clip_eps, alignment.kl_coef)
