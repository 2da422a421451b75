"""The algorithms `train` runs, behind one interface: GRPO (the paper's) and SFT (its supervised baseline).

What differs between them is said here once: the settings each needs, and what a step draws (prompts it
samples, or reference answers it imitates) and how many per step. Which code runs a step is plain code:
`train_step` in stages/train/loop.py calls `grpo_step` (stages/train/grpo.py) or `sft_update`
(stages/train/sft.py); `_plan` in stages/train/setup.py builds what the steps draw from.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol, get_args

from stages.core.errors import UsageError

Algo = Literal["grpo", "sft"]


class StepSizes(Protocol):
    """The batch settings an algorithm's checks and counts read (TrainConfig has them)."""

    num_generations: int
    per_device_train_batch_size: int
    grad_accum: int


class Algorithm:
    """What one algorithm needs and draws; `ALGORITHMS` holds one of each, by name."""

    name: ClassVar[str]
    noun: ClassVar[str]  # what a step draws: "prompts" or "examples"
    samples: ClassVar[bool]  # True: a step samples completions and rewards them (rollouts, rewards)

    def check(self, sizes: StepSizes) -> None:
        """Settings this algorithm cannot run with: a usage error naming them."""

    def items_per_step(self, sizes: StepSizes) -> int:
        """Items each step takes on each device."""
        return sizes.per_device_train_batch_size * sizes.grad_accum


class Grpo(Algorithm):
    name, noun, samples = "grpo", "prompts", True

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

    name, noun, samples = "sft", "examples", False


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (Grpo(), Sft())}
assert tuple(ALGORITHMS) == get_args(Algo)  # the Literal (for --help and configs) and the registry agree
