"""`--help` that puts first what most runs need, and `--help-all` with everything.

A command with many options (train has over a hundred) lists under `--help` only its inputs and outputs
and the handful of options most runs set (its `ESSENTIAL` names), then says how many more there are and
where they are: `--help-all` (every option, grouped under its panel) and docs/options.md. Its long
description is cut to the first paragraph and the examples. The help is plain text (no rich boxes), and
every command also takes -v/--verbose after its name, as `bleuberi -v CMD` does before it.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

import typer
import typer._click.exceptions as click_errors  # typer's own click: the errors its parser raises
import typer.core

from bleuberi_cli.common import State
from stages.core.declare import check_value

VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_ROW = ("-v, --verbose", "Show tracebacks with errors.")
HELP_ALL = "--help-all"
HELP_ALL_ROW = (HELP_ALL, "Show every option, by panel, and exit.")
IO_OPTIONS = ("input",)  # of the reading options, the one most runs set (the field maps are in --help-all)


class PanelledCommand(typer.core.TyperCommand):
    """Plain-text help: with `essential` names, the short form above; else (and with --help-all) every
    option under its panel (a config field's `panel`), the ungrouped ones first under "Options"."""

    essential: tuple[str, ...] | None = None

    @classmethod
    def with_essentials(cls, names: tuple[str, ...] | None) -> type[PanelledCommand]:
        return type(cls.__name__, (cls,), {"essential": names}) if names else cls

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        taking_values = {
            opt for param in self.get_params(ctx) if not getattr(param, "is_flag", True) for opt in param.opts
        }
        kept: list[str] = []
        for i, arg in enumerate(args):
            if arg == "--":
                kept += args[i:]
                break
            if kept and kept[-1] in taking_values:  # some option's value
                kept.append(arg)
            elif arg in VERBOSE_FLAGS:
                State.verbose = True
            elif arg == HELP_ALL:  # every command takes it; one with a short --help then lists every option
                ctx.meta["help_all"] = True
                kept.append("--help")
            else:
                kept.append(arg)
        try:
            return super().parse_args(ctx, list(kept))  # the parser consumes its list: keep ours for messages
        except click_errors.UsageError as error:  # one line naming the option and what it takes, exit 2
            sys.stderr.write(f"bleuberi: error: {usage_line(error, kept)}\n")
            raise typer.Exit(2) from None

    def _short(self, ctx: Any) -> bool:
        return self.essential is not None and not ctx.meta.get("help_all")

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
        sections = self._short_sections(shown) if self._short(ctx) else _all_sections(shown)
        for title, rows in sections:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        if self._short(ctx):
            hidden = len(shown) - sum(len(rows) for _, rows in sections) + 2  # -v and --help-all are not params
            formatter.write_paragraph()
            formatter.write_text(
                f"{hidden} more options, under their panels: bleuberi {ctx.info_name} --help-all, or docs/options.md."
            )

    def _short_sections(self, shown: list[tuple[Any, Any]]) -> list[tuple[str, list[Any]]]:
        """Inputs and outputs (the command's own options, and -i), the essential options in their order,
        then -v, --help-all and -h."""
        essential = self.essential or ()
        deferred = getattr(self.callback, "config_options", frozenset())  # a config's: --help-all has them
        io, common, last = [], {}, []
        for param, record in shown:
            if param.name == "help":
                last.append(record)
            elif param.name in essential:
                common[param.name] = record
            elif param.name in IO_OPTIONS:
                io.insert(0, record)  # where records come from, first
            elif param.name not in deferred:
                io.append(record)
        ordered = [common[name] for name in essential if name in common]
        return [("Inputs and outputs", io), ("Most used", ordered), ("Options", [VERBOSE_ROW, HELP_ALL_ROW, *last])]


def _all_sections(shown: list[tuple[Any, Any]]) -> list[tuple[str, list[Any]]]:
    arguments: list[Any] = []
    panels: dict[str, list[Any]] = {"Options": []}
    for param, record in shown:
        if param.param_type_name == "argument":
            arguments.append(record)
        else:
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
    panels["Options"].insert(-1, VERBOSE_ROW)  # before -h, --help
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
