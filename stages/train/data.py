"""What the steps train on: tokenised prompts, which of them each step (and each rank) takes, and a step's
rewarded samples."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from stages.core.errors import InputError
from stages.core.records import prompt_messages
from stages.engines.base import Sample, derive_seed
from stages.engines.prompts import PromptEncoder


@dataclass
class SftExample:
    """One `--algo sft` example: a prompt and one of its references as the answer (ids)."""

    record_id: str
    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass
class TrainPrompt:
    record_id: str
    ids: list[int]
    references: list[str]
    messages: list[dict[str, str]] | None = None  # the record's prompt turns, for rewards that read them (rm)
    record: dict[str, Any] | None = None  # the record itself, for `py:` rewards (its prompt and other fields)


@dataclass
class PromptReport:
    kept: int = 0
    cut: list[str] = field(default_factory=list)  # ids of the prompts cut to max_prompt_length
    skipped: list[str] = field(default_factory=list)  # ids of the prompts left out (--long-prompts skip)


def prepare_prompts(
    records: Sequence[dict[str, Any]], encoder: PromptEncoder
) -> tuple[list[TrainPrompt], PromptReport]:
    """Tokenise every prompt once. A prompt over the limit is cut, skipped or refused as the encoder's
    `long_prompts` says; the report names the ids."""
    kept = encoder.check(records)
    prompts = [
        TrainPrompt(record["id"], encoder.encode(record), record["references"], prompt_messages(record), record)
        for record in kept
    ]
    report = PromptReport(len(prompts), list(encoder.cuts.cut), list(encoder.cuts.skipped))
    if not prompts:
        limit = encoder.max_prompt_length
        raise InputError(
            "<input>",
            None,
            f"no usable training prompts (every one is over --max-prompt-length {limit}, and "
            "--long-prompts skip leaves them out: raise the limit, or choose a cut)"
            if report.skipped
            else "no usable training prompts",
        )
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


Item = TypeVar("Item")


@dataclass
class StepPlan(Generic[Item]):
    """The items (prompts for GRPO, examples for SFT) and which of them each step takes on each rank."""

    items: list[Item]
    per_rank: int  # items per step on one rank
    rank: int
    world_size: int
    seed: int
    steps: int

    @property
    def per_step(self) -> int:
        """Items per step on all ranks together."""
        return self.per_rank * self.world_size

    def share(self, step: int) -> tuple[list[int], list[int]]:
        """This rank's item indices at `step`, and their positions in the global order (which seed sampling)."""
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        picked = step_items(step, self.per_step, len(self.items), self.seed)[mine]
        return picked, list(range(step * self.per_step, (step + 1) * self.per_step))[mine]

    def items_at(self, step: int) -> list[Item]:
        return [self.items[i] for i in self.share(step)[0]]

    def epoch_after(self, step: int) -> float:
        """Passes over the items when `step` (0-based) has finished."""
        return round((step + 1) * self.per_step / len(self.items), 4)


@dataclass
class Rollout:
    """One step's samples on this rank, group after group (G rows per prompt), rewarded."""

    prompts: list[TrainPrompt]
    samples: list[Sample]  # len = len(prompts) * G
    completions: list[str]
    rewards: torch.Tensor  # combined reward per sample
    reward_parts: dict[str, list[float]]  # per metric
    advantages: torch.Tensor
    zero_std: torch.Tensor  # per group
    group_size: int
    keep: list[int] = field(default_factory=list)  # rows that go into the loss pass
