"""The algorithms `train` runs, behind one interface: GRPO (the paper's) and SFT (its supervised baseline).

What differs between them is said here once: the settings each needs, what a step draws (prompts it
samples, or reference answers it imitates) and how many per step, and the module that runs a step. A
runner module has `items(prompts, generator, config)` (what the steps draw from) and `step(run, step)`
(one optimizer step, returning its metrics); it is imported when a run starts, as engines are
(stages/engines/base.py), so configs stay light.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import ClassVar, Literal, Protocol, get_args

from stages.core.errors import UsageError

Algo = Literal["grpo", "sft"]


class StepSizes(Protocol):
    """The batch settings an algorithm's checks and counts read (TrainConfig has them)."""

    num_generations: int
    per_device_train_batch_size: int
    grad_accum: int


class Algorithm:
    name: ClassVar[str]
    noun: ClassVar[str]  # what a step draws: "prompts" or "examples"
    samples: ClassVar[bool]  # True: a step samples completions and rewards them (rollouts, rewards)
    module: ClassVar[str]

    def check(self, sizes: StepSizes) -> None:
        """Settings this algorithm cannot run with: a usage error naming them."""

    def items_per_step(self, sizes: StepSizes) -> int:
        """Items each step takes on each device."""
        return sizes.per_device_train_batch_size * sizes.grad_accum

    def runner(self) -> ModuleType:
        return importlib.import_module(self.module)


class Grpo(Algorithm):
    name, noun, samples, module = "grpo", "prompts", True, "stages.train.grpo"

    def check(self, sizes: StepSizes) -> None:
        if sizes.num_generations < 2:
            raise UsageError("num_generations must be >= 2 (GRPO compares samples)")
        if sizes.per_device_train_batch_size % sizes.num_generations:
            raise UsageError(
                f"per_device_train_batch_size ({sizes.per_device_train_batch_size}) counts completions and must "
                f"be a multiple of num_generations ({sizes.num_generations})"
            )

    def items_per_step(self, sizes: StepSizes) -> int:
        """Prompts: the completions of a step, num_generations for each."""
        return super().items_per_step(sizes) // sizes.num_generations


class Sft(Algorithm):
    """One example per (prompt, reference) pair: nothing is sampled, so one example per completion slot."""

    name, noun, samples, module = "sft", "examples", False, "stages.train.sft"


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (Grpo(), Sft())}
assert tuple(ALGORITHMS) == get_args(Algo)  # the Literal (for --help and configs) and the registry agree
