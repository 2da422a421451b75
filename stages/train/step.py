"""One GRPO step: sample, score, update, and the metrics that describe it."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from stages.engines.base import Sample
from stages.train.distributed import Distributed
from stages.train.rollout import Rollout, sample_rollout, score_rollout
from stages.train.update import SamplerCorrection, UpdateStats, micro_batches, policy_update

if TYPE_CHECKING:
    from stages.train.setup import TrainRun


def grpo_step(run: TrainRun, step: int) -> dict[str, Any]:
    """Sample G completions per prompt, reward them, and update the policy; returns the step's metrics."""
    config = run.config
    t0 = time.perf_counter()
    samples = run.rollouts.samples(step, lambda s: _sample(run, s), last_step=run.steps)
    prompts = [run.prompts[i] for i in run.step_share(step)[0]]
    t1 = time.perf_counter()
    rollout = score_rollout(
        run.generator,
        run.scorer,
        prompts,
        samples,
        group_size=config.num_generations,
        scale_rewards=config.scale_rewards,
        skip_zero_std=config.skip_zero_std,
        dist=run.dist,
    )
    t2 = time.perf_counter()
    batches = micro_batches(
        rollout,
        size=config.micro_batch or config.per_device_train_batch_size,
        pad_id=run.generator.pad_id,
        device=run.device,
        mask_truncated=config.mask_truncated,
    )
    update = None
    if batches:
        update = policy_update(
            run.model,
            run.trainable,
            run.optimizer,
            batches,
            loss_config=run.loss_config,
            num_iterations=config.num_iterations,
            temperature=config.temperature,
            max_grad_norm=config.max_grad_norm,
            max_completion_length=config.max_completion_length,
            dist=run.dist,
            device=run.device,
            autocast=run.autocast,
            correction=SamplerCorrection(
                behaviour_old=config.async_rollouts,
                importance_mode=config.vllm_importance_sampling_mode
                if config.vllm_importance_sampling_correction
                else None,
                importance_clip_max=config.vllm_importance_sampling_clip_max,
            ),
        )
    t3 = time.perf_counter()
    seconds = {"sample": t1 - t0, "score": t2 - t1, "update": t3 - t2}
    return _step_record(rollout, update, run.dist, run.device, seconds)


def _sample(run: TrainRun, step: int) -> list[Sample]:
    """G samples for each of this rank's prompts at `step`, seeded by (seed, step, global position, k)."""
    picked, positions = run.step_share(step)
    with run.autocast():
        return sample_rollout(
            run.generator,
            [run.prompts[i] for i in picked],
            positions,
            step=step,
            seed=run.config.seed,
            group_size=run.config.num_generations,
            sampling=run.sampling,
            prompts_per_batch=run.config.per_device_train_batch_size // run.config.num_generations,
        )


def _mean_std(values: list[float], dist: Distributed, device: torch.device) -> tuple[float, float]:
    total, total_sq, count = dist.sum([sum(values), sum(v * v for v in values), float(len(values))], device)
    if count == 0:
        return 0.0, 0.0
    mean = total / count
    variance = max(total_sq - total * mean, 0.0) / (count - 1) if count > 1 else 0.0
    return mean, math.sqrt(variance)


def _step_record(
    rollout: Rollout,
    update: UpdateStats | None,
    dist: Distributed,
    device: torch.device,
    seconds: dict[str, float],
) -> dict[str, Any]:
    rewards = rollout.rewards.tolist()
    reward_mean, reward_std = _mean_std(rewards, dist, device)
    per_metric = {}
    for name, values in rollout.reward_parts.items():
        mean, std = _mean_std(values, dist, device)
        per_metric[name] = {"mean": round(mean, 6), "std": round(std, 6)}
    lengths = [float(len(s.token_ids)) for s in rollout.samples]
    truncated = [0.0 if s.finished else 1.0 for s in rollout.samples]
    n, length_sum, trunc_sum, zero_groups, groups, new_tokens = dist.sum(
        [
            float(len(lengths)),
            sum(lengths),
            sum(truncated),
            float(rollout.zero_std.sum()),
            float(rollout.zero_std.numel()),
            sum(lengths),
        ],
        device,
    )
    length_max = dist.max(max(lengths) if lengths else 0.0, device)
    _, adv_std = _mean_std(rollout.advantages.tolist(), dist, device)
    total_seconds = sum(seconds.values())
    return {
        "reward_mean": round(reward_mean, 6),
        "reward_std": round(reward_std, 6),
        "rewards": per_metric,
        "advantage_std": round(adv_std, 6),
        "zero_std_groups": round(zero_groups / max(groups, 1), 4),
        "kl": round(update.kl, 8) if update else 0.0,
        "loss": round(update.loss, 8) if update else 0.0,
        "clip_fraction": round(update.clip_fraction, 6) if update else 0.0,
        "logprob_drift_mean": round(update.logprob_drift_mean, 6) if update else 0.0,
        "logprob_drift_max": round(update.logprob_drift_max, 6) if update else 0.0,
        "grad_norm": round(update.grad_norm, 6) if update else 0.0,
        "completion_length_mean": round(length_sum / max(n, 1), 2),
        "completion_length_max": int(length_max),
        "truncation_rate": round(trunc_sum / max(n, 1), 4),
        "sample_seconds": round(seconds["sample"], 4),
        "score_seconds": round(seconds["score"], 4),
        "update_seconds": round(seconds["update"], 4),
        "tokens_per_second": round(new_tokens / max(total_seconds, 1e-9), 1),
    }
