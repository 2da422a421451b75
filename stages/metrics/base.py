"""The metric interface: configured once, references prepared once, then many hypotheses scored.

Every metric scores on a 0..1 scale (sacrebleu's 0..100 scores are divided by 100).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

Messages = list[dict[str, str]]  # chat turns: {"role", "content"}


class Metric(ABC):
    """A reference-based text metric.

    `prepare(references)` computes everything that depends only on the references (tokens, n-gram
    counts, lengths); `score_prepared(hypothesis, prepared)` scores one hypothesis against them. A GRPO
    step scores G completions against one reference set, so preparing once is the point of the split.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # What the spec may carry after `NAME:` (e.g. "PATH" for `rm:PATH`); None: the metric takes nothing.
    argument: ClassVar[str | None] = None
    # Scores the conversation (the prompt's chat turns + the completion), e.g. a reward model.
    needs_prompt: ClassVar[bool] = False
    # Holds a model: loaded lazily, on first use, and never copied into worker processes.
    in_process: ClassVar[bool] = False
    # In reasoning mode, scores the whole completion (think + answer), not the extracted answer only.
    full_completion: ClassVar[bool] = False

    @abstractmethod
    def prepare(self, references: Sequence[str]) -> Any:
        """Reference statistics for `score_prepared`. `references` is a non-empty list of strings."""

    @abstractmethod
    def score_prepared(self, hypothesis: str, prepared: Any) -> float:
        """Score one hypothesis against prepared references, on a 0..1 scale."""

    @abstractmethod
    def signature(self) -> str:
        """A reproducibility string: metric name, settings and the version of anything it follows."""

    def sentence_score(self, hypothesis: str, references: Sequence[str]) -> float:
        return self.score_prepared(hypothesis, self.prepare(_check_references(references)))

    def sentence_scores(
        self, hypotheses: Sequence[str], references: Sequence[str], *, messages: Messages | None = None
    ) -> list[float]:
        """Score several hypotheses (e.g. the G completions of one prompt) against one reference set.

        `messages` (the prompt's chat turns) is only read by metrics with `needs_prompt`.
        """
        prepared = self.prepare(_check_references(references))
        return [self.score_prepared(h, prepared) for h in hypotheses]

    def paired_scores(
        self,
        hypotheses: Sequence[str],
        references: Sequence[Sequence[str]],
        messages: Sequence[Messages] | None = None,
    ) -> list[float]:
        """One score per (hypothesis, its references[, its prompt]) across records, e.g. one system's answers
        in `eval`. Model-based metrics override this to batch across records."""
        _check_corpus(hypotheses, references)
        return [
            self.sentence_scores([h], r, messages=None if messages is None else messages[i])[0]
            for i, (h, r) in enumerate(zip(hypotheses, references))
        ]

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus-level score: `references[i]` is the list of references of `hypotheses[i]`.

        The default is the mean of sentence scores; n-gram metrics override it with the pooled
        statistics that define their corpus score.
        """
        _check_corpus(hypotheses, references)
        if not hypotheses:
            return 0.0
        return sum(self.sentence_score(h, r) for h, r in zip(hypotheses, references)) / len(hypotheses)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.signature()!r})"


def _check_references(references: Sequence[str]) -> Sequence[str]:
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not a single string")
    if not references:
        raise ValueError("references must not be empty")
    return references


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Token-id rows as one right-padded batch for an encoder or reward model: (input ids, attention mask)."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask
