"""From records to a scored rollout: prompt preparation, data order, sampling, rewards, advantages."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.core.errors import InputError
from stages.core.records import prompt_messages
from stages.engines.base import Sample, SamplingParams, derive_seed
from stages.engines.generator import Generator
from stages.engines.prompts import PromptEncoder, cut_left
from stages.score import Scorer
from stages.train.distributed import Distributed
from stages.train.loss import group_advantages, zero_std_groups


@dataclass
class TrainPrompt:
    record_id: str
    ids: list[int]
    references: list[str]
    messages: list[dict[str, str]] | None = None  # the record's prompt turns, for rewards that read them (rm)


@dataclass
class PromptReport:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0


def prepare_prompts(
    records: Sequence[dict[str, Any]], encoder: PromptEncoder, max_prompt_length: int, drop_long: bool
) -> tuple[list[TrainPrompt], PromptReport]:
    """Tokenise every prompt once. Over-long prompts are cut from the left (or dropped), and counted."""
    report = PromptReport()
    prompts = []
    for record in records:
        ids = encoder.encode(record)
        if len(ids) > max_prompt_length:
            if drop_long:
                report.dropped += 1
                continue
            report.truncated += 1
            ids = cut_left(ids, max_prompt_length)
        prompts.append(TrainPrompt(record["id"], ids, record["references"], prompt_messages(record)))
    report.kept = len(prompts)
    if not prompts:
        raise InputError("<input>", None, "no usable training prompts (all empty or dropped as too long)")
    return prompts, report


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_items))
    random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
    return order


def step_items(step: int, per_step: int, n_items: int, seed: int) -> list[int]:
    """Item indices used at `step` (all ranks): a fresh shuffle each epoch, epochs laid end to end."""
    picked = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, n_items)
        picked.append(epoch_order(n_items, seed, epoch)[index])
    return picked


def total_steps(n_items: int, per_step_global: int, epochs: float, max_steps: int | None) -> int:
    return max_steps if max_steps else max(1, math.ceil(epochs * n_items / per_step_global))


@dataclass
class Rollout:
    """One step's samples on this rank, group after group (G rows per prompt)."""

    prompts: list[TrainPrompt]
    samples: list[Sample]  # len = len(prompts) * G
    completions: list[str]
    rewards: torch.Tensor  # combined reward per sample
    reward_parts: dict[str, list[float]]  # per metric
    advantages: torch.Tensor
    zero_std: torch.Tensor  # per group
    group_size: int
    keep: list[int] = field(default_factory=list)  # rows that go into the loss pass


def sample_rollout(
    generator: Generator,
    prompts: list[TrainPrompt],
    global_positions: list[int],
    *,
    step: int,
    seed: int,
    group_size: int,
    sampling: SamplingParams,
    prompts_per_batch: int,
) -> list[Sample]:
    """G samples per prompt, seeded by (seed, step, global position, k): independent of world size."""
    samples: list[Sample] = []
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start : start + prompts_per_batch]
        seeds = [
            [derive_seed(seed, "sample", step, position, k) for k in range(group_size)]
            for position in global_positions[start : start + prompts_per_batch]
        ]
        for group in generator.sample_ids([p.ids for p in chunk], seeds, sampling):
            samples.extend(group)
    return samples


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
) -> Rollout:
    completions = [generator.decode(s.token_ids) for s in samples]
    parts: dict[str, list[float]] = {}
    combined: list[float] = []
    for i, prompt in enumerate(prompts):
        group = completions[i * group_size : (i + 1) * group_size]
        scores = scorer.score(group, prompt.references, messages=prompt.messages)
        for name, values in scores.items():
            parts.setdefault(name, []).extend(values)
        combined.extend(scores[scorer.score_key])
    rewards = torch.tensor(combined, dtype=torch.float32)
    if scale_rewards == "batch" and dist.enabled:
        advantages = _batch_scaled_advantages(rewards, group_size, dist)
    else:
        advantages = group_advantages(rewards, group_size, scale_rewards)  # type: ignore[arg-type]
    zero_std = zero_std_groups(rewards, group_size)
    keep = [row for row in range(len(samples)) if not (skip_zero_std and bool(zero_std[row // group_size]))]
    return Rollout(prompts, samples, completions, rewards, parts, advantages, zero_std, group_size, keep)


def _batch_scaled_advantages(rewards: torch.Tensor, group_size: int, dist: Distributed) -> torch.Tensor:
    """Group-centred rewards over the std of the whole all-rank batch (unbiased, like torch.std)."""
    total, total_sq, count = dist.sum(
        [float(rewards.sum()), float((rewards.double() ** 2).sum()), float(rewards.numel())], rewards.device
    )
    centred = group_advantages(rewards, group_size, "none")
    if count < 2:
        return torch.zeros_like(rewards)
    variance = max(total_sq - total * total / count, 0.0) / (count - 1)
    return centred / (math.sqrt(variance) + 1e-4)
