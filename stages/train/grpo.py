"""One GRPO step, top to bottom: prompts -> samples -> rewards -> advantages -> micro-batches -> policy
update -> publish the adapter -> the step's record. The loss math is in stages/train/loss.py."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from stages.engines.base import Sample
from stages.engines.generator import Generator
from stages.metrics.base import Usage
from stages.metrics.python import RewardFunctionError
from stages.score import Scorer
from stages.train.data import Rollout, TrainPrompt
from stages.train.distributed import Distributed
from stages.train.loss import group_advantages, zero_std_groups
from stages.train.update import UpdateStats, micro_batches, policy_update

if TYPE_CHECKING:
    from stages.train.config import TrainConfig
    from stages.train.setup import TrainRun


def items(prompts: list[TrainPrompt], generator: Generator, config: TrainConfig) -> list[TrainPrompt]:
    """What GRPO steps draw from: the prompts themselves, each sampled num_generations times."""
    return prompts


def step(run: TrainRun, index: int) -> dict[str, Any]:
    return grpo_step(run, index)


def grpo_step(run: TrainRun, step: int) -> dict[str, Any]:
    """Sample G completions per prompt, reward them, update the policy; returns the step's metrics."""
    config, policy, dist = run.config, run.policy, run.dist
    clock = Stopwatch()
    # 1-2. this rank's prompts, and G samples of each (from the policy, or an engine on the newest adapter)
    prompts = run.plan.items_at(step)
    samples = run.rollouts.samples(step)
    clock.lap("sample")
    # 3-4. rewards against the references, then group-relative advantages
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
        device=policy.device,
    )
    clock.lap("score")
    # 5-6. micro-batches of the rows that count, then reference log-probs and the clipped updates
    batches = micro_batches(
        rollout,
        size=config.micro_batch or config.per_device_train_batch_size,
        pad_id=policy.generator.pad_id,
        device=policy.device,
        mask_truncated=config.mask_truncated,
    )
    update = policy_update(policy, batches, config, dist)  # every rank, even one whose rows were all left out
    clock.lap("update")
    # 7. an engine of its own samples the next step with the adapter as it is now
    run.rollouts.publish(policy.model, step + 1)
    # 8. the record
    record = step_record(rollout, update, dist, policy.device, clock.laps)
    judge = judge_fields(run.scorer, judge_before, dist, policy.device)
    return {**record, **judge, "reward_combine": config.reward_combine}


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


class Stopwatch:
    """Seconds per phase of a step."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def step_record(
    rollout: Rollout, update: UpdateStats, dist: Distributed, device: torch.device, seconds: dict[str, float]
) -> dict[str, Any]:
    """The step's metrics over all ranks: rewards, advantages, the update's loss, KL and drift, lengths, time."""
    reward_mean, reward_std = dist.mean_std(rollout.rewards.tolist(), device)
    per_metric = {}
    for name, values in rollout.reward_parts.items():
        mean, std = dist.mean_std(values, device)
        given = dist.sum([float(len(values))], device)[0]  # none at all (a py: None, a judge's null): no mean, not 0
        per_metric[name] = {"mean": round(mean, 6), "std": round(std, 6)} if given else {"mean": None, "std": None}
    lengths = [float(len(s.token_ids)) for s in rollout.samples]
    truncated = [0.0 if s.finished else 1.0 for s in rollout.samples]
    n, length_sum, trunc_sum, zero_groups, groups = dist.sum(
        [
            float(len(lengths)),
            sum(lengths),
            sum(truncated),
            float(rollout.zero_std.sum()),
            float(rollout.zero_std.numel()),
        ],
        device,
    )
    length_max = dist.max(max(lengths) if lengths else 0.0, device)
    _, adv_std = dist.mean_std(rollout.advantages.tolist(), device)
    return {
        "reward_mean": round(reward_mean, 6),
        "reward_std": round(reward_std, 6),
        "rewards": per_metric,
        "advantage_std": round(adv_std, 6),
        "zero_std_groups": round(zero_groups / max(groups, 1), 4),
        "kl": round(update.kl, 8),
        "loss": round(update.loss, 8),
        "clip_fraction": round(update.clip_fraction, 6),
        "logprob_drift_mean": round(update.logprob_drift_mean, 6),
        "logprob_drift_max": round(update.logprob_drift_max, 6),
        "mismatch_kl": round(update.mismatch_kl, 8),
        "mismatch_clip_fraction": round(update.mismatch_clip_fraction, 6),
        "grad_norm": round(update.grad_norm, 6),
        "completion_length_mean": round(length_sum / max(n, 1), 2),
        "completion_length_max": int(length_max),
        "truncation_rate": round(trunc_sum / max(n, 1), 4),
        "sample_seconds": round(seconds["sample"], 4),
        "score_seconds": round(seconds["score"], 4),
        "update_seconds": round(seconds["update"], 4),
        "tokens_per_second": round(length_sum / max(sum(seconds.values()), 1e-9), 1),
    }


# --- the judge's counters per step (judge-url rewards) ----------------------------------------------------


def judge_fields(scorer: Scorer, before: Usage | None, dist: Distributed, device: torch.device) -> dict[str, Any]:
    """What the step's judge rewards cost: requests sent, answers from the cache, completions left without a
    score (null), summed over ranks, and the judge's seconds on the slowest rank. Empty without a judge."""
    after = scorer.usage()
    if after is None or before is None:
        return {}
    step = after - before
    requests, hits, nulls = dist.sum([float(step.requests), float(step.cache_hits), float(step.nulls)], device)
    return {
        "judge_requests": int(requests),
        "judge_cache_hits": int(hits),
        "judge_nulls": int(nulls),
        "judge_seconds": round(dist.max(step.seconds, device), 4),
    }
