"""`--help` that puts first what most runs need, and `--help-all` with everything.

A command with many options (train has over a hundred) lists under `--help` only its inputs and outputs
and the handful of options most runs set (SHORT_HELP names them), then says how many
more there are and where they are: `--help-all` (every option, grouped under its panel) and
docs/options.md. Its long description is cut to the first paragraph and the examples. The help is plain
text (no rich boxes). A command-line mistake is one line naming the option (`usage_line`).
"""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass
from typing import Any

import typer
import typer._click.exceptions as click_errors  # typer's own click: the errors its parser raises (not public)
import typer.core

from bleuberi_cli.common import HELP_ALL
from bleuberi_cli.config_options import cli_leaves
from stages.core.declare import check_value
from stages.core.records import ReadOptions
from stages.eval.config import EvalConfig
from stages.generate import GenerateConfig
from stages.score import ScoreConfig
from stages.train.config import TrainConfig

IO_OPTIONS = ("input",)  # of the reading options, the one most runs set (the field maps are in --help-all)
LAST = ("verbose", "help")  # the options every command takes, listed last


@dataclass(frozen=True)
class ShortHelp:
    """What a long command's --help lists: its inputs and outputs (its own options, and -i), then the
    `essential` options in this order; its configs' other options wait for --help-all."""

    configs: tuple[type, ...]
    essential: tuple[str, ...]


# The commands with a short --help, and what most of their runs set (the others list every option).
SHORT_HELP: dict[str, ShortHelp] = {
    "generate": ShortHelp(
        (GenerateConfig, ReadOptions),
        (
            "model",
            "adapter",
            "num_samples",
            "max_new_tokens",
            "temperature",
            "max_prompt_length",
            "batch_size",
            "backend",
            "device",
        ),
    ),
    "score": ShortHelp((ScoreConfig, ReadOptions), ("metrics", "weights", "combine", "aggregate", "jobs")),
    "train": ShortHelp(
        (TrainConfig, ReadOptions),
        (
            "model",
            "reward",
            "algo",
            "max_steps",
            "learning_rate",
            "num_generations",
            "max_completion_length",
            "per_device_train_batch_size",
            "max_prompt_length",
            "save_steps",
            "beta",
            "backend",
            "dtype",
        ),
    ),
    "eval": ShortHelp(
        (EvalConfig, ReadOptions),
        (
            "model",
            "adapters",
            "answers",
            "metrics",
            "max_new_tokens",
            "max_prompt_length",
            "batch_size",
            "backend",
            "device",
        ),
    ),
}


class PanelledCommand(typer.core.TyperCommand):
    """Plain-text help: every option under its panel (a config field's `panel`), the ungrouped ones first
    under "Options"; for a command in SHORT_HELP, the short form above (and with --help-all, every
    option). A usage error: one line (`usage_line`), exit 2."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # Overridden only for the one-line usage error: its parser raises typer's click errors, which typer's
        # public API neither exports nor lets a command format.
        given = list(args)  # the parser consumes its list: keep ours for the message
        try:
            return super().parse_args(ctx, args)
        except click_errors.UsageError as error:
            sys.stderr.write(f"bleuberi: error: {usage_line(error, given)}\n")
            raise typer.Exit(2) from None

    def _short(self, ctx: Any) -> bool:
        return self.name in SHORT_HELP and not ctx.meta.get(HELP_ALL)

    def format_help_text(self, ctx: Any, formatter: Any) -> None:
        if not self._short(ctx):
            return super().format_help_text(ctx, formatter)
        full = self.help
        self.help = short_description(full or "")
        try:
            super().format_help_text(ctx, formatter)
        finally:
            self.help = full

    def format_options(self, ctx: Any, formatter: Any) -> None:
        records = [(param, param.get_help_record(ctx)) for param in self.get_params(ctx)]
        shown = [(param, record) for param, record in records if record is not None]
        if self._short(ctx):  # --help-all is hidden (the full help would list it): the short help lists it by hand
            help_all = next(param for param in self.get_params(ctx) if param.name == "help_all")
            sections = self._short_sections(shown, (help_all.opts[0], help_all.help))
        else:
            sections = _all_sections(shown)
        for title, rows in sections:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        if self._short(ctx):
            hidden = len(shown) - sum(len(rows) for _, rows in sections) + 1  # --help-all's row is not in `shown`
            formatter.write_paragraph()
            formatter.write_text(
                f"{hidden} more options, under their panels: bleuberi {ctx.info_name} --help-all, or docs/options.md."
            )

    def _short_sections(self, shown: list[tuple[Any, Any]], help_all: tuple[str, str]) -> list[tuple[str, list[Any]]]:
        """Inputs and outputs (the command's own options, and -i), the essential options in their order,
        then -v, --help-all and -h."""
        layout = SHORT_HELP[self.name or ""]
        deferred = {leaf.name for cls in layout.configs for leaf in cli_leaves(cls)}
        io, common, last = [], {}, {}
        for param, record in shown:
            if param.name in LAST:
                last[param.name] = record
            elif param.name in layout.essential:
                common[param.name] = record
            elif param.name in IO_OPTIONS:
                io.insert(0, record)  # where records come from, first
            elif param.name not in deferred:
                io.append(record)
        ordered = [common[name] for name in layout.essential if name in common]
        return [
            ("Inputs and outputs", io),
            ("Most used", ordered),
            ("Options", [last["verbose"], help_all, last["help"]]),
        ]


def _all_sections(shown: list[tuple[Any, Any]]) -> list[tuple[str, list[Any]]]:
    arguments: list[Any] = []
    panels: dict[str, list[Any]] = {"Options": []}
    for param, record in shown:
        if param.param_type_name == "argument":
            arguments.append(record)
        else:
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
    return ([("Arguments", arguments)] if arguments else []) + list(panels.items())


def usage_line(error: Exception, args: list[str]) -> str:
    """A command-line mistake as one line: the option, what it takes and what it got."""
    if isinstance(error, click_errors.NoSuchOption):
        close = f" (did you mean {error.possibilities[0]}?)" if error.possibilities else ""
        return f"no such option {error.option_name}{close}"
    if isinstance(error, click_errors.BadOptionUsage) and "requires an argument" in error.format_message():
        return f"{error.option_name} needs a value"
    param = getattr(error, "param", None)
    if param is None or not getattr(param, "opts", None):
        return error.format_message()  # type: ignore[attr-defined]
    flag = "/".join(param.opts)
    if isinstance(error, click_errors.MissingParameter):
        return f"{flag} is needed"
    descriptor = getattr(param, "type_descriptor", None)
    hint = getattr(descriptor, "annotation", None)
    wanted = expected(hint) if hint is not None else "another value"
    given = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in param.opts), None)
    return f"{flag}: expected {wanted}" + (f", got {given!r}" if given is not None else "")


def expected(hint: Any) -> str:
    """What a value of the type `hint` is, in the words config errors use ("a number", "one of 'a', 'b'")."""
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]  # a repeated option: each value
    return check_value(_NOTHING, hint) or "another value"


class _Nothing:
    """A value no type accepts, to have `check_value` name what one accepts."""


_NOTHING = _Nothing()


def short_description(text: str) -> str:
    """A command's description for the short help: its first paragraph and its verbatim (`\b`) blocks, the
    examples and lists such as score's metrics."""
    paragraphs = text.strip().split("\n\n")
    blocks = [p for p in paragraphs[1:] if p.startswith("\b")]
    return "\n\n".join([paragraphs[0], *blocks])
