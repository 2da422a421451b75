"""`bleuberi score`: add per-completion metric scores and a per-record aggregate."""

from __future__ import annotations

import time
from collections.abc import Iterator

from bleuberi_cli.common import (
    OutputOpt,
    QuietOpt,
    ResumeOpt,
    finished_work,
    note_stdin,
    progress,
    report_reading,
    say,
)
from bleuberi_cli.config_options import cli_command
from stages.core.formats import open_writer
from stages.core.preflight import Output, preflight
from stages.core.records import NORMALISATION_HELP, ReadOptions, ReadStats
from stages.metrics import SPEC_HELP, metric_list
from stages.score import ScoreConfig, score_records

METRIC_LIST = metric_list()

HELP = f"""Score each record's `completions` against its `references` (all references at once).

Adds `scores` ({{metric: [one float per completion]}}), `score` (the record's aggregate) and
`scoring` (metric signatures). Streams: records are written as soon as they are scored, in order.
Each metric's range is listed below: reference metrics are on 0..1, `emb` is a cosine (-1..1, in
practice 0..1); `rm:PATH` / `rm-url:URL` give raw reward-model scores of the conversation (prompt +
completion), which `select` can rank by ("hard by RM"). `judge-url:URL[#MODEL]` asks an LLM behind an
OpenAI-compatible endpoint to grade each completion against the references (0..1; a reply without a
score is null; settings from $BLEUBERI_JUDGE_*, docs/rewards.md). `py:FILE.py:FUNCTION` is your own reward
(docs/rewards.md, "Your own reward"); a None it returns is written as null and left out of `score`. {SPEC_HELP}

\b
Metrics (name, range, definition):
{METRIC_LIST}

\b
Examples:
  bleuberi score -i generated.jsonl --metric bleu --metric bleu-paper
  bleuberi generate -i pool.jsonl | bleuberi score -m bleu:1 -m rouge-l:0.5 | bleuberi select -n 100
  bleuberi score -i generated.jsonl -m rm:/models/rm | bleuberi select --mode hard -n 100   # hard by RM
  bleuberi score -i generated.jsonl -m bleu -m rm:/models/rm --combine zscore
  bleuberi score -i generated.jsonl -m bleu -m py:examples/rewards.py:length_band:0.5
  bleuberi score -i generated.jsonl -m judge-url:http://127.0.0.1:8000/v1#smol   # a judge, with the references

{NORMALISATION_HELP}
"""


@cli_command({"config": ScoreConfig, "reading": ReadOptions})
def score(
    config: ScoreConfig,
    reading: ReadOptions,
    output: OutputOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    scorer = config.scorer
    preflight(inputs=[reading.input], outputs=[Output(output)], needs=[spec.needs() for spec in scorer.specs])
    kept = finished_work(output, resume=resume, quiet=quiet)  # first: what a killed run left
    done = kept.records if kept else {}
    stats = ReadStats()
    note_stdin(reading.input, quiet=quiet)
    records = Timed(reading.records(require=("completions",), stats=stats))
    order: list[str] = []  # the input's ids as they come: the file is put in that order at the end
    tally = Tally(scorer.score_key, scorer.aggregate)
    with (
        open_writer(output, order=order if output else None) as writer,
        progress("scoring", quiet=quiet) as advance,
    ):

        def todo() -> Iterator[dict]:
            for record in records:
                order.append(record["id"])
                if record["id"] not in done:
                    yield record
                    continue
                writer.write(done[record["id"]])  # finished by an earlier run: kept, not scored again
                tally.add(done[record["id"]])

        for record in score_records(todo(), scorer, jobs=config.jobs):
            writer.write(record)
            tally.add(record)
            advance(1)
    report_reading(stats, quiet=quiet)
    say(tally.line(records.waited, len(done)) + (f"; written to {output}" if output else ""), quiet=quiet)
    if (usage := scorer.usage()) is not None:  # a judge: what it cost
        say(f"judge: {usage.line()}", quiet=quiet)


class Tally:
    """What the summary line says: records and completions scored, and the mean of their `score`."""

    def __init__(self, key: str, aggregate: str) -> None:
        self.key, self.aggregate = key, aggregate
        self.records = self.completions = self.scored = 0
        self.total = 0.0
        self.start = time.perf_counter()

    def add(self, record: dict) -> None:
        self.records += 1
        self.completions += len(record["completions"])
        if record["score"] is not None:  # None: a `py:` function rewarded none of its completions
            self.total, self.scored = self.total + record["score"], self.scored + 1

    def line(self, waited: float, kept: int) -> str:
        elapsed = _elapsed(time.perf_counter() - self.start, waited)
        head = f"scored {self.records} records ({self.completions} completions) in {elapsed}"
        if kept:
            head += f", {kept} of them kept from an earlier run"
        if not self.scored:  # no mean to report: never `nan`
            return head + ("; no record had a score" if self.records else "; the input held no records")
        # `score` is each record's aggregate of its completions; say so only when it is not the mean.
        per_record = "" if self.aggregate == "mean" else f" ({self.aggregate} per record)"
        mean = f"; mean {self.key}{per_record} = {self.total / self.scored:.4f}"
        missing = self.records - self.scored
        return head + mean + (f" ({missing} records without a score)" if missing else "")


class Timed:
    """An iterator that counts the time spent waiting for its items: in a pipe, the stage upstream."""

    def __init__(self, items: Iterator[dict]) -> None:
        self.items, self.waited = items, 0.0

    def __iter__(self) -> Timed:
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.waited += time.perf_counter() - start


def _elapsed(seconds: float, waited: float) -> str:
    """The time spent scoring, and apart from it the time spent reading or waiting for input (an upstream
    `generate` in a pipe), so a slow producer does not read as a slow scorer."""
    work = f"{seconds - waited:.2f}s"
    return work if waited < 1.0 else f"{work} (and {waited:.1f}s reading or waiting for input)"
