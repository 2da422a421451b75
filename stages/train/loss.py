"""The GRPO objective: group-relative advantages and the clipped, KL-regularised policy loss.

Everything here is plain tensor math on one micro-batch, so it can be checked by hand (see the tests).
Notation, per completion i of a group g (the G samples of one prompt) and completion token t:

    A_i     = (r_i - mean_g(r)) / (std_g(r) + 1e-4)            scale_rewards="group" (std is unbiased)
              (r_i - mean_g(r)) / (std_batch(r) + 1e-4)        scale_rewards="batch"
              r_i - mean_g(r)                                  scale_rewards="none"
    ratio   = exp(logp_t - logp_old_t)                         importance_sampling_level="token"
              exp(mean_t(logp - logp_old)) for the sequence    importance_sampling_level="sequence" (GSPO)
    P_t     = -min(r * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i)
              with r = ratio, or min(ratio, delta) with `delta` set (two-sided clipping, INTELLECT-2)
    P_t     = -sg(min(ratio, epsilon_high)) * A_i * logp_t               loss_type="cispo" (sg: no gradient)
    P_t     = P_t * m_t    with top_entropy_quantile < 1: m_t = 1 for active tokens whose entropy is at or
                           above that quantile of the micro-batch's active tokens' entropies, else 0
    K_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3 estimate of KL(pi || ref))
              K_t * ratio with use_bias_correction_kl (the ratio is differentiable: it changes the gradient
              even where its value is 1)
    L_t     = P_t + beta * K_t

and the per-token losses L_t over active tokens (mask) are aggregated by `loss_type`:

    grpo     sum_i [ mean_t L_it ] / n_sequences               (mean per sequence, then over sequences)
    bnpo     sum_it L_it / n_tokens_local                      (token mean over this rank's step)
    dapo     sum_it L_it / n_tokens_global                     (token mean over the whole step, all ranks)
    cispo    the same as dapo
    dr_grpo  sum_it L_it / (n_sequences * max_completion_length)

These are TRL 1.16's formulas (`GRPOTrainer._compute_loss`). One difference by design: TRL's bnpo divides
each micro-batch by its own token count, so its loss depends on how a step is split into micro-batches;
here bnpo divides by the rank's whole-step token count, so micro-batching never changes the result (with
one micro-batch per step the two agree).

The denominators count the whole optimizer step (every micro-batch and, except bnpo, every rank), so
summing the micro-batch losses and the ranks' gradients gives exactly the loss of the full batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.train.config import LOSS_TYPES, LossConfig, LossType, ScaleRewards


@dataclass(frozen=True)
class Denominator:
    """What a micro-batch's summed loss is divided by (see the module docstring)."""

    value: float

    @staticmethod
    def for_step(
        loss_type: LossType,
        *,
        n_sequences: int,
        n_tokens_global: int,
        n_tokens_local: int,
        world_size: int,
        max_completion_length: int,
    ) -> Denominator:
        """n_sequences and n_tokens_global count the whole step on all ranks; n_tokens_local this rank."""
        if loss_type == "grpo":
            return Denominator(max(n_sequences, 1))
        if loss_type == "bnpo":
            # a token mean per rank, then the ranks' results are averaged (gradients are summed)
            return Denominator(max(n_tokens_local, 1) * world_size)
        if loss_type in ("dapo", "cispo"):
            return Denominator(max(n_tokens_global, 1))
        if loss_type == "dr_grpo":
            return Denominator(max(n_sequences, 1) * max_completion_length)
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group", batch_std: float | None = None
) -> torch.Tensor:
    """Advantages for rewards laid out group after group (shape [n_groups * group_size]).

    scale="batch" divides by the std of the whole batch: `batch_std` when given (the batch is spread over
    ranks: every rank passes the std of all of them), else the std of `rewards` as given.
    """
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else None
    elif scale == "batch":
        if batch_std is not None:
            return centred / (batch_std + 1e-4)
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else None
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}; choose group, batch or none")
    if std is None:  # a single sample has no spread: nothing to learn from it
        return torch.zeros_like(rewards)
    return centred / (std + 1e-4)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A boolean per group: True where all rewards of the group are equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


@dataclass
class LossParts:
    """One micro-batch's share of an update's loss, and the statistics the step's record sums."""

    loss: torch.Tensor  # the scalar to backpropagate (already divided by the step's denominator)
    kl_sum: float  # sum of per-token KL over active tokens (0 when beta == 0)
    clipped_tokens: float  # active tokens where the clipped term was the one that counted (cispo: capped, A > 0)
    active_tokens: float


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """True on active tokens whose entropy is >= the (1 - quantile) quantile of the active tokens' entropies
    (linear interpolation, torch.quantile): the top `quantile` share by entropy. quantile 0 keeps the
    highest-entropy token(s) only."""
    active = mask.bool()
    if entropies.dtype not in (torch.float32, torch.float64):  # torch.quantile takes these two only
        entropies = entropies.float()
    values = entropies[active]
    if values.numel() == 0:
        return torch.zeros_like(active)
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropies >= threshold) & active


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    denominator: Denominator,
    sampling_weight: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> LossParts:
    """The clipped surrogate + KL penalty for one micro-batch.

    logp, old_logp, ref_logp, mask: [rows, completion_len]; advantages: [rows]. `mask` is 1 on the
    completion tokens that count (up to and including the first end-of-sequence token).
    `sampling_weight` ([rows, len] or [rows, 1]) multiplies the policy term only, as TRL applies its
    engine-mismatch importance sampling (`engine_importance_weights(...).weights`). `entropy_mask` (from
    `high_entropy_mask`, with top_entropy_quantile < 1) restricts the policy term too, not the KL term.
    """
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if config.importance_sampling_level == "sequence":  # GSPO: one length-normalised ratio per sequence
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    if config.loss_type == "cispo":  # the capped ratio is a fixed weight on the plain policy gradient
        per_token = -torch.clamp(ratio, max=config.epsilon_high).detach() * adv * logp
        took_clip = (ratio > config.epsilon_high) & (adv > 0)
    else:
        clipped = torch.clamp(ratio, 1 - config.epsilon, 1 + config.epsilon_high)
        unclipped = ratio if config.delta is None else torch.clamp(ratio, max=config.delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)
        took_clip = (clipped * adv) < (unclipped * adv)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask.to(logp.dtype)
    if sampling_weight is not None:
        per_token = per_token * sampling_weight
    kl = None
    if config.beta != 0.0:
        assert ref_logp is not None, "beta > 0 needs reference log-probs"
        kl = k3(ref_logp - logp)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl
    per_token = per_token.expand_as(mask)

    if config.loss_type == "grpo":
        summed = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    else:
        summed = (per_token * mask).sum()
    with torch.no_grad():
        took_clip = took_clip.expand_as(mask).to(mask.dtype)
        stats = (
            float((kl * mask).sum()) if kl is not None else 0.0,
            float((took_clip * mask).sum()),
            float(mask.sum()),
        )
    return LossParts(summed / denominator.value, *stats)


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - x - 1 for x = log q/p on tokens sampled from p: Schulman's k3 estimate of KL(p || q) per
    token (unbiased, never negative). The loss's KL term takes q the reference and p the policy; the
    sampler-vs-trainer drift takes q the trainer and p the sampler."""
    return torch.exp(log_ratio) - log_ratio - 1


def engine_log_ratio(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(trainer / engine) per token, 0 on inactive tokens, without gradient: how far the log-probs
    the sampler recorded are from the trainer's own."""
    return ((trainer_logp - engine_logp) * mask).detach()


@dataclass(frozen=True)
class ImportanceWeights:
    """TRL's importance weights for sampling with an engine whose log-probs differ from the trainer's."""

    ratio: torch.Tensor  # trainer/engine per token ([rows, len]), or per sequence ([rows, 1])
    weights: torch.Tensor  # the ratio truncated at the cap (`*_truncate`), or 0 above it (`*_mask`)

    @property
    def per_sequence(self) -> bool:
        return self.ratio.shape[-1] == 1

    def capped(self) -> torch.Tensor:
        """True where the cap changed the ratio: truncated (the weight is below the ratio) or masked (0)."""
        return self.weights < self.ratio


def engine_importance_weights(log_ratio: torch.Tensor, mode: str, clip_max: float) -> ImportanceWeights:
    """TRL's correction for sampling with an engine whose log-probs differ from the trainer's, from
    `engine_log_ratio`: ratio = exp(log ratio) per token (`token_*`) or exp(its sum over the sequence)
    (`sequence_*`); `*_truncate` clips it at clip_max, `*_mask` sets ratios above clip_max to 0. No
    gradient flows through it: it reweights samples, it is not optimised.
    """
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        return ImportanceWeights(ratio, torch.clamp(ratio, max=clip_max))
    return ImportanceWeights(ratio, ratio.masked_fill(ratio > clip_max, 0.0))
