"""The length control of `eval`: is a gain learning, or only a change of answer length?

GRPO with a reference metric often teaches a small model to answer shorter, and BLEU's brevity
penalty and n-gram precisions react to length alone. So for every system the baseline's own answers
are cut, prompt by prompt, to that system's answer length and scored by the same metrics: a system
named `base@len(trained)`. A gain the cut baseline also gets is length, not learning; a gain that
survives is measured against it (`vs_length_control`: paired difference, interval above zero).

Lengths are counted in the eval model's tokens (its tokenizer, without special tokens), or in
whitespace-separated words when no model is given (`eval --answers` alone) and no --tokenizer either.
A baseline answer shorter than the system's is kept whole: cutting can only shorten.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

WORD = re.compile(r"\S+")


class Cutter(Protocol):
    unit: str

    def count(self, text: str) -> int: ...

    def cut(self, text: str, length: int) -> str: ...


class WordCutter:
    """Words: maximal runs of non-space characters; a cut keeps the text up to the end of the Nth word."""

    unit = "words"

    def count(self, text: str) -> int:
        return sum(1 for _ in WORD.finditer(text))

    def cut(self, text: str, length: int) -> str:
        if length <= 0:
            return ""
        for i, match in enumerate(WORD.finditer(text), start=1):
            if i == length:
                return text[: match.end()]
        return text


class TokenCutter:
    """Tokens of a Hugging Face tokenizer; a cut decodes the first N token ids of the text."""

    unit = "tokens"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self._ids(text))

    def cut(self, text: str, length: int) -> str:
        ids = self._ids(text)
        if length >= len(ids):
            return text
        return self.tokenizer.decode(ids[: max(0, length)], skip_special_tokens=True)


def load_cutter(model: str | None, *, trust_remote_code: bool = False) -> Cutter:
    """The tokenizer of `model` (only the tokenizer is loaded), or words without a model."""
    if model is None:
        return WordCutter()
    from stages.core.models import load_tokenizer, resolve_model

    return TokenCutter(load_tokenizer(resolve_model(model), trust_remote_code=trust_remote_code))


def control_name(baseline: str, system: str) -> str:
    return f"{baseline}@len({system})"


def cut_answers(baseline: Sequence[str], system: Sequence[str], cutter: Cutter) -> list[dict[str, Any]]:
    """The baseline's answers, each cut to the length of the system's answer to the same prompt."""
    answers = []
    for base_text, system_text in zip(baseline, system, strict=True):
        text = cutter.cut(base_text, cutter.count(system_text))
        tokens = cutter.count(text) if cutter.unit == "tokens" else None
        answers.append({"completion": text, "tokens": tokens, "words": len(text.split()), "finish_reason": None})
    return answers
