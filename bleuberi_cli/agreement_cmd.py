"""`bleuberi eval --agreement`: how often each metric picks the answer people preferred."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bleuberi_cli.common import emit_results, report_reading

if TYPE_CHECKING:
    from stages.core.records import ReadOptions
    from stages.eval.config import EvalConfig


def agreement(reading: ReadOptions, output: str | None, config: EvalConfig, *, report: str | None, quiet: bool) -> None:
    """Score every preference pair with every metric (config.metrics) and the baselines; write the pairs
    and the table."""
    from stages.core.errors import InputError
    from stages.core.jsonl import source_name
    from stages.eval.agreement import PairStats, measure_agreement, read_pairs
    from stages.eval.report import agreement_tables

    stats = PairStats()
    pairs = list(read_pairs(reading.input, skip_invalid=reading.skip_invalid, stats=stats))
    report_reading(stats, quiet=quiet)
    if not pairs:  # an agreement over no pairs has no figure to report
        dropped = f" ({stats.dropped_both_bad} judged tie (bothbad) were dropped)" if stats.dropped_both_bad else ""
        raise InputError(source_name(reading.input), None, f"no pairs to measure agreement on{dropped}")
    result = measure_agreement(
        pairs,
        config.metric_names,
        seed=config.seed,
        resamples=config.bootstrap_resamples,
        dropped_both_bad=stats.dropped_both_bad,
    )
    emit_results(
        result.records, result.summary, agreement_tables(result.summary), output=output, report=report, quiet=quiet
    )
