"""Reasoning mode (`train --reasoning`): the think/answer format, its reward, and answer extraction.

The model is asked (by a system turn) to reason inside `<think>...</think>` and then answer inside
`<answer>...</answer>`. Reference metrics then score only the extracted answer, and the `format`
metric rewards completions that keep the format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stages.metrics.base import Metric

REASONING_SYSTEM_PROMPT = (
    "You are a helpful assistant. First think about the request step by step, then give your final answer. "
    "Put your reasoning between <think> and </think> and your final answer between <answer> and </answer>, "
    "like this: <think> reasoning here </think><answer> final answer here </answer>."
)


def system_prompt_for(system_prompt: str | None, reasoning: bool) -> str | None:
    """The system turn to use: the one given, else in reasoning mode the one asking for <think>/<answer>."""
    return REASONING_SYSTEM_PROMPT if system_prompt is None and reasoning else system_prompt


# Whole completion: a think block, then an answer block, nothing else but whitespace around and between
# them. DOTALL: reasoning and answers span lines. (The paper's code matched `^<think>.*?</think><answer>.*?
# </answer>$` without DOTALL, so a line break anywhere failed the format; this is the intended reading.)
FORMAT = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)


def extract_answer(completion: str) -> str:
    """The text between `<answer>` and `</answer>`; after `<answer>` when it is never closed (a completion
    cut at the length limit); the whole completion when there is no `<answer>` tag. Stripped."""
    _, tag, rest = completion.partition("<answer>")
    if not tag:
        return completion.strip()
    return rest.partition("</answer>")[0].strip()


class Format(Metric):
    """1 when the completion is `<think>...</think><answer>...</answer>` (whitespace allowed), else 0."""

    name = "format"
    description = "reasoning format: 1 for <think>...</think><answer>...</answer>, else 0 (no references used)"
    scale = (0.0, 1.0)
    full_completion = True

    def prepare(self, references: Sequence[str]) -> None:
        return None

    def score_prepared(self, hypothesis: str, prepared: None) -> float:
        return 1.0 if FORMAT.match(hypothesis) else 0.0

    def signature(self) -> str:
        return "format|think-answer|dotall|whitespace:allowed"
