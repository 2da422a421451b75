"""`bleuberi score`: add per-completion metric scores and a per-record aggregate."""

from __future__ import annotations

import time
from collections.abc import Iterator

from bleuberi_cli.common import OutputOpt, QuietOpt, boundary, note_stdin, progress, report_reading, say
from bleuberi_cli.config_options import with_config_options
from stages.core.formats import open_writer
from stages.core.preflight import preflight
from stages.core.records import NORMALISATION_HELP, ReadOptions, ReadStats
from stages.metrics import SPEC_HELP, metric_list
from stages.score import ScoreConfig, score_records

METRIC_LIST = metric_list()

HELP = f"""Score each record's `completions` against its `references` (all references at once).

Adds `scores` ({{metric: [one float per completion]}}), `score` (the record's aggregate) and
`scoring` (metric signatures). Streams: records are written as soon as they are scored, in order.
Each metric's range is listed below: reference metrics are on 0..1, `emb` is a cosine (-1..1, in
practice 0..1); `rm:PATH` / `rm-url:URL` give raw reward-model scores of the conversation (prompt +
completion), which `select` can rank by ("hard by RM"). `py:FILE.py:FUNCTION` is your own reward
(README: "Your own reward"); a None it returns is written as null and left out of `score`. {SPEC_HELP}

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

{NORMALISATION_HELP}
"""


@with_config_options(ScoreConfig, reading=ReadOptions)
def score(config: ScoreConfig, reading: ReadOptions, output: OutputOpt = None, quiet: QuietOpt = False) -> None:
    with boundary():
        scorer = config.scorer
        preflight(inputs=[reading.input], needs=[spec.needs() for spec in scorer.specs])
        stats = ReadStats()
        note_stdin(reading.input, quiet=quiet)
        records = Timed(reading.records(require=("completions",), stats=stats))
        start = time.perf_counter()
        completions = 0
        total, scored = 0.0, 0
        with open_writer(output) as writer, progress("scoring", quiet=quiet) as advance:
            for record in score_records(records, scorer, jobs=config.jobs):
                writer.write(record)
                completions += len(record["completions"])
                if record["score"] is not None:  # None: a `py:` function rewarded none of its completions
                    total, scored = total + record["score"], scored + 1
                advance(1)
        report_reading(stats, quiet=quiet)
        mean = total / scored if scored else float("nan")
        # `score` is each record's aggregate of its completions; say so only when it is not the mean.
        per_record = "" if scorer.aggregate == "mean" else f" ({scorer.aggregate} per record)"
        say(
            f"scored {writer.count} records ({completions} completions) in "
            f"{_elapsed(time.perf_counter() - start, records.waited)}; mean {scorer.score_key}{per_record} = {mean:.4f}"
            + (f" ({writer.count - scored} records without a score)" if scored < writer.count else "")
            + (f"; written to {output}" if output else ""),
            quiet=quiet,
        )


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
