"""The `bleuberi` command: a thin typer shell over the `stages` library."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer

from bleuberi_cli import env_cmd, eval_cmd, generate_cmd, run_cmd, score_cmd, select_cmd, split_cmd, train_cmd
from bleuberi_cli.common import State
from bleuberi_cli.help import PanelledCommand

app = typer.Typer(
    name="bleuberi",
    help=(
        "Align language models to follow instructions with BLEU against reference answers as the GRPO reward. "
        "Subcommands read and write JSONL (stdin/stdout by default) so they pipe: "
        "generate | score | select | train."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from stages.core.versions import package_version

        sys.stdout.write(f"bleuberi {package_version('bleuberi')}\n")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show tracebacks with errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    State.verbose = verbose


# Each command, its help, and the function typer runs for it (its options from its signature: cli_command).
for name, help_text, function in (
    ("split", split_cmd.HELP, split_cmd.split),
    ("generate", generate_cmd.HELP, generate_cmd.generate),
    ("score", score_cmd.HELP, score_cmd.score),
    ("select", select_cmd.HELP, select_cmd.select),
    ("train", train_cmd.HELP, train_cmd.train),
    ("eval", eval_cmd.HELP, eval_cmd.eval_command),
    ("run", run_cmd.HELP, run_cmd.run_command),
    ("env", env_cmd.HELP, env_cmd.env_command),
):
    app.command(name, help=help_text, cls=PanelledCommand)(function)


def main() -> None:
    # peft (0.21.2, the newest) reads `is_gradient_checkpointing`, which transformers 5.23 deprecates; not
    # actionable by a user. Look again with the next peft (pyproject.toml's test filters name it too).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    app()


if __name__ == "__main__":
    main()
