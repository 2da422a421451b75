"""The `score` stage: score each record's completions against its references with registered metrics.

Library use (the trainer does this for its rewards):

    scorer = Scorer.from_names(["bleu", "rouge-l"], weights=[1.0, 0.5])
    scorer.rewards(completions, references)      # one float per completion (the weighted sum)
    scorer.score(completions, references)        # {"bleu": [...], "rouge-l": [...], "combined": [...]}

Stream use: `score_records(records, scorer, jobs=N)` adds `scores`, `score` and `scoring` to each
record, in input order, using N worker processes for large streams.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from stages.core.errors import UsageError
from stages.metrics import Metric, get_metric

Aggregate = Literal["mean", "max", "min"]
AGGREGATES: tuple[str, ...] = ("mean", "max", "min")
COMBINED = "combined"

# Records per task sent to a worker process: big enough to amortise pickling, small enough to stream.
CHUNK_RECORDS = 64


def parse_weighted(spec: str) -> tuple[str, float | None]:
    """ "bleu" -> ("bleu", None); "rouge-l:0.5" -> ("rouge-l", 0.5)."""
    name, sep, weight = spec.partition(":")
    if not sep:
        return spec, None
    try:
        value = float(weight)
    except ValueError:
        raise UsageError(f"bad weight in {spec!r}: expected NAME:NUMBER, e.g. rouge-l:0.5") from None
    if not math.isfinite(value):
        raise UsageError(f"bad weight in {spec!r}: must be finite")
    return name, value


def available_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class Scorer:
    """Several metrics, optionally combined by weights, plus how a record's completions are aggregated."""

    metric_names: list[str]
    weights: list[float] | None = None
    aggregate: Aggregate = "mean"
    metrics: list[Metric] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.metric_names:
            raise UsageError("at least one metric is needed")
        if len(set(self.metric_names)) != len(self.metric_names):
            raise UsageError(f"a metric is named twice: {self.metric_names}")
        if self.weights is not None and len(self.weights) != len(self.metric_names):
            raise UsageError(f"{len(self.weights)} weights for {len(self.metric_names)} metrics")
        if self.aggregate not in AGGREGATES:
            raise UsageError(f"unknown aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        self.metrics = [get_metric(name) for name in self.metric_names]

    @classmethod
    def from_names(
        cls, specs: Sequence[str], weights: Sequence[float] | None = None, aggregate: Aggregate = "mean"
    ) -> Scorer:
        """Build from `NAME` or `NAME:WEIGHT` specs (and/or a parallel list of weights)."""
        parsed = [parse_weighted(spec) for spec in specs]
        names = [name for name, _ in parsed]
        inline = [weight for _, weight in parsed]
        if weights:
            if any(w is not None for w in inline):
                raise UsageError("give weights either as NAME:WEIGHT or with --weight, not both")
            return cls(names, list(weights), aggregate)
        if any(w is not None for w in inline):
            return cls(names, [1.0 if w is None else w for w in inline], aggregate)
        return cls(names, None, aggregate)

    @property
    def score_key(self) -> str:
        """Which entry of `scores` the record's `score` (and the training reward) is made from."""
        return COMBINED if self.weights is not None else self.metric_names[0]

    def score(self, completions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """Per-metric scores for each completion; `combined` holds the weighted sum when weights are set."""
        scores = {m.name: m.sentence_scores(completions, references) for m in self.metrics}
        if self.weights is not None:
            columns = [scores[name] for name in self.metric_names]
            scores[COMBINED] = [
                sum(w * column[i] for w, column in zip(self.weights, columns)) for i in range(len(completions))
            ]
        return scores

    def rewards(self, completions: Sequence[str], references: Sequence[str]) -> list[float]:
        """One number per completion: the weighted sum of the metrics (or the single metric)."""
        return self.score(completions, references)[self.score_key]

    def aggregate_values(self, values: Sequence[float]) -> float:
        if self.aggregate == "max":
            return max(values)
        if self.aggregate == "min":
            return min(values)
        return sum(values) / len(values)

    def info(self) -> dict[str, Any]:
        """Provenance written with every scored record."""
        info: dict[str, Any] = {
            "score": self.score_key,
            "aggregate": self.aggregate,
            "signatures": {m.name: m.signature() for m in self.metrics},
        }
        if self.weights is not None:
            info["weights"] = dict(zip(self.metric_names, self.weights))
        return info

    def apply(self, record: dict[str, Any], scores: dict[str, list[float]]) -> dict[str, Any]:
        """Add `scores` (merged with any earlier ones), `score` and `scoring` to a record."""
        previous = record.get("scores")
        merged = dict(previous) if isinstance(previous, dict) else {}
        merged.update(scores)
        record["scores"] = merged
        record["score"] = self.aggregate_values(scores[self.score_key])
        record["scoring"] = self.info()
        return record


# --- parallel scoring -------------------------------------------------------------------------------

_worker_scorer: Scorer | None = None


def _init_worker(names: list[str], weights: list[float] | None, aggregate: Aggregate) -> None:
    global _worker_scorer
    _worker_scorer = Scorer(names, weights, aggregate)


def _score_chunk(items: list[tuple[list[str], list[str]]]) -> list[dict[str, list[float]]]:
    assert _worker_scorer is not None
    return [_worker_scorer.score(completions, references) for completions, references in items]


def _chunks(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_records(
    records: Iterable[dict[str, Any]], scorer: Scorer, *, jobs: int | None = None
) -> Iterator[dict[str, Any]]:
    """Score normalised records (each needs `completions` and `references`), yielding them in order.

    `jobs` > 1 spreads the work over that many processes once the stream is longer than two chunks;
    shorter streams are scored in this process, where starting workers would cost more than it saves.
    At most 2 x jobs chunks are in flight, so memory stays bounded on endless streams.
    """
    jobs = available_jobs() if jobs is None or jobs <= 0 else jobs
    chunks = _chunks(records, CHUNK_RECORDS)
    head: list[list[dict[str, Any]]] = []
    for chunk in chunks:
        head.append(chunk)
        if len(head) > 2:
            break
    if jobs == 1 or len(head) <= 2:
        for chunk in itertools.chain(head, chunks):
            for record in chunk:
                yield scorer.apply(record, scorer.score(record["completions"], record["references"]))
        return

    # spawn, not fork: a parent that has imported torch (e.g. `bleuberi run`) must not be forked.
    context = multiprocessing.get_context("spawn")
    init_args = (scorer.metric_names, scorer.weights, scorer.aggregate)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque[tuple[list[dict[str, Any]], Future[list[dict[str, list[float]]]]]] = deque()

        def submit(chunk: list[dict[str, Any]]) -> None:
            items = [(r["completions"], r["references"]) for r in chunk]
            pending.append((chunk, pool.submit(_score_chunk, items)))

        def drain_one() -> Iterator[dict[str, Any]]:
            chunk, future = pending.popleft()
            for record, scores in zip(chunk, future.result()):
                yield scorer.apply(record, scores)

        for chunk in itertools.chain(head, chunks):
            submit(chunk)
            if len(pending) >= 2 * jobs:
                yield from drain_one()
        while pending:
            yield from drain_one()
