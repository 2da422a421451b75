"""A GRPO step's record (one line of metrics.jsonl): its rewards, advantages, the update's statistics,
lengths and seconds, and the judge's counters, each over every rank (stages/train/grpo.py writes it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from stages.metrics.base import Usage
from stages.score import Scorer
from stages.train.data import Rollout
from stages.train.distributed import Distributed


class Stopwatch:
    """Seconds per phase of a step."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


@dataclass(frozen=True)
class UpdateStats:
    """Means over the step's `num_iterations` updates, and the sampler-vs-trainer drift before the first."""

    loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    logprob_drift_mean: float  # mean |sampler log p - trainer log p| over sampled tokens
    logprob_drift_max: float
    mismatch_kl: float  # KL(sampler || trainer) per token, estimated on the sampled tokens (k3)
    mismatch_clip_fraction: float  # tokens (or sequences) whose importance weight was truncated or masked

    @classmethod
    def none(cls) -> UpdateStats:
        """A step without an update (every row left out): every statistic 0."""
        return cls(**dict.fromkeys((f.name for f in fields(cls)), 0.0))


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
