"""The `score` stage: score each record's completions against its references with registered metrics.

Library use (the trainer does this for its rewards):

    scorer = Scorer.from_names(["bleu", "rouge-l"], weights=[1.0, 0.5])
    scorer.rewards(completions, references)      # one float per completion (the weighted sum)
    scorer.score(completions, references)        # {"bleu": [...], "rouge-l": [...], "combined": [...]}

A `py:` function may return None for a completion (no reward): that value stays None, is left out of
`combined` (TRL's nansum over reward functions; None when no metric gave one) and of the record's aggregate.

Stream use: `score_records(records, scorer, jobs=N)` adds `scores`, `score` and `scoring` to each
record, in input order, using N worker processes for large streams.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, get_args

from stages.core import options
from stages.core.errors import UsageError
from stages.core.models import Device
from stages.core.options import check_choice, option
from stages.core.records import prompt_messages
from stages.core.threads import available_cores
from stages.metrics import Batch, Metric, MetricSpec, Usage, parse_specs
from stages.metrics.reasoning import extract_answer

Aggregate = Literal["mean", "max", "min"]
Combine = Literal["sum", "zscore"]
COMBINED = "combined"
ZSCORE_EPS = 1e-6  # added to the group's std, as in the paper's BLEU+RM code

# Records per task sent to a worker process: big enough to amortise pickling, small enough to stream.
CHUNK_RECORDS = 64

__all__ = ["COMBINED", "ScoreConfig", "Scorer", "score_records", "zscores"]


def zscores(values: Sequence[float | None]) -> list[float | None]:
    """(x - mean) / (std + 1e-6) within one group; std is the unbiased one (n - 1). One value: 0.
    A None (no reward) stays None and is left out of the mean and std."""
    present = [v for v in values if v is not None]
    n = len(present)
    if n < 2:
        return [None if v is None else 0.0 for v in values]
    mean = math.fsum(present) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    return [None if v is None else (v - mean) / (std + ZSCORE_EPS) for v in values]


@dataclass
class Scorer:
    """Several metrics, optionally combined, plus how a record's completions are aggregated.

    `specs`: the metrics, parsed (strings from a library caller are parsed here), each with the weight it
    was named with. `combine="sum"`: `combined` = the weighted sum (when weights are given, by spec or in
    `weights`). `combine="zscore"`: each metric is z-scored within the completions scored together (a
    record's, a GRPO group's), then `combined` = sum(w * z) / sum(w), weights 1 by default: the paper's
    BLEU+RM. `extract_answer` (reasoning mode): metrics see only the `<answer>` part, except those marked
    `full_completion`. Model-based metrics are placed on `device` when first used.
    """

    specs: Sequence[MetricSpec | str]
    weights: list[float] | None = None
    aggregate: Aggregate = "mean"
    combine: Combine = "sum"
    extract_answer: bool = False
    device: str = "auto"
    metrics: list[Metric] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.specs = parse_specs(self.specs)
        if not self.specs:
            raise UsageError("at least one metric is needed")
        inline = [spec.weight for spec in self.specs]
        if self.weights is not None:
            if any(w is not None for w in inline):
                raise UsageError("give weights either as NAME:WEIGHT or with --weight, not both")
            if len(self.weights) != len(self.specs):
                raise UsageError(f"{len(self.weights)} weights for {len(self.specs)} metrics")
        elif any(w is not None for w in inline):
            self.weights = [1.0 if w is None else w for w in inline]
        check_choice("aggregate", self.aggregate, get_args(Aggregate))
        check_choice("combination", self.combine, get_args(Combine))
        if self.combine == "zscore" and self.weights is not None and sum(self.weights) == 0:
            raise UsageError("zscore combination divides by the sum of the weights, which is 0")
        self.metrics = [spec.metric(device=self.device) for spec in self.specs]  # type: ignore[union-attr]

    @classmethod
    def from_names(
        cls,
        specs: Sequence[str | MetricSpec],
        weights: Sequence[float] | None = None,
        aggregate: Aggregate = "mean",
        *,
        combine: Combine = "sum",
        extract_answer: bool = False,
        device: str = "auto",
    ) -> Scorer:
        """From `NAME[:ARG][:WEIGHT]` specs (and/or a parallel list of weights)."""
        return cls(list(specs), list(weights) if weights else None, aggregate, combine, extract_answer, device)

    @classmethod
    def for_rewards(
        cls,
        specs: Sequence[str | MetricSpec],
        *,
        combine: Combine = "sum",
        extract_answer: bool = False,
        device: str = "auto",
    ) -> Scorer:
        """The trainer's reward: several specs are always combined (weight 1 where none is given)."""
        scorer = cls.from_names(specs, combine=combine, extract_answer=extract_answer, device=device)
        if scorer.weights is None and len(scorer.specs) > 1:
            scorer.weights = [1.0] * len(scorer.specs)
        return scorer

    @property
    def metric_names(self) -> list[str]:
        return [metric.name for metric in self.metrics]

    def to(self, device: str) -> Scorer:
        """Place the model-based metrics on `device` (the trainer's: `cuda:1` under torchrun) before first use."""
        self.device = device
        for metric in self.metrics:
            metric.to(device)
        return self

    @property
    def score_key(self) -> str:
        """Which entry of `scores` the record's `score` (and the training reward) is made from."""
        return COMBINED if self.weights is not None or self.combine == "zscore" else self.metric_names[0]

    @property
    def needs_prompt(self) -> bool:
        return any(m.needs_prompt for m in self.metrics)

    @property
    def needs_record(self) -> bool:
        """True when a metric reads the records themselves (a `py:` function's prompts and columns)."""
        return any(m.needs_record for m in self.metrics)

    @property
    def in_process(self) -> bool:
        """True when a metric holds a model (or a connection): never spread over worker processes."""
        return any(m.in_process for m in self.metrics)

    def score(
        self,
        completions: Sequence[str],
        references: Sequence[str],
        *,
        messages: list[dict[str, str]] | None = None,
        record: dict[str, Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, list[float | None]]:
        """Per-metric scores for the completions of one prompt, plus `combined` when metrics are combined.

        `messages` (the prompt's chat turns) is needed by metrics that score the conversation (rm, rm-url);
        `record` (the record answered) and `completion_ids` by `py:` functions. Only those return None.
        """
        whole = Batch.group(completions, references, messages=messages, record=record, completion_ids=completion_ids)
        answers = self._answers(whole)
        scores = {m.name: m.score_batch(whole if m.full_completion else answers) for m in self.metrics}
        if self.score_key == COMBINED:
            scores[COMBINED] = self._combined([scores[m.name] for m in self.metrics], len(completions))
        return scores

    def _answers(self, whole: Batch) -> Batch:
        """What the metrics that read only the answer see: in reasoning mode the `<answer>` parts, else `whole`."""
        return (
            replace(whole, completions=[extract_answer(c) for c in whole.completions]) if self.extract_answer else whole
        )

    def prefetch(self, groups: Sequence[tuple[Sequence[str], Sequence[str], Any, Any]]) -> None:
        """Hand the `score` calls to come, (completions, references, messages, record) per prompt, to the
        metrics that ask a service (a judge), which send all their requests at once, bounded, instead of one
        prompt after another. The scores are unchanged; metrics that ask nothing ignore it."""
        asking = [m for m in self.metrics if m.prefetches]
        if not asking or not groups:
            return
        wholes = [Batch.group(c, r, messages=m, record=record) for c, r, m, record in groups]
        batches = [(whole, self._answers(whole)) for whole in wholes]
        for metric in asking:
            metric.prefetch([whole if metric.full_completion else answers for whole, answers in batches])

    def prefetch_records(self, records: Sequence[dict[str, Any]]) -> None:
        """`prefetch` for normalised records with `completions`, as `score_record` will score them."""
        self.prefetch(
            [(r["completions"], r["references"], prompt_messages(r) if self.needs_prompt else None, r) for r in records]
        )

    def usage(self) -> Usage | None:
        """What the metrics that ask a service (judges) have cost so far, together; None when none does."""
        readings = [u for u in (m.usage() for m in self.metrics) if u is not None]
        return sum(readings, Usage()) if readings else None

    def _combined(self, columns: list[list[float | None]], n: int) -> list[float | None]:
        """The weighted sum (or weighted mean of z-scores) per completion; a None is left out, as TRL's
        nansum does, and a completion no metric scored gets None."""
        weights = self.weights or [1.0] * len(columns)
        if self.combine == "zscore":
            columns = [zscores(column) for column in columns]
            total = sum(weights)
            weights = [w / total for w in weights]
        combined: list[float | None] = []
        for i in range(n):
            present = [(w, column[i]) for w, column in zip(weights, columns) if column[i] is not None]
            combined.append(sum(w * value for w, value in present) if present else None)  # type: ignore[operator]
        return combined

    def score_record(self, record: dict[str, Any]) -> dict[str, list[float | None]]:
        """`score` for a normalised record with `completions` (its prompt is passed to metrics that need it)."""
        messages = prompt_messages(record) if self.needs_prompt else None
        return self.score(record["completions"], record["references"], messages=messages, record=record)

    def rewards(
        self, completions: Sequence[str], references: Sequence[str], *, messages: list[dict[str, str]] | None = None
    ) -> list[float | None]:
        """One number per completion: the combined reward (or the single metric)."""
        return self.score(completions, references, messages=messages)[self.score_key]

    def aggregate_values(self, values: Sequence[float | None]) -> float | None:
        """The record's `score` from its completions' values; Nones are left out (None when all are)."""
        present = [v for v in values if v is not None]
        if not present:
            return None
        if self.aggregate == "max":
            return max(present)
        if self.aggregate == "min":
            return min(present)
        return sum(present) / len(present)

    def info(self) -> dict[str, Any]:
        """Provenance written with every scored record."""
        info: dict[str, Any] = {
            "score": self.score_key,
            "aggregate": self.aggregate,
            "signatures": {m.name: m.signature() for m in self.metrics},
        }
        if self.weights is not None:
            info["weights"] = dict(zip(self.metric_names, self.weights))
        if self.score_key == COMBINED:
            info["combine"] = self.combine
        if self.extract_answer:
            info["extract_answer"] = True
        return info

    def apply(self, record: dict[str, Any], scores: dict[str, list[float | None]]) -> dict[str, Any]:
        """Add `scores` (merged with any earlier ones), `score` and `scoring` to a record."""
        previous = record.get("scores")
        merged = dict(previous) if isinstance(previous, dict) else {}
        merged.update(scores)
        record["scores"] = merged
        record["score"] = self.aggregate_values(scores[self.score_key])
        record["scoring"] = self.info()
        return record


@dataclass
class ScoreConfig(options.Options):
    """Every option of `score`, and of a `bleuberi run` config's [score]: the metrics, how several combine,
    and how a record's completions make its `score` (declared once: stages/core/options.py)."""

    metrics: list[str] = option(
        factory=lambda: ["bleu"],
        help="metric to compute, NAME[:ARG][:WEIGHT]; repeat for several; with weights, `scores.combined` holds "
        "the weighted sum",
        metavar="NAME[:WEIGHT]",
        flags=("-m", "--metric"),
    )
    weights: list[float] = option(
        factory=list,
        help="weight for the metric in the same position (instead of NAME:WEIGHT)",
        metavar="W",
        flags=("-w", "--weight"),
    )
    aggregate: Aggregate = option("mean", "how a record's completions make its `score`")
    combine: Combine = option(
        "sum",
        "sum: `combined` = the weighted sum (with weights); zscore: each metric z-scored within the record's "
        "completions, then the weighted mean (the paper's BLEU+RM; a record's mean is then 0)",
        flags=("--combine", "--reward-combine"),
    )
    device: Device = options.device_option()
    jobs: int = option(
        0, "worker processes for large streams (0 = all cores)", metavar="N", flags=("-j", "--jobs"), in_digest=False
    )

    def __post_init__(self) -> None:
        if self.jobs < 0:
            raise UsageError(f"-j/--jobs must be >= 0, got {self.jobs}")
        self.scorer  # noqa: B018 - every spec checked now, before any record is read

    @cached_property
    def scorer(self) -> Scorer:
        return Scorer(list(self.metrics), list(self.weights) or None, self.aggregate, self.combine, device=self.device)


# --- parallel scoring -------------------------------------------------------------------------------

_worker_scorer: Scorer | None = None


def _worker_context() -> multiprocessing.context.BaseContext:
    """Where scoring workers come from: a fork server that imported this module once (POSIX), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(
    specs: list[MetricSpec], weights: list[float] | None, aggregate: Aggregate, combine: Combine, extract: bool
) -> None:
    global _worker_scorer
    from stages.core.threads import one_thread_per_worker

    one_thread_per_worker()  # the pool already has one worker per core
    _worker_scorer = Scorer(specs, weights, aggregate, combine=combine, extract_answer=extract)


def _score_chunk(records: list[dict[str, Any]]) -> list[dict[str, list[float | None]]]:
    assert _worker_scorer is not None
    return [_worker_scorer.score_record(record) for record in records]


def _worker_view(record: dict[str, Any], whole: bool) -> dict[str, Any]:
    """What a worker needs of a record: all of it for a `py:` function, else only what is scored."""
    return record if whole else {k: record[k] for k in ("id", "completions", "references") if k in record}


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
    At most 2 x jobs chunks are in flight, so memory stays bounded on endless streams. Metrics that
    hold a model or a connection (bertscore, emb, rm, rm-url, judge-url) always score in this process,
    batched per record; a judge is handed each chunk of records first, to ask for all of them at once. A
    `py:` function is imported once by each worker (in its initializer) and called there.
    """
    jobs = available_cores() if jobs is None or jobs <= 0 else jobs
    if scorer.in_process:
        jobs = 1
    chunks = _chunks(records, CHUNK_RECORDS)
    head: list[list[dict[str, Any]]] = []
    for chunk in chunks:
        head.append(chunk)
        if len(head) > 2:
            break
    if jobs == 1 or len(head) <= 2:
        for chunk in itertools.chain(head, chunks):
            scorer.prefetch_records(chunk)  # a judge asks for the whole chunk at once
            for record in chunk:
                yield scorer.apply(record, scorer.score_record(record))
        return

    # Not fork: a parent that has imported torch (e.g. `bleuberi run`) must not be forked. A fork server that
    # has imported the scorer once starts each worker at once (spawned, each imported the whole command anew).
    # This process scores every jobs-th chunk itself, so no core waits while the workers start.
    context = _worker_context()
    init_args = (scorer.specs, scorer.weights, scorer.aggregate, scorer.combine, scorer.extract_answer)
    with ProcessPoolExecutor(jobs - 1, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque[tuple[list[dict[str, Any]], Future[list[dict[str, list[float | None]]]] | list[Any]]] = deque()

        def submit(index: int, chunk: list[dict[str, Any]]) -> None:
            if index % jobs == jobs - 1:  # this process's share, scored now
                pending.append((chunk, [scorer.score_record(record) for record in chunk]))
                return
            items = [_worker_view(r, scorer.needs_record) for r in chunk]
            pending.append((chunk, pool.submit(_score_chunk, items)))

        def drain_one() -> Iterator[dict[str, Any]]:
            chunk, result = pending.popleft()
            scores = result.result() if isinstance(result, Future) else result
            for record, record_scores in zip(chunk, scores):
                yield scorer.apply(record, record_scores)

        try:
            for index, chunk in enumerate(itertools.chain(head, chunks)):
                submit(index, chunk)
                if len(pending) >= 2 * jobs:
                    yield from drain_one()
            while pending:
                yield from drain_one()
        finally:  # a failed chunk (or a reader gone) need not wait for the chunks queued after it
            pool.shutdown(wait=True, cancel_futures=True)
