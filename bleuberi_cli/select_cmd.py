"""`bleuberi select`: keep the N hardest (or easiest, middle, random) records of a scored pool."""

from __future__ import annotations

from typing import Annotated

import typer

from bleuberi_cli.common import OutputAtOnceOpt, QuietOpt, console, note_stdin, report_reading, say
from bleuberi_cli.config_options import cli_command
from stages.core.formats import open_writer
from stages.core.preflight import Output, preflight
from stages.core.records import ReadOptions, ReadStats
from stages.select import SelectConfig, quantiles, select_records

HELP = """Pick N records by their `score` (from `bleuberi score`).

Modes: hard = the N lowest scores (the BLEUBERI recipe: train where the model is weakest), easy = the
N highest, medium = N around the median, random = a seeded sample (needs no scores). Ties are broken
by a seeded hash of the id, so the choice does not depend on input order. Selected records keep their
input order and gain a `selection` field {mode, rank, pool_size, seed}.

Reads the whole pool into memory (selection needs to see every score).

\b
Examples:
  bleuberi score -i pool.jsonl | bleuberi select --mode hard -n 5000 > hard.jsonl
  bleuberi select -i scored.jsonl --fraction 0.1 --plot scores.png
"""


@cli_command({"config": SelectConfig, "reading": ReadOptions})
def select(
    config: SelectConfig,
    reading: ReadOptions,
    output: OutputAtOnceOpt = None,
    plot: Annotated[
        str | None,
        typer.Option("--plot", metavar="FILE.png", help="Write a histogram of pool scores with the selection marked."),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    preflight(inputs=[reading.input], outputs=[Output(output), Output(plot, "--plot", example="scores.png")])
    stats = ReadStats()
    note_stdin(reading.input, quiet=quiet)
    require = () if config.mode == "random" else ("score",)
    pool = list(reading.records(require=require, stats=stats))
    selection = select_records(pool, config)
    if plot:
        from stages.select import plot_histogram

        plot_histogram(selection, plot, config.mode)
    with open_writer(output) as writer:
        for record in selection.chosen:
            writer.write(record)
    report_reading(stats, quiet=quiet)
    if shortfall := config.shortfall(len(pool)):
        say(f"note: {shortfall}", quiet=quiet)
    if not quiet:
        _summary(len(pool), selection, config.mode, plot, output)


def _summary(pool_size: int, selection, mode: str, plot: str | None, output: str | None) -> None:
    from rich.table import Table

    written = f"; written to {output}" if output else ""
    if not pool_size:  # a filter in a pipe: nothing came, nothing to do
        console.print(f"no records: nothing to select from{written}", markup=False)
        return
    console.print(f"selected {len(selection.chosen)} of {pool_size} records (mode {mode}){written}", markup=False)
    if selection.pool_scores:
        table = Table("score", "min", "p25", "median", "p75", "max", box=None, pad_edge=False)
        for name, values in (("pool", selection.pool_scores), ("selected", selection.chosen_scores)):
            q = quantiles(values)
            table.add_row(name, *(f"{q[k]:.4f}" for k in ("min", "p25", "median", "p75", "max")) if q else ["-"] * 5)
        console.print(table)
    if plot:
        console.print(f"histogram written to {plot}", markup=False)
