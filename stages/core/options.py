"""What a stage config is made of: the options several stages share, each declared once, and (from
stages/core/declare.py, the declaring machinery) the helpers a config declares its own options with.

    @dataclass
    class GenerateConfig(options.Options):
        model: ModelOptions = group(ModelOptions)
        prompt: PromptOptions = group(PromptOptions)
        seed: int = options.seed_option()

The shared groups: which model a stage loads and how (ModelOptions), how records become prompts
(PromptOptions); and alone, the seed, reasoning mode and the device. A run sets each of them once, at
the top of its config, for all of its stages (stages/run/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stages.core.declare import (
    Options,
    check_choice,
    check_literals,
    group,
    option,
    repeatable,
    values_of,
)
from stages.core.errors import UsageError
from stages.core.models import DEFAULT_MODEL, Device, Dtype

# A stage config imports what it is declared with from here, with the shared groups.
__all__ = [
    "DEFAULT_SEED",
    "MODEL",
    "PROMPTS",
    "LongPrompts",
    "ModelOptions",
    "Options",
    "PromptOptions",
    "check_choice",
    "check_literals",
    "device_option",
    "group",
    "option",
    "reasoning_option",
    "repeatable",
    "seed_option",
    "values_of",
]

DEFAULT_SEED = 42

MODEL, PROMPTS = "Model", "Prompts"
LongPrompts = Literal["cut-middle", "cut-left", "cut-right", "skip", "error"]


def device_option() -> Any:
    """Where models run: in ModelOptions, and alone in `score` (for model-based metrics)."""
    return option("auto", "where models run: auto picks cuda, then mps, then cpu", panel=MODEL)


@dataclass(frozen=True)
class ModelOptions:
    """Which model a stage loads, and how: nested in generate, train and eval, and set once at the top
    of a `bleuberi run` config for all of its stages."""

    name: str | None = option(
        None,
        f"causal LM: an embedded name ('{DEFAULT_MODEL}', the default, offline), a local folder, or a Hugging Face "
        "hub id",
        metavar="NAME|PATH|HUB-ID",
        envvar="BLEUBERI_MODEL",
        panel=MODEL,
        key="model",
    )
    device: Device = device_option()
    dtype: Dtype = option("auto", "weight dtype; auto = bfloat16 on CUDA, float32 elsewhere", panel=MODEL)
    threads: int | None = option(
        None,
        "torch intra-op threads for this process (default: a budget from the cores it may use, shared with "
        "torchrun's local ranks, a local engine and busy neighbours; see docs/threads.md)",
        metavar="N",
        envvar="BLEUBERI_THREADS",
        panel=MODEL,
        in_digest=False,
    )
    trust_remote_code: bool = option(
        False, "let the model repository run its own Python code (off unless you trust the source)", panel=MODEL
    )

    def __post_init__(self) -> None:
        check_literals(self)
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")

    @property
    def model(self) -> str:
        """The model to load: the one named, else the embedded default."""
        return self.name or DEFAULT_MODEL


@dataclass(frozen=True)
class PromptOptions:
    """How records become prompts: nested in generate, train and eval, and set once for a whole run, so
    every stage of it sees the same prompts."""

    system_prompt: str | None = option(
        None, "a system turn put before prompts that have none", metavar="TEXT", panel=PROMPTS
    )
    max_prompt_length: int | None = option(
        None, "the longest prompt, in tokens; what happens to longer ones: --long-prompts (none: no limit)",
        metavar="N", panel=PROMPTS,
    )  # fmt: skip
    long_prompts: LongPrompts = option(
        "cut-middle",
        "a prompt over --max-prompt-length: cut-middle keeps its start (the instruction) and its end (the "
        "question and the answer cue), cut-left keeps the end (TRL's), cut-right the start; skip leaves the record "
        "out, error stops before any work. Each stage names the records it cut or skipped (docs/records.md)",
        panel=PROMPTS,
    )

    def __post_init__(self) -> None:
        check_literals(self)
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UsageError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")


def seed_option() -> Any:
    return option(
        DEFAULT_SEED,
        "random seed of sampling, tie-breaks and the bootstrap: same seed, same result (a run's: every stage's)",
        metavar="N",
        panel="Sampling",
    )


def reasoning_option() -> Any:
    return option(
        False,
        "reasoning mode: a system prompt that asks for <think>...</think><answer>...</answer> (unless "
        "--system-prompt), metrics score only the <answer> part (`format` scores the format); train adds the "
        "format reward",
        panel=PROMPTS,
    )
