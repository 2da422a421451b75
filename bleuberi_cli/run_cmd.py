"""`bleuberi run`: select, train and evaluate in one command, from a config file."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bleuberi_cli.common import QuietOpt, StepProgress, console, duration, say
from bleuberi_cli.config_options import cli_command

if TYPE_CHECKING:
    from stages.run.config import RunConfig
    from stages.run.recipe import RunResult

HELP = """Run the BLEUBERI recipe (select, train, eval) end to end in one run folder.

\b
  1. select  the base model answers the pool; the hardest N answers by BLEU are kept
  2. train   GRPO + LoRA with BLEU against the references as the reward
  3. eval    base vs trained on the held-out set: paired intervals, wins, a length control, a verdict

With no CONFIG it runs the demo: the embedded model (smollm2-135m) and demo data, sized to finish
in 7 to 10 minutes on a 2-core CPU. Precedence: --set KEY=VALUE > CONFIG > built-in defaults;
unknown keys and wrong types are errors. A rerun skips the stages whose configuration and inputs are
unchanged (hashes in RUN_DIR/stages.json) and continues an interrupted stage where it stopped.

Outputs in the run folder: config.toml (resolved), stages.json, pool.generated.jsonl,
pool.scored.jsonl, selected.jsonl, train/ (adapter/, checkpoints/, metrics.jsonl, reward.png),
eval/ (records.jsonl, report.md, report.json). stdout gets one JSON record, the eval summary, unless it is a
terminal (the tables show it; the record is in eval/report.json).

\b
Examples:
  bleuberi run                                          # the demo, into runs/demo
  bleuberi run --print-config > my.toml                 # every option, with comments
  bleuberi run my.toml -o runs/mine --set train.max_steps=100 --set select.num=500
"""


@cli_command()
def run_command(
    config: Annotated[
        Path | None, typer.Argument(metavar="CONFIG.toml", help="Run configuration; default: the demo.")
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output-dir", metavar="DIR", help="Run folder. Default: runs/<config name>, or runs/demo."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override one option, e.g. train.max_steps=10; repeatable."),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved configuration as commented TOML and exit.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    from stages.run.config_file import load_config, to_toml

    resolved = load_config(config, set_ or [], on_note=lambda note: say(f"note: {note}", quiet=quiet))
    if print_config:
        sys.stdout.write(to_toml(resolved))
        return
    from stages.core.jsonl import JsonlWriter
    from stages.eval.report import eval_tables, print_tables
    from stages.run.recipe import headline, run_recipe

    run_dir = output_dir or Path("runs") / (config.stem if config else "demo")
    _preflight(resolved, run_dir)
    say(f"run folder: {run_dir}", quiet=quiet)
    # One live display at a time (rich allows no more): the training step line, which select and
    # eval use for their progress too (off a terminal: a line per batch).
    steps = StepProgress(quiet)
    with steps as show_step:
        result = run_recipe(
            resolved, run_dir, say=lambda m: say(m, quiet=quiet), on_train_step=show_step, on_progress=steps.stage
        )
    if not _terminal(sys.stdout):  # for a pipe or a file; a person reads the tables (and eval/report.json)
        with JsonlWriter(None, tolerate_closed_stdout=True) as stdout:
            stdout.write({"run_dir": str(run_dir), "ran": result.ran, "skipped": result.skipped, **result.summary})
    if not quiet:
        print_tables(eval_tables(result.summary), console)
        console.print(headline(result.summary, resolved), markup=False)
        say(stage_times(result))
        say(where_things_are(run_dir))


def _preflight(resolved: RunConfig, run_dir: Path) -> None:
    """What a run needs, checked before any stage works: records in both data files, then the run folder,
    the model, the adapters [eval] names and what every metric needs."""
    from stages.core.errors import ConfigError
    from stages.core.preflight import Output, preflight
    from stages.run.config import empty_input
    from stages.run.recipe import TRAINED_ADAPTER, eval_config

    if problem := empty_input(resolved.data):  # the data files first: a missing one is named here
        raise ConfigError(f"{problem}: a run needs records in data.pool and data.heldout")
    evaluation = eval_config(resolved, TRAINED_ADAPTER)
    specs = [*resolved.score.scorer.specs, *resolved.train.rewards, *evaluation.metric_specs]
    adapters = [system.adapter for system in resolved.eval.systems]  # the trained one does not exist yet
    preflight(
        outputs=[Output(run_dir, folder=True)],
        models=[resolved.model.model],
        adapters=adapters,
        needs=[spec.needs() for spec in specs],
    )


def _terminal(stream: object) -> bool:
    try:
        return os.isatty(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # a captured stream (tests) is no terminal
        return False


def stage_times(result: RunResult) -> str:
    """How long each stage took this time (one that was up to date took none)."""
    parts = [f"{stage} {duration(result.seconds[stage])}" for stage in result.ran]
    parts += [f"{stage} up to date" for stage in result.skipped]
    total = f" (total {duration(sum(result.seconds.values()))})" if len(result.ran) > 1 else ""
    return "stage times: " + ", ".join(parts) + total


def where_things_are(run_dir: Path) -> str:
    """The last line of a run: where to look next."""
    train = run_dir / "train"
    parts = [f"report in {run_dir / 'eval' / 'report.md'}", f"adapter in {train / 'adapter'}"]
    parts.append(f"training metrics in {train / 'metrics.jsonl'}")
    if (train / "reward.png").is_file():
        parts.append(f"reward curve in {train / 'reward.png'}")
    return "done: " + "; ".join(parts)
