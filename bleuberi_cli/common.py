"""What every subcommand shares: the stderr console, option aliases, the error boundary, progress."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
from rich.console import Console

from stages.core import models
from stages.core.errors import BleuberiError, InputError, Interrupted, OutputClosed, UsageError
from stages.core.records import ReadOptions, ReadStats

if TYPE_CHECKING:
    from stages.core.journal import Finished

# Progress, logs and summaries go to stderr; stdout carries only records.
# Off a terminal (a log file, CI) rich would assume 80 columns and cut table headers; a log has no width.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 10_000)


class State:
    verbose = False
    quiet = False  # the running command's -q (set as its options are parsed)


# Other schemas: which fields hold the prompt, the references and the id (see docs/records.md, "Input formats").
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="JSONL output, or Parquet for FILE.parquet ('.gz' compresses); each finished record goes at once to "
        "a temporary file beside it, renamed to FILE on success (a kill keeps them for --resume). Default: "
        "stdout (JSONL).",
        show_default=False,
    ),
]
# For a command that writes its records at once, at the end (select): no journal to resume from.
OutputAtOnceOpt = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="JSONL output, or Parquet for FILE.parquet ('.gz' compresses); written to a temporary file beside it "
        "and renamed to FILE when complete. Default: stdout (JSONL).",
        show_default=False,
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="With -o: keep what an earlier run of this command finished (FILE, or the temporary file a killed "
        "run left) and do only the rest.",
    ),
]


def _set_quiet(value: bool) -> bool:
    State.quiet = value
    return value


QuietOpt = Annotated[
    bool,
    typer.Option("-q", "--quiet", help="No progress or summary on stderr (errors still show).", callback=_set_quiet),
]


def _set_verbose(value: bool) -> bool:
    if value:  # `bleuberi CMD -v`: as `bleuberi -v CMD` (the root's option) would
        State.verbose = True
    return value


# Every command takes -v after its name too (as `bleuberi -v CMD` before it); cli_command adds it.
VerboseOpt = Annotated[
    bool, typer.Option("-v", "--verbose", help="Show tracebacks with errors.", callback=_set_verbose)
]
HELP_ALL = "help_all"  # in the context's meta while --help-all prints the help


def _print_all_help(ctx: typer.Context, value: bool) -> None:
    if value:
        ctx.meta[HELP_ALL] = True
        typer.echo(ctx.get_help())
        raise typer.Exit()


# Every command takes it; one with a short --help then lists every option. Not listed in the full help
# (the short help lists it by hand).
HelpAllOpt = Annotated[
    bool,
    typer.Option(
        "--help-all",
        help="Show every option, by panel, and exit.",
        is_eager=True,
        hidden=True,
        callback=_print_all_help,
    ),
]


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
        sys.stderr.write(f"bleuberi: {stopped}{_notes(stopped)}\n")
        raise typer.Exit(stopped.exit_code) from None
    except BleuberiError as error:
        if State.verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"bleuberi: error: {error}{_notes(error)}\n")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as stopped:
        kept = _notes(stopped) or " (files already written are complete; rerun to continue)"
        sys.stderr.write(f"bleuberi: interrupted{kept}\n")
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


def _notes(error: BaseException) -> str:
    """What was kept, as writers note it on the error (journals of finished records): on the same line."""
    notes = getattr(error, "__notes__", None)
    return "; " + "; ".join(notes) if notes else ""


def _conversion_notice(message: str) -> None:
    say(message, quiet=State.quiet)


models.conversion_notice = _conversion_notice  # the embedded model's one-time conversion says what it does


def finished_work(
    output: str | None,
    *,
    resume: bool,
    quiet: bool,
    what: str = "records",
    find: Callable[[str, bool], Finished] | None = None,
    needs: str = "-o/--output FILE",
) -> Finished | None:
    """With --resume, what earlier runs of this command finished into `output` (the file and the journals
    killed runs left), said on the first line. Without: a line when killed runs left finished work there
    (kept until this run succeeds). `find(output, with_the_file)` reads it (default: the records by id)."""
    from stages.core.journal import finished

    if resume and output is None:
        raise UsageError(f"--resume needs {needs} (the file to continue)")
    if output is None:
        return None
    find = find or (lambda target, with_file: finished(target, read_target=with_file))
    if resume:
        kept = find(output, True)
        say(kept.kept_line(what), quiet=quiet)
        return kept
    left = find(output, False)
    if left.count:
        say(left.left_line(what), quiet=quiet)
    return None


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
    reading: ReadOptions, *, quiet: bool, purpose: str, references_optional: bool = False, needed: bool = False
) -> list[dict]:
    """Every record of a stage that needs them all at once (generate, train, eval). None at all: a stage
    that `needed` them (training, evaluating on nothing) stops with one line (exit 1); a filter in a pipe
    says so and has nothing to do."""
    from stages.core.jsonl import source_name

    stats = ReadStats()
    note_stdin(reading.input, quiet=quiet)
    records = list(reading.records(stats=stats, references_optional=references_optional))
    report_reading(stats, quiet=quiet)
    if not records and needed:
        raise InputError(source_name(reading.input), None, f"no records to {purpose}")
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


# Off a terminal (a log, CI, nohup) progress is printed as lines: one per finished batch, at most one
# every LOG_EVERY_SECONDS (a fast stream would flood the log), and always the last.
LOG_EVERY_SECONDS = 2.0


def duration(seconds: float) -> str:
    """A short human duration: 45s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# The first finished batch also carries the model's loading and warm-up (often longer than several later
# batches together), so a rate taken over it is far too slow: eval once said "about 14m10s left" and finished
# in 20 s. The rate is measured from the end of the first batch on, and neither it nor the time left is shown
# until MEASURED_BATCHES batches after the first have finished: one batch alone is a poor sample (batches are
# sorted by prompt length, and the last of a window can be smaller). Each call of `advance` with work is one
# finished batch (the stages report per batch).
MEASURED_BATCHES = 2


class ProgressLine:
    """How far a task with a known total is, as one line: done/total, rate and the time left (once measured:
    see MEASURED_BATCHES) and the time so far."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.start = time.perf_counter()
        self.done = 0
        self.first: tuple[float, int] | None = None  # when the first batch finished, and the work done by then
        self.latest: tuple[float, int] | None = None  # the same for the latest batch after it
        self.timed = 0  # batches finished after the first

    def advance(self, n: int) -> None:
        self.done += n
        if n <= 0:  # a total said, or nothing finished: no batch
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done)
        else:
            self.latest, self.timed = (now, self.done), self.timed + 1

    def rate(self) -> float | None:
        """Work per second after the first batch, up to the latest one; None until MEASURED_BATCHES time it."""
        if self.first is None or self.latest is None or self.timed < MEASURED_BATCHES:
            return None
        seconds = self.latest[0] - self.first[0]
        return (self.latest[1] - self.first[1]) / seconds if seconds > 0 else None

    def left(self) -> str:
        """ "about 1m05s left" at the measured rate; "" before it is measured and once all is done."""
        rate = self.rate()
        if self.total is None or self.done >= self.total or not rate:
            return ""
        return f"about {duration((self.total - self.done) / rate)} left"

    def text(self) -> str:
        elapsed = time.perf_counter() - self.start
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        rate = self.rate()
        measured = [] if rate is None else [f"{rate:.3g} {self.unit}/s"]
        if left := self.left():
            measured.append(left)
        head = ", ".join(measured) + "; " if measured else ""
        return f"{self.description}: {count} {self.unit} ({head}{duration(elapsed)} so far)"


class Progress:
    """Call it with how many pieces of work finished; `set_total` once the total is known. Shows a live bar
    on a terminal, lines off one (see LOG_EVERY_SECONDS), nothing when quiet."""

    def __init__(
        self,
        line: ProgressLine,
        bar: Any = None,
        task: Any = None,
        log: bool = False,
        sink: Callable[[str], None] | None = None,
    ) -> None:
        self.line, self.bar, self.task, self.log, self.sink = line, bar, task, log, sink
        self.last_log = time.perf_counter()

    def set_total(self, total: int | None) -> None:
        """The total once it is known (a resumed run has less left to do)."""
        self.line.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def __call__(self, n: int = 1) -> None:
        self.line.advance(n)
        if self.bar is not None:
            rate = self.line.rate()
            shown = "" if rate is None else f"{rate:,.1f} {self.line.unit}/s"
            self.bar.update(self.task, advance=n, rate=shown, left=self.line.left())
        elif self.sink is not None:
            self.sink(self.line.text())
        elif self.log and n and self.line.total is not None:  # without a total a line says too little (streams)
            now = time.perf_counter()
            if now - self.last_log >= LOG_EVERY_SECONDS or self.line.done >= self.line.total:
                self.last_log = now
                say(self.line.text())


@contextlib.contextmanager
def progress(description: str, *, quiet: bool, total: int | None = None, unit: str = "records") -> Iterator[Progress]:
    """Progress on stderr: a live bar on a terminal, else a line per finished batch (tasks with a known
    total only; at most one line every LOG_EVERY_SECONDS). Yields a `Progress`: call it with how many
    finished."""
    line = ProgressLine(description, total, unit)
    if quiet or not console.is_terminal:
        yield Progress(line, log=not quiet)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[left]}"),  # ours, not rich's TimeRemainingColumn: the same rule as the lines
    ]
    with RichProgress(*columns, console=console, transient=True) as bar:
        yield Progress(line, bar, bar.add_task(description, total=total, rate="", left=""))


class StepProgress:
    """One live line on stderr (when it is a terminal) with the latest training step's numbers (train, run),
    or a stage's progress (`stage`: run's select and eval answers; lines off a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = None if quiet or not console.is_terminal else True
        self.stages: dict[str, Progress] = {}
        self.steps: ProgressLine | None = None  # the training steps: done of total, their rate and the time left

    def __enter__(self):
        if self.live:
            from rich.live import Live

            self.live = Live("starting...", console=console, transient=True, refresh_per_second=4)
            self.live.__enter__()
        return self.show

    def show(self, record: dict) -> None:
        """A logged training step: the live line on a terminal; off one (logs, CI, nohup) a line per step,
        so minutes of training are not minutes of silence. Step N/M, the metrics, and once measured (as the
        other stages measure it: from the end of the first step on) the time per step and the time left."""
        total = record.get("total_steps")
        if self.steps is None:
            self.steps = ProgressLine("train", total, "steps")
        self.steps.advance(record["step"] - self.steps.done)
        parts = [f"step {record['step']}" + (f"/{total}" if total else "")]
        for key in ("reward_mean", "kl", "loss", "completion_length_mean", "seconds"):
            if key in record:
                parts.append(f"{key} {record[key]:.4g}")
        if "judge_requests" in record:  # a judge-url reward: what this step asked of it
            parts.append(
                f"judge {record['judge_requests']} requests, {record['judge_cache_hits']} cached, "
                f"{record['judge_nulls']} nulls, {record['judge_seconds']:.3g}s"
            )
        if rate := self.steps.rate():
            parts.append(f"{1 / rate:.3g} s/step" + (f", {left}" if (left := self.steps.left()) else ""))
        if self.live:
            self.live.update(" | ".join(parts))
        elif not self.quiet:
            say("train: " + " | ".join(parts))

    def stage(self, description: str, done: int, total: int, unit: str) -> None:
        """`done` of `total` finished in a stage: the live line on a terminal, else a line per batch."""
        progress = self.stages.get(description)
        if progress is None:
            sink = self.live.update if self.live else None
            progress = self.stages[description] = Progress(
                ProgressLine(description, total, unit), log=not self.quiet and not self.live, sink=sink
            )
        progress.set_total(total)
        progress(done - progress.line.done)

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.live.__exit__(*exc)
