"""The loss pass of a GRPO step: reference log-probs, then `num_iterations` clipped policy updates."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stages.train.distributed import Distributed
from stages.train.logprobs import PackedBatch, completion_logprobs, completion_logprobs_and_entropy, pack
from stages.train.loss import Denominator, LossConfig, engine_importance_weights, grpo_loss, high_entropy_mask
from stages.train.rollout import Rollout


@dataclass
class MicroBatch:
    rows: list[int]
    batch: PackedBatch
    advantages: torch.Tensor
    sampled_logp: torch.Tensor  # log-probs recorded while sampling (old policy for num_iterations > 1)
    ref_logp: torch.Tensor | None = None
    sampling_weight: torch.Tensor | None = None  # engine-mismatch importance weights, when asked for


@dataclass
class UpdateStats:
    """Means over the step's `num_iterations` updates, and the sampler-vs-trainer log-prob drift."""

    loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    grad_norm: float = 0.0
    logprob_drift_mean: float = 0.0  # mean |engine log p - trainer log p| over sampled tokens
    logprob_drift_max: float = 0.0


@dataclass(frozen=True)
class SamplerCorrection:
    """How the update treats samples from an engine other than the policy itself.

    `behaviour_old`: the clipped ratio is taken against the sampler's log-probs (async rollouts sample
    with the previous adapter). `importance_mode`: TRL's engine-mismatch importance sampling (None: off).
    """

    behaviour_old: bool = False
    importance_mode: str | None = None
    importance_clip_max: float = 3.0


def micro_batches(
    rollout: Rollout, *, size: int, pad_id: int, device: torch.device, mask_truncated: bool
) -> list[MicroBatch]:
    batches = []
    for start in range(0, len(rollout.keep), size):
        rows = rollout.keep[start : start + size]
        samples = [rollout.samples[r] for r in rows]
        batch = pack(
            [rollout.prompts[r // rollout.group_size].ids for r in rows], [s.token_ids for s in samples], pad_id, device
        )
        if mask_truncated:  # a completion cut at the length limit says nothing about how it would have ended
            finished = torch.tensor([s.finished for s in samples], device=device)
            batch.completion_mask = batch.completion_mask * finished[:, None]
        sampled = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        for i, sample in enumerate(samples):
            sampled[i, : len(sample.logprobs)] = torch.tensor(sample.logprobs)
        batches.append(MicroBatch(rows, batch, rollout.advantages[rows].to(device), sampled.to(device)))
    return batches


def policy_update(
    model: Any,
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batches: list[MicroBatch],
    *,
    loss_config: LossConfig,
    num_iterations: int,
    temperature: float,
    max_grad_norm: float,
    max_completion_length: int,
    dist: Distributed,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
    correction: SamplerCorrection = SamplerCorrection(),
) -> UpdateStats:
    """Reference log-probs once (when beta > 0), then num_iterations optimizer updates on the same rollout.

    The ratio's "old" policy is the one that sampled: on policy with one iteration that is the current
    weights (ratio exactly 1); with several iterations or async rollouts, the sampler's log-probs.
    """
    local_tokens = sum(int(mb.batch.completion_mask.sum()) for mb in batches)
    sequences, global_tokens = dist.sum([float(sum(len(mb.rows) for mb in batches)), float(local_tokens)], device)
    denominator = Denominator.for_step(
        loss_config.loss_type,
        n_sequences=int(sequences),
        n_tokens_global=int(global_tokens),
        n_tokens_local=local_tokens,
        world_size=dist.world_size,
        max_completion_length=max_completion_length,
    )
    if loss_config.beta != 0.0:
        with torch.no_grad(), model.disable_adapter(), autocast():
            for mb in batches:
                mb.ref_logp = completion_logprobs(model, mb.batch, temperature)

    stats = UpdateStats()
    drift = [0.0, 0.0]  # sum and max of |sampler - trainer| log-prob over active tokens
    model.train()
    for iteration in range(num_iterations):
        totals = [0.0, 0.0, 0.0]  # loss, kl sum, clipped tokens
        for mb in batches:
            logp, entropy_mask = _policy_logprobs(model, mb.batch, temperature, loss_config, autocast)
            mask = mb.batch.completion_mask
            if iteration == 0:
                _add_drift(drift, logp.detach(), mb.sampled_logp, mask)
                if correction.importance_mode:
                    mb.sampling_weight = engine_importance_weights(
                        logp, mb.sampled_logp, mask, correction.importance_mode, correction.importance_clip_max
                    )
            old = mb.sampled_logp if num_iterations > 1 or correction.behaviour_old else logp.detach()
            parts = grpo_loss(
                logp, old, mb.ref_logp, mb.advantages, mask, loss_config, denominator, mb.sampling_weight, entropy_mask
            )
            parts.loss.backward()
            totals[0] += float(parts.loss.detach())
            totals[1] += parts.kl_sum
            totals[2] += parts.clipped_tokens
        dist.sum_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, kl_sum, clipped = dist.sum(totals, device)
        stats.loss += loss / num_iterations
        stats.kl += kl_sum / max(global_tokens, 1) / num_iterations
        stats.clip_fraction += clipped / max(global_tokens, 1) / num_iterations
        stats.grad_norm += float(grad_norm) / num_iterations
    (drift_sum,) = dist.sum([drift[0]], device)
    stats.logprob_drift_mean = drift_sum / max(global_tokens, 1)
    stats.logprob_drift_max = dist.max(drift[1], device)
    return stats


def _policy_logprobs(
    model: Any,
    batch: PackedBatch,
    temperature: float,
    loss_config: LossConfig,
    autocast: Callable[[], contextlib.AbstractContextManager[None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's completion log-probs, and the high-entropy token mask when the loss trains on those only."""
    with autocast():
        if loss_config.top_entropy_quantile >= 1.0:
            return completion_logprobs(model, batch, temperature), None
        logp, entropy = completion_logprobs_and_entropy(model, batch, temperature)
    # TRL takes the quantile over each micro-batch's own tokens.
    return logp, high_entropy_mask(entropy, batch.completion_mask, loss_config.top_entropy_quantile)


def _add_drift(drift: list[float], trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
    gap = (trainer - sampler).abs() * mask
    drift[0] += float(gap.sum())
    drift[1] = max(drift[1], float(gap.max()) if gap.numel() else 0.0)
