"""What every subcommand shares: the stderr console, option aliases, the error boundary, progress."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated

import click
import typer
import typer.core
from rich.console import Console

from stages.core.errors import BleuberiError, Interrupted, OutputClosed
from stages.core.records import FieldMap, ReadStats

# Progress, logs and summaries go to stderr; stdout carries only records.
# Off a terminal (a log file, CI) rich would assume 80 columns and cut table headers; a log has no width.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 10_000)


class State:
    verbose = False


class PanelledCommand(typer.core.TyperCommand):
    """Plain-text help with the options grouped under their panels (a config field's `panel`), the
    ungrouped ones first under "Options"."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        arguments: list[tuple[str, str]] = []
        panels: dict[str, list[tuple[str, str]]] = {"Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append(record)
            else:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        sections = ([("Arguments", arguments)] if arguments else []) + list(panels.items())
        for title, rows in sections:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


InputOpt = Annotated[
    str | None,
    typer.Option(
        "-i",
        "--input",
        metavar="FILE",
        help="Records: .jsonl[.gz], .parquet, .csv, .tsv, .json (an array), or a `datasets` save_to_disk folder "
        "(by name). Default: stdin ('-'), JSONL.",
        show_default=False,
    ),
]
# Other schemas: which fields hold the prompt, the references and the id (see README "Input formats").
PromptFieldOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt-field",
        metavar="PATH",
        help="Take the prompt from this field (dotted for nested ones); a chat list becomes `messages`.",
        show_default=False,
    ),
]
ReferenceFieldOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--reference-field",
        metavar="PATH",
        help="Take the references from this field (a string or a list; repeat for several), "
        "e.g. reward_model.ground_truth.",
        show_default=False,
    ),
]
IdFieldOpt = Annotated[
    str | None, typer.Option("--id-field", metavar="PATH", help="Take the id from this field.", show_default=False)
]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="JSONL output, or Parquet for FILE.parquet; written to a temporary file and renamed on success "
        "('.gz' compresses). Default: stdout (JSONL).",
        show_default=False,
    ),
]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or summary on stderr (errors still show).")]
SkipInvalidOpt = Annotated[
    bool,
    typer.Option(
        "--skip-invalid", help="Skip records that fail validation (counted in the summary) instead of stopping."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Random seed: same seed, same result.")]


def say(message: str, *, quiet: bool = False) -> None:
    """One line of human information on stderr (never markup-interpreted)."""
    if not quiet:
        console.print(message, markup=False)


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """Turn library errors into one line on stderr and an exit code (1 input/runtime, 2 usage).

    A closed stdout (`| head`) ends the command quietly with status 0. `--verbose` adds tracebacks.
    """
    try:
        yield
    except (OutputClosed, BrokenPipeError):
        raise typer.Exit(0) from None
    except Interrupted as stopped:
        sys.stderr.write(f"bleuberi: {stopped}\n")
        raise typer.Exit(stopped.exit_code) from None
    except BleuberiError as error:
        if State.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"bleuberi: error: {error}\n")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("bleuberi: interrupted (files already written are complete; rerun to continue)\n")
        raise typer.Exit(130) from None
    except Exception as error:
        # Disk full where no writer of ours named the file (stdout, a library's own write): still one line.
        from stages.core.files import out_of_space

        cause = out_of_space(error)
        if cause is None:
            raise
        if State.verbose:
            traceback.print_exc(file=sys.stderr)
        where = getattr(error, "filename", None) or "an output file"
        sys.stderr.write(f"bleuberi: error: {where}: cannot write: {cause}\n")
        raise typer.Exit(1) from None


def note_stdin(input: str | None, *, quiet: bool) -> None:
    """A command waiting on a terminal looks hung: say what it is waiting for."""
    if (input is None or input == "-") and sys.stdin is not None and sys.stdin.isatty():
        say("reading records from stdin (end with Ctrl-D; -i FILE reads a file)", quiet=quiet)


def report_reading(stats: ReadStats, *, quiet: bool) -> None:
    """Mention skipped records (always: skipping data silently would hide problems)."""
    if stats.skipped:
        sys.stderr.write(f"bleuberi: skipped {stats.skipped} invalid record(s); first: {stats.first_errors[0]}\n")
        for more in stats.first_errors[1:]:
            say(f"  also: {more}", quiet=quiet)


def read_all_records(
    input: str | None,
    *,
    skip_invalid: bool,
    quiet: bool,
    purpose: str,
    references_optional: bool = False,
    fields: FieldMap | None = None,
) -> list[dict]:
    """Every record of a stage that needs them all at once (train, eval); says so when there are none."""
    from stages.core.records import read_records

    stats = ReadStats()
    note_stdin(input, quiet=quiet)
    records = list(
        read_records(
            input, skip_invalid=skip_invalid, stats=stats, references_optional=references_optional, fields=fields
        )
    )
    report_reading(stats, quiet=quiet)
    if not records:
        say(f"no records: nothing to {purpose}", quiet=quiet)
    return records


def emit_results(
    records: list[dict], summary: dict, tables: list, *, output: str | None, report: str | None, quiet: bool
) -> None:
    """What eval and eval --agreement leave: records on stdout (or -o), tables on stderr, a report file."""
    from stages.core.formats import open_writer
    from stages.eval.report import print_tables, write_report

    with open_writer(output, tolerate_closed_stdout=True) as writer:
        for record in records:
            writer.write(record)
    if not quiet:
        print_tables(tables, console)
    if report:
        write_report(report, summary, tables)
        say(f"report written to {report}", quiet=quiet)


@contextlib.contextmanager
def progress(
    description: str, *, quiet: bool, total: int | None = None, unit: str = "records"
) -> Iterator[Callable[[int], None]]:
    """A live progress bar on stderr when it is a terminal; otherwise nothing. Yields `advance(n)`."""
    if quiet or not console.is_terminal:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    count = [0]
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            count[0] += n
            rate = count[0] / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f} {unit}/s")

        yield advance


class StepProgress:
    """One live line on stderr (when it is a terminal) with the latest training step's numbers (train, run)."""

    def __init__(self, quiet: bool) -> None:
        self.live = None if quiet or not console.is_terminal else True

    def __enter__(self):
        if self.live:
            from rich.live import Live

            self.live = Live("starting...", console=console, transient=True, refresh_per_second=4)
            self.live.__enter__()
        return self.show

    def show(self, record: dict) -> None:
        if self.live:
            parts = [f"step {record['step']}"]
            for key in ("reward_mean", "kl", "loss", "completion_length_mean", "seconds"):
                if key in record:
                    parts.append(f"{key} {record[key]:.4g}")
            self.live.update(" | ".join(parts))

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(*exc)
