"""One GRPO step on one page: `grpo_step`, then the code of each of its phases in the order they run.

  1. sample: this rank's prompts, G completions of each (stages/train/rollouts.py);
  2. reward each completion against its prompt's references (the run's Scorer);
  3. group-relative advantages (stages/train/loss.py);
  4. the rows that count, packed into micro-batches (stages/train/batches.py);
  5. once, before any update, into an immutable `LossInputs` per micro-batch: the reference's log-probs
     (the policy with its adapter scaled to zero), the trainer's own log-probs (the ratio's old policy)
     and the importance weights trainer/sampler;
  6. `num_iterations` optimizer updates on those inputs (the loss: stages/train/loss.py; the backward
     pass and the optimizer step: stages/train/policy.py);
  7. publish the adapter to an engine of its own; 8. the step's record, over every rank
     (stages/train/step_metrics.py).

Three log-probs of each sampled token meet here: the sampler's (recorded while sampling: the policy's own
KV-cached decode, or an engine of its own, with async rollouts one step stale), the trainer's (a full
forward pass of the current weights) and the reference's. The clipped ratio's old policy is the trainer's
own forward before the step's first update, never the sampler's: a sampler in bf16, or vLLM's kernels,
differ from the trainer's forward by rounding. That forward is the very computation the first update
repeats (training mode, autocast, autograd on), so on the first update the ratio is exactly 1 (with
lora_dropout 0, the default: each pass draws its own dropout mask). It costs one forward pass per
micro-batch per step, the price of fixing every input before the first update. Where the importance
correction is on (by default where an engine of its own samples), the policy term is reweighted by the
truncated ratio trainer/sampler (TRL's `vllm_importance_sampling_correction`); how far the sampler is from
the trainer is logged every step as `logprob_drift_*`, `mismatch_kl` and `mismatch_clip_fraction`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stages.engines.base import Sample
from stages.engines.generator import Generator
from stages.metrics.python import RewardFunctionError
from stages.score import Scorer
from stages.train.batches import MicroBatch, idle_batch, micro_batches
from stages.train.config import LossConfig, TrainConfig
from stages.train.data import Rollout, TrainPrompt
from stages.train.distributed import Distributed
from stages.train.logprobs import PackedBatch, completion_logprobs, completion_logprobs_and_entropy
from stages.train.loss import (
    Denominator,
    ImportanceWeights,
    LossParts,
    engine_importance_weights,
    engine_log_ratio,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    k3,
    zero_std_groups,
)
from stages.train.policy import Policy, adapter_scaled_to_zero
from stages.train.step_metrics import Stopwatch, UpdateStats, judge_fields, step_record

if TYPE_CHECKING:
    from stages.train.setup import TrainRun


def grpo_step(run: TrainRun, step: int) -> dict[str, Any]:
    """One GRPO step (0-based `step`) on this rank; returns the step's metrics over every rank."""
    config, policy, dist, device = run.config, run.policy, run.dist, run.policy.device
    clock = Stopwatch()
    # 1. this rank's prompts, and G samples of each (from the policy, or an engine on the newest adapter)
    prompts = run.plan.items_at(step)
    samples = run.rollouts.samples(step)
    clock.lap("sample")
    # 2-3. rewards against the references, then group-relative advantages
    judge_before = run.scorer.usage()
    rollout = score_rollout(
        policy.generator,
        run.scorer,
        prompts,
        samples,
        group_size=config.num_generations,
        scale_rewards=config.scale_rewards,
        skip_zero_std=config.skip_zero_std,
        dist=dist,
        device=device,
    )
    clock.lap("score")
    # 4. micro-batches of the rows that count
    batches = micro_batches(
        rollout,
        size=config.micro_batch or config.per_device_train_batch_size,
        pad_id=policy.generator.pad_id,
        device=device,
        mask_truncated=config.mask_truncated,
    )
    # 5-6. the fixed inputs, then the updates: every rank, even one whose rows were all left out
    update = policy_update(policy, batches, config, dist)
    clock.lap("update")
    # 7. an engine of its own samples the next step with the adapter as it is now
    run.rollouts.publish(policy.model, step + 1)
    # 8. the record
    record = step_record(rollout, update, dist, device, clock.laps)
    judge = judge_fields(run.scorer, judge_before, dist, device)
    return {**record, **judge, "reward_combine": config.reward_combine}


# --- 2-3. rewards and advantages -----------------------------------------------------------------------------


def score_rollout(
    generator: Generator,
    scorer: Scorer,
    prompts: list[TrainPrompt],
    samples: list[Sample],
    *,
    group_size: int,
    scale_rewards: str,
    skip_zero_std: bool,
    dist: Distributed,
    device: torch.device | None = None,
) -> Rollout:
    """Each group's completions scored against its prompt's references, and their advantages (with
    scale_rewards="batch" the std is that of the whole batch on every rank). A reward function's error
    stops every rank at this step (they agree on it before any other collective). `device` is where the
    ranks' collectives run (the policy's: a CUDA device under nccl); default the CPU."""
    device = device or torch.device("cpu")
    completions = [generator.decode(s.token_ids) for s in samples]
    groups = [completions[i * group_size : (i + 1) * group_size] for i in range(len(prompts))]
    scorer.prefetch([(group, p.references, p.messages, p.record) for group, p in zip(groups, prompts)])
    failed: RewardFunctionError | None = None
    try:
        parts, combined = _group_rewards(scorer, prompts, samples, completions, group_size)
    except RewardFunctionError as error:
        failed = error
    if dist.enabled and dist.sum([float(failed is not None)], device)[0]:
        failed = failed or RewardFunctionError("a reward function failed on another rank (its message is there)")
    if failed is not None:
        raise failed
    rewards = torch.tensor(combined, dtype=torch.float32)
    batch_std = dist.mean_std(combined, device)[1] if scale_rewards == "batch" and dist.enabled else None
    advantages = group_advantages(rewards, group_size, scale_rewards, batch_std)  # type: ignore[arg-type]
    zero_std = zero_std_groups(rewards, group_size)
    keep = [row for row in range(len(samples)) if not (skip_zero_std and bool(zero_std[row // group_size]))]
    return Rollout(prompts, samples, completions, rewards, parts, advantages, zero_std, group_size, keep)


def _group_rewards(
    scorer: Scorer, prompts: list[TrainPrompt], samples: list[Sample], completions: list[str], group_size: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Per metric, the values given (a None left out, as TRL's nanmean logs it), and the reward per sample: a
    None counts as NaN in TRL's nansum over reward functions, so a sample no reward scored gets 0."""
    parts: dict[str, list[float]] = {}
    combined: list[float] = []
    for i, prompt in enumerate(prompts):
        rows = slice(i * group_size, (i + 1) * group_size)
        ids = [s.token_ids for s in samples[rows]]
        scores = scorer.score(
            completions[rows], prompt.references, messages=prompt.messages, record=prompt.record, completion_ids=ids
        )
        for name, values in scores.items():
            parts.setdefault(name, []).extend(v for v in values if v is not None)
        combined.extend(0.0 if v is None else v for v in scores[scorer.score_key])
    return parts, combined


# --- 5-6. the loss inputs, then the updates ------------------------------------------------------------------


def policy_update(policy: Policy, batches: list[MicroBatch], config: TrainConfig, dist: Distributed) -> UpdateStats:
    """Steps 5 and 6: the loss inputs fixed once (reference log-probs when beta > 0, the trainer's own
    log-probs as the ratio's old policy, the importance weights trainer/sampler when the correction is on),
    then `num_iterations` optimizer updates on them; returns their statistics over every rank."""
    device, loss_config, temperature = policy.device, config.loss_config(), config.sampling.temperature
    local_tokens = sum(int(mb.batch.completion_mask.sum()) for mb in batches)
    sequences, global_tokens = dist.sum([float(sum(len(mb.rows) for mb in batches)), float(local_tokens)], device)
    if not sequences:  # every row on every rank was left out (skip_zero_std)
        return UpdateStats.none()
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
    # 5. once, before any update
    inputs = loss_inputs(policy, batches, loss_config, temperature)
    # 6. num_iterations updates on the same inputs
    updates = [
        optimizer_update(policy, inputs, loss_config, denominator, temperature, dist, config.max_grad_norm)
        for _ in range(config.num_iterations)
    ]
    return update_stats(updates, inputs, global_tokens, dist, device)


# --- 5. the loss inputs, fixed before the first update -------------------------------------------------------


@dataclass(frozen=True)
class LossInputs:
    """A micro-batch's inputs to every update of the step, computed once before the first update."""

    batch: PackedBatch
    advantages: torch.Tensor  # [rows]
    old_logp: torch.Tensor  # the trainer's own, before the step's first update: the ratio's old policy
    ref_logp: torch.Tensor | None  # the policy with its adapter scaled to zero (None: beta 0, no KL term)
    sampler_log_ratio: torch.Tensor  # log(trainer / sampler) per active token: how far the sampler is off
    importance: ImportanceWeights | None  # trainer/sampler, truncated (None: the correction is off)

    @property
    def sampling_weight(self) -> torch.Tensor | None:
        return None if self.importance is None else self.importance.weights


def loss_inputs(
    policy: Policy, batches: list[MicroBatch], loss_config: LossConfig, temperature: float
) -> list[LossInputs]:
    """Every micro-batch's `LossInputs`: the reference pass over all of them (when beta > 0), then the
    trainer's own pass, then the importance weights (when the correction is on)."""
    references: list[torch.Tensor | None] = [None] * len(batches)
    if loss_config.beta != 0.0:
        with adapter_scaled_to_zero(policy.model):
            references = [detached_logprobs(policy, mb.batch, temperature) for mb in batches]
    inputs = []
    for mb, reference in zip(batches, references):
        old = detached_logprobs(policy, mb.batch, temperature)
        log_ratio = engine_log_ratio(old, mb.sampled_logp, mb.batch.completion_mask)
        importance = None
        if loss_config.importance_mode:
            importance = engine_importance_weights(
                log_ratio, loss_config.importance_mode, loss_config.importance_clip_max
            )
        inputs.append(LossInputs(mb.batch, mb.advantages, old, reference, log_ratio, importance))
    return inputs


def detached_logprobs(policy: Policy, batch: PackedBatch, temperature: float) -> torch.Tensor:
    """The policy's completion log-probs by the very forward pass an update runs (same modules, kernels,
    training mode, autocast, autograd on), detached. Under `adapter_scaled_to_zero` it is the reference:
    where the adapter is still zero (LoRA B starts at zero: step 1) the reference equals the policy to the
    last bit on any hardware, and the KL penalty starts from exactly 0. Without it, it is the old policy
    of the step's ratio, equal to the first update's own log-probs to the last bit (the ratio is 1)."""
    with policy.autocast():
        return completion_logprobs(policy.model, batch, temperature).detach()


# --- 6. one optimizer update ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """One optimizer update: its loss, KL and clipped tokens summed over every rank, its gradient norm."""

    loss: float
    kl_sum: float
    clipped_tokens: float
    grad_norm: float


def optimizer_update(
    policy: Policy,
    inputs: list[LossInputs],
    loss_config: LossConfig,
    denominator: Denominator,
    temperature: float,
    dist: Distributed,
    max_grad_norm: float,
) -> Update:
    """A forward and backward pass per micro-batch (their gradients summed), then one optimizer step."""
    loss = kl_sum = clipped = 0.0
    for i, mb in enumerate(inputs):
        parts = micro_batch_loss(policy, mb, loss_config, denominator, temperature)
        policy.backward(parts.loss, last=i == len(inputs) - 1)
        loss += float(parts.loss.detach())
        kl_sum += parts.kl_sum
        clipped += parts.clipped_tokens
    grad_norm = policy.apply_gradients(dist, max_grad_norm)
    loss, kl_sum, clipped = dist.sum([loss, kl_sum, clipped], policy.device)
    return Update(loss, kl_sum, clipped, grad_norm)


def micro_batch_loss(
    policy: Policy, inputs: LossInputs, loss_config: LossConfig, denominator: Denominator, temperature: float
) -> LossParts:
    """One micro-batch's share of an update's loss: the trainer's log-probs from a fresh forward pass (with
    their gradient), against the step's fixed inputs."""
    logp, entropy_mask = _policy_logprobs(policy.model, inputs.batch, temperature, loss_config, policy.autocast)
    mask = inputs.batch.completion_mask
    return grpo_loss(
        logp,
        inputs.old_logp,
        inputs.ref_logp,
        inputs.advantages,
        mask,
        loss_config,
        denominator,
        inputs.sampling_weight,
        entropy_mask,
    )


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


def update_stats(
    updates: list[Update], inputs: list[LossInputs], tokens: float, dist: Distributed, device: torch.device
) -> UpdateStats:
    """The updates' means, with KL and clipping per token of the step (`tokens`, every rank's), and the
    drift of the step's inputs over every rank."""
    n, per_token = len(updates), max(tokens, 1)
    total, largest, mismatch, capped, weighed = sampler_drift(inputs)
    total, mismatch, capped, weighed = dist.sum([total, mismatch, capped, weighed], device)
    return UpdateStats(
        loss=sum((u.loss / n for u in updates), 0.0),
        kl=sum((u.kl_sum / per_token / n for u in updates), 0.0),
        clip_fraction=sum((u.clipped_tokens / per_token / n for u in updates), 0.0),
        grad_norm=sum((u.grad_norm / n for u in updates), 0.0),
        logprob_drift_mean=total / per_token,
        logprob_drift_max=dist.max(largest, device),
        mismatch_kl=mismatch / per_token,
        mismatch_clip_fraction=capped / max(weighed, 1),
    )


def sampler_drift(inputs: list[LossInputs]) -> tuple[float, float, float, float, float]:
    """How far the sampler's log-probs are from the trainer's over this rank's active tokens: |log ratio|
    summed and largest, the k3 estimate of KL(sampler || trainer) summed, and how many importance weights
    the cap changed out of how many were computed (tokens, or sequences for the sequence modes)."""
    total = largest = mismatch = capped = weighed = 0.0
    for mb in inputs:
        gap, mask = mb.sampler_log_ratio, mb.batch.completion_mask
        total += float(gap.abs().sum())
        largest = max(largest, float(gap.abs().max()) if gap.numel() else 0.0)
        mismatch += float((k3(gap) * mask).sum())
        if mb.importance is not None:
            counted = torch.ones_like(mb.importance.ratio) if mb.importance.per_sequence else mask
            capped += float((mb.importance.capped() * counted).sum())
            weighed += float(counted.sum())
    return total, largest, mismatch, capped, weighed
