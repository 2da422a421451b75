"""The loss pass of a GRPO step: reference log-probs, then `num_iterations` clipped policy updates.

Three log-probs of each sampled token meet here: the sampler's (recorded while sampling: the policy's own
KV-cached decode, or an engine of its own, possibly one step stale), the trainer's (a full forward pass of
the current weights), and the reference's (the same forward with the adapter's contribution scaled to
zero). The clipped ratio is always taken against the trainer's own log-probs from before the step's first
update (recomputed, never the sampler's: a sampler in bf16, or vLLM's kernels, differ from the trainer's
forward by rounding), and where an engine of its own samples, the policy term is reweighted by the
truncated importance ratio trainer/sampler (TRL's `vllm_importance_sampling_correction`): how far the
sampler is from the trainer, per step, is logged as `mismatch_kl` and `mismatch_clip_fraction`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stages.train.config import LossConfig, TrainConfig
from stages.train.data import Rollout
from stages.train.distributed import Distributed
from stages.train.logprobs import PackedBatch, completion_logprobs, completion_logprobs_and_entropy, pack
from stages.train.loss import Denominator, LossParts, engine_importance_weights, grpo_loss, high_entropy_mask
from stages.train.policy import Policy, adapter_scaled_to_zero


@dataclass
class MicroBatch:
    rows: list[int]
    batch: PackedBatch
    advantages: torch.Tensor
    sampled_logp: torch.Tensor  # log-probs recorded while sampling (the behaviour policy)
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None  # the trainer's own, before the step's first update
    sampling_weight: torch.Tensor | None = None  # truncated importance weights trainer/sampler, when on


@dataclass
class UpdateStats:
    """Means over the step's `num_iterations` updates, and the sampler-vs-trainer log-prob drift."""

    loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    grad_norm: float = 0.0
    logprob_drift_mean: float = 0.0  # mean |sampler log p - trainer log p| over sampled tokens
    logprob_drift_max: float = 0.0
    mismatch_kl: float = 0.0  # KL(sampler || trainer) per token, estimated on the sampled tokens (k3)
    mismatch_clip_fraction: float = 0.0  # tokens (or sequences) whose importance weight was truncated or masked


@dataclass(frozen=True)
class SamplerCorrection:
    """How the update reweights samples from a sampler whose log-probs differ from the trainer's:
    `importance_mode`, TRL's truncated importance sampling (None: off), capped at `importance_clip_max`."""

    importance_mode: str | None = None
    importance_clip_max: float = 3.0

    @classmethod
    def of(cls, config: TrainConfig) -> SamplerCorrection:
        mode = config.vllm_importance_sampling_mode if config.importance_correction else None
        return cls(mode, config.vllm_importance_sampling_clip_max)


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


def policy_update(policy: Policy, batches: list[MicroBatch], config: TrainConfig, dist: Distributed) -> UpdateStats:
    """Reference log-probs once (when beta > 0), then num_iterations optimizer updates on the same rollout.

    The ratio's "old" policy is the one that sampled: on policy with one iteration that is the current
    weights (ratio exactly 1); with several iterations or async rollouts, the sampler's log-probs.
    """
    device, loss_config = policy.device, config.loss_config()
    local_tokens = sum(int(mb.batch.completion_mask.sum()) for mb in batches)
    sequences, global_tokens = dist.sum([float(sum(len(mb.rows) for mb in batches)), float(local_tokens)], device)
    if not sequences:  # every row on every rank was left out (skip_zero_std)
        return UpdateStats()
    if dist.sharded:  # every forward pass gathers weights from all ranks: the same number of passes on each
        batches = batches + [idle_batch(policy)] * (int(dist.max(float(len(batches)), device)) - len(batches))
    denominator = Denominator.for_step(
        loss_config.loss_type,
        n_sequences=int(sequences),
        n_tokens_global=int(global_tokens),
        n_tokens_local=local_tokens,
        world_size=dist.world_size,
        max_completion_length=config.sampling.max_new_tokens,
    )
    policy.model.train()
    if loss_config.beta != 0.0:
        reference_logprobs(policy, batches, config.sampling.temperature)
    correction = SamplerCorrection.of(config)
    stats = UpdateStats()
    drift = Drift()
    for iteration in range(config.num_iterations):
        sums = LossSums()
        for i, mb in enumerate(batches):
            parts = _micro_batch_loss(policy, mb, config, loss_config, denominator, correction, drift, iteration)
            policy.backward(parts.loss, last=i == len(batches) - 1)
            sums.add(parts)
        grad_norm = policy.apply_gradients(dist, config.max_grad_norm)
        loss, kl_sum, clipped = dist.sum([sums.loss, sums.kl, sums.clipped_tokens], device)
        n = config.num_iterations
        stats.loss += loss / n
        stats.kl += kl_sum / max(global_tokens, 1) / n
        stats.clip_fraction += clipped / max(global_tokens, 1) / n
        stats.grad_norm += grad_norm / n
    drift_sum, mismatch, clipped, weighed = dist.sum([drift.total, drift.k3, drift.clipped, drift.weighed], device)
    stats.logprob_drift_mean = drift_sum / max(global_tokens, 1)
    stats.logprob_drift_max = dist.max(drift.largest, device)
    stats.mismatch_kl = mismatch / max(global_tokens, 1)
    stats.mismatch_clip_fraction = clipped / max(weighed, 1)
    return stats


def reference_logprobs(policy: Policy, batches: list[MicroBatch], temperature: float) -> None:
    """The base model's log-probs, by the policy's own forward with each LoRA's contribution scaled to
    zero: the same modules, kernels, modes (training, autograd on) and shapes as the update's passes, so
    where the adapter is still zero (LoRA B starts at zero: step 1) the reference equals the policy to the
    last bit on any hardware, and the KL penalty starts from exactly 0."""
    with adapter_scaled_to_zero(policy.model), policy.autocast():
        for mb in batches:
            mb.ref_logp = completion_logprobs(policy.model, mb.batch, temperature).detach()


def idle_batch(policy: Policy) -> MicroBatch:
    """A micro-batch that adds nothing to the loss or its gradient: one padding token, masked out."""
    device, pad = policy.device, policy.generator.pad_id
    batch = pack([[pad]], [[pad]], pad, device)
    batch.completion_mask = torch.zeros_like(batch.completion_mask)
    zero = torch.zeros(1, 1, dtype=torch.float32, device=device)
    return MicroBatch([], batch, torch.zeros(1, device=device), zero)


def _micro_batch_loss(
    policy: Policy,
    mb: MicroBatch,
    config: TrainConfig,
    loss_config: LossConfig,
    denominator: Denominator,
    correction: SamplerCorrection,
    drift: Drift,
    iteration: int,
) -> LossParts:
    """One micro-batch's share of the step's loss, with the trainer's log-probs from a fresh forward pass."""
    temperature = config.sampling.temperature
    logp, entropy_mask = _policy_logprobs(policy.model, mb.batch, temperature, loss_config, policy.autocast)
    mask = mb.batch.completion_mask
    if iteration == 0:  # the weights as the step found them: the old policy of every iteration's ratio
        mb.old_logp = logp.detach()
        drift.add(mb.old_logp, mb.sampled_logp, mask)
        if correction.importance_mode:
            mb.sampling_weight = engine_importance_weights(
                mb.old_logp, mb.sampled_logp, mask, correction.importance_mode, correction.importance_clip_max
            )
            drift.weights(mb.sampling_weight, mb.old_logp, mb.sampled_logp, mask)
    assert mb.old_logp is not None
    return grpo_loss(
        logp, mb.old_logp, mb.ref_logp, mb.advantages, mask, loss_config, denominator, mb.sampling_weight, entropy_mask
    )


@dataclass
class LossSums:
    """The micro-batches' losses and statistics summed over one optimizer update."""

    loss: float = 0.0
    kl: float = 0.0
    clipped_tokens: float = 0.0

    def add(self, parts: LossParts) -> None:
        self.loss += float(parts.loss.detach())
        self.kl += parts.kl_sum
        self.clipped_tokens += parts.clipped_tokens


@dataclass
class Drift:
    """How far the sampler's log-probs are from the trainer's over active tokens: |difference| (sum and
    largest), the k3 estimate of KL(sampler || trainer) (sum), and how many importance weights were cut."""

    total: float = 0.0
    largest: float = 0.0
    k3: float = 0.0
    clipped: float = 0.0  # weights truncated at the cap, or masked out
    weighed: float = 0.0  # weights computed (tokens, or sequences for the sequence modes)

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
        gap = (trainer - sampler) * mask
        self.total += float(gap.abs().sum())
        self.largest = max(self.largest, float(gap.abs().max()) if gap.numel() else 0.0)
        # KL(sampler || trainer) as E_sampler[exp(r) - r - 1], r = log trainer/sampler (k3)
        self.k3 += float(((torch.exp(gap) - gap - 1) * mask).sum())

    def weights(self, weight: torch.Tensor, trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the weights the cap changed: truncated (value below the raw ratio) or masked (set to 0)."""
        sequence = weight.shape[-1] == 1
        raw = torch.exp(((trainer - sampler) * mask).sum(-1, keepdim=True) if sequence else (trainer - sampler))
        counted = torch.ones_like(weight) if sequence else mask
        self.clipped += float(((weight < raw) * counted).sum())
        self.weighed += float(counted.sum())


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
