"""The metric interface: configured once, references prepared once, then many hypotheses scored.

Every metric scores on a 0..1 scale (sacrebleu's 0..100 scores are divided by 100).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar


class Metric(ABC):
    """A reference-based text metric.

    `prepare(references)` computes everything that depends only on the references (tokens, n-gram
    counts, lengths); `score_prepared(hypothesis, prepared)` scores one hypothesis against them. A GRPO
    step scores G completions against one reference set, so preparing once is the point of the split.
    """

    name: ClassVar[str]
    description: ClassVar[str]

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

    def sentence_scores(self, hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
        """Score several hypotheses (e.g. the G completions of one prompt) against one reference set."""
        prepared = self.prepare(_check_references(references))
        return [self.score_prepared(h, prepared) for h in hypotheses]

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
