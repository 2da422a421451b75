"""`bleuberi eval --agreement`: how often each metric picks the answer people preferred."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bleuberi_cli.common import emit_results, report_reading, say

if TYPE_CHECKING:
    from stages.core.records import ReadOptions
    from stages.eval.config import EvalConfig


def agreement(reading: ReadOptions, output: str | None, config: EvalConfig, *, report: str | None, quiet: bool) -> None:
    """Score every preference pair with every metric (config.metrics) and the baselines; write the pairs
    and the table."""
    from stages.eval.agreement import PairStats, measure_agreement, read_pairs
    from stages.eval.report import agreement_tables

    stats = PairStats()
    pairs = list(read_pairs(reading.input, skip_invalid=reading.skip_invalid, stats=stats))
    result = measure_agreement(
        pairs,
        config.metric_names,
        seed=config.seed,
        resamples=config.bootstrap_resamples,
        dropped_both_bad=stats.dropped_both_bad,
    )
    report_reading(stats, quiet=quiet)
    if not pairs:
        say("no pairs: nothing to measure", quiet=quiet)
    emit_results(
        result.records, result.summary, agreement_tables(result.summary), output=output, report=report, quiet=quiet
    )
