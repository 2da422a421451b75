"""The metric interface: configured once, references prepared once, then many hypotheses scored.

Every metric declares the range its scores lie in (`Metric.scale`): the reference metrics are on 0..1
(sacrebleu's 0..100 scores are divided by 100), `emb` is a cosine (-1..1), reward models and a user's
own function have no fixed range. `score --help`, the package docstring and docs/rewards.md list these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from stages.core.preflight import Needs

Messages = list[dict[str, str]]  # chat turns: {"role", "content"}
ReferenceLists = Sequence[Sequence[str]]  # references[i]: the reference texts of hypothesis i
PromptTurns = Sequence[Messages] | None  # messages[i]: the prompt's chat turns of hypothesis i
Scale = tuple[float, float] | None  # (lowest, highest) score; None: no fixed range


def scale_text(scale: Scale) -> str:
    """A range as the help and docs/rewards.md write it: "0..1", "-1..1", or "unbounded"."""
    if scale is None:
        return "unbounded"
    return "..".join(f"{bound:g}" for bound in scale)


@dataclass
class Usage:
    """What a metric that asks a service has cost so far (the judge's counters): requests sent, answers read
    from its cache, completions it gave no score (null), and the seconds spent. Totals; a step's share is
    the difference of two readings."""

    requests: int = 0
    cache_hits: int = 0
    nulls: int = 0
    seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def line(self) -> str:
        """As the commands say it on stderr."""
        nulls = f"{self.nulls} null{'s' if self.nulls != 1 else ''} (no readable score)"
        return f"{self.requests} requests, {self.cache_hits} answered from the cache, {nulls}, {self.seconds:.1f}s"


@dataclass
class Batch:
    """Completions scored together, each with its references and, where known, its prompt's chat turns,
    the record it answers and its token ids.

    `one_prompt`: every completion answers the same record (a GRPO group, one record's completions), so
    metrics prepare the references once. `missing_ok`: a `py:` function may return None (no reward) for a
    completion; callers that need a score for every answer (eval) say False.
    """

    completions: Sequence[str]
    references: Sequence[Sequence[str]]  # one list per completion
    messages: Sequence[Messages] | None = None  # one per completion (rm, rm-url)
    records: Sequence[Mapping[str, Any]] | None = None  # one per completion (py: prompts and record fields)
    completion_ids: Sequence[Sequence[int]] | None = None
    one_prompt: bool = False
    missing_ok: bool = True

    @classmethod
    def group(
        cls,
        completions: Sequence[str],
        references: Sequence[str],
        *,
        messages: Messages | None = None,
        record: Mapping[str, Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
    ) -> Batch:
        """The completions of one prompt (a record's, a GRPO group's)."""
        n = len(completions)
        return cls(
            completions,
            [references] * n,
            None if messages is None else [messages] * n,
            None if record is None else [record] * n,
            completion_ids,
            one_prompt=True,
        )

    def record_id(self, index: int) -> str | None:
        """The id of the record completion `index` answers, when known."""
        if self.records is None:
            return None
        value = self.records[index].get("id")
        return None if value is None else str(value)


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
    # Reads the record a completion answers (its prompt and other fields), e.g. a user's `py:` function.
    needs_record: ClassVar[bool] = False
    # The range every score lies in; None: no fixed range (raw reward-model logits, a user's function).
    # Declared by every metric (no default), so none can claim 0..1 by omission.
    scale: ClassVar[Scale]
    device: str = "auto"  # where a model-based metric loads its model, when first used

    def to(self, device: str) -> None:
        """Load the model (when first used) on `device`; a metric that holds none has nothing to place."""
        self.device = device

    # What the argument names, for preflight: "models" (rm:PATH) or "servers" (rm-url:URL); None: nothing.
    argument_names: ClassVar[str | None] = None
    # Asks a service per completion (judge-url:): callers hand it many groups at once (`prefetch`) so its
    # requests run concurrently instead of one group after another.
    prefetches: ClassVar[bool] = False

    def prefetch(self, batches: Sequence[Batch]) -> None:
        """Get ready to score `batches` (e.g. send their requests at once); their `score_batch` calls follow."""
        return None

    def usage(self) -> Usage | None:
        """What this metric has cost so far, for one that asks a service; None for the others."""
        return None

    @classmethod
    def needs(cls, argument: str | None) -> Needs:
        """What must exist before this metric can run with `argument` (models, servers, files): checked by
        preflight before any model loads. The string metrics need nothing."""
        return Needs(**{cls.argument_names: (argument,)}) if argument and cls.argument_names else Needs()

    @abstractmethod
    def prepare(self, references: Sequence[str]) -> Any:
        """Reference statistics for `score_prepared`. `references` is a non-empty list of strings."""

    @abstractmethod
    def score_prepared(self, hypothesis: str, prepared: Any) -> float:
        """Score one hypothesis against prepared references, within `scale`."""

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
        self, hypotheses: Sequence[str], references: ReferenceLists, messages: PromptTurns = None
    ) -> list[float]:
        """One score per (hypothesis, its references[, its prompt]) across records, e.g. one system's answers
        in `eval`. Model-based metrics override this to batch across records."""
        _check_corpus(hypotheses, references)
        return [
            self.sentence_scores([h], r, messages=None if messages is None else messages[i])[0]
            for i, (h, r) in enumerate(zip(hypotheses, references))
        ]

    def score_batch(self, batch: Batch) -> list[float | None]:
        """One score per completion of `batch`: the entry point every caller uses (score, train, eval).

        The built-in metrics score a one-prompt batch against references prepared once (`sentence_scores`)
        and a batch across records pair by pair (`paired_scores`); only a `py:` function returns None.
        """
        if not batch.completions:
            return []
        if batch.one_prompt:
            messages = None if batch.messages is None else batch.messages[0]
            return list(self.sentence_scores(batch.completions, batch.references[0], messages=messages))
        return list(self.paired_scores(batch.completions, batch.references, batch.messages))

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


class BatchMetric(Metric):
    """A metric whose one entry point is `score_batch`, which may leave a completion without a score (None:
    a `py:` function's "no reward", a judge's unreadable reply). Called one hypothesis or one record at a
    time, by callers that need every score, a None is an error (the batch says `missing_ok=False`)."""

    def prepare(self, references: Sequence[str]) -> Sequence[str]:
        return references

    def sentence_scores(
        self, hypotheses: Sequence[str], references: Sequence[str], *, messages: Messages | None = None
    ) -> list[float]:
        batch = replace(Batch.group(hypotheses, references, messages=messages), missing_ok=False)
        return self.score_batch(batch)  # type: ignore[return-value]  # no None: missing_ok is False

    def paired_scores(
        self, hypotheses: Sequence[str], references: ReferenceLists, messages: PromptTurns = None
    ) -> list[float]:
        _check_corpus(hypotheses, references)
        return self.score_batch(Batch(hypotheses, references, messages, missing_ok=False))  # type: ignore[return-value]

    @abstractmethod
    def score_batch(self, batch: Batch) -> list[float | None]:
        """One score (or None) per completion of `batch`; a None where `batch.missing_ok` is False is an error."""


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
