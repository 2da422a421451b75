"""A command's options made from config dataclasses (see stages/core/declare.py), so each option is
declared once, on its config field.

    @cli_command({"config": TrainConfig, "reading": ReadOptions})
    def train(output_dir: ..., config: TrainConfig, reading: ReadOptions) -> None: ...

typer takes a command's options from the parameters of the function it runs, and nothing else in its
public API adds one. So the decorator returns that function: it takes the command's own parameters
(minus the configs), one option per config field (nested groups flattened) and -v/--help-all, which
every command takes; it builds each config from its options' values and calls the command with them.
An option left out, or a list option left empty, keeps the field's default.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from bleuberi_cli.common import HelpAllOpt, VerboseOpt, boundary
from stages.core.declare import Leaf, build, leaves, name_options
from stages.core.errors import UsageError


def flags_of(leaf: Leaf) -> tuple[str, ...]:
    """The option's names: declared ones, else --field-name (a bool that may be on or off: --x/--no-x)."""
    if leaf.info.flags:
        return leaf.info.flags
    flag = "--" + leaf.name.replace("_", "-")
    if _is_bool(leaf.hint) and (leaf.default is not False):
        return (f"{flag}/--no-{flag[2:]}",)
    return (flag,)


def sentence(help: str) -> str:
    """A config comment as --help text: a capital and a full stop, unless it starts with a value list
    (`grpo | sft`) or a name (`constant_with_warmup`), which keep their case."""
    first, _, rest = help.partition(" ")
    if first.rstrip(":,").isalpha() and first.islower() and not rest.startswith("|"):
        help = first.capitalize() + " " + rest
    return help if help.endswith(".") else help + "."


def _is_bool(hint: Any) -> bool:
    return hint is bool or (typing.get_origin(hint) in (typing.Union, _union_type()) and bool in typing.get_args(hint))


def _union_type() -> Any:
    import types

    return types.UnionType


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) is list


def cli_parameter(leaf: Leaf) -> inspect.Parameter:
    """A typer option for one config field."""
    info = leaf.info
    settings: dict[str, Any] = {"help": sentence(info.help), "rich_help_panel": info.panel}
    if info.metavar:
        settings["metavar"] = info.metavar
    if info.envvar:
        settings["envvar"] = info.envvar
    hint, default = leaf.hint, leaf.default
    if info.choices:  # a str whose values come from a registry: typer shows and checks Literal values
        hint = typing.Literal[info.choices]  # type: ignore[valid-type]
    if _is_list(hint):  # typer wants `list[T] | None = None`; None (or empty) keeps the field's default
        hint, default = hint | None, None
        settings["show_default"] = ", ".join(map(str, leaf.default)) or False
    option = typer.Option(*flags_of(leaf), **settings)
    return inspect.Parameter(
        leaf.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[hint, option]
    )


def cli_leaves(config_class: type) -> list[Leaf]:
    return [leaf for leaf in leaves(config_class) if leaf.info.cli]


# Options every command takes after its name, last (before -h/--help); not the command's to see.
COMMON = (
    inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
    inspect.Parameter("help_all", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=HelpAllOpt),
)


def cli_command(
    configs: Mapping[str, type] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The function typer runs for a command: the command's own options, one per field of each config class
    in `configs` (by the parameter that receives it built: `{"config": TrainConfig, "reading": ReadOptions}`),
    and -v/--help-all; it builds the configs and calls the command inside the error boundary."""
    configs = dict(configs or {})
    options = {name: cli_leaves(cls) for name, cls in configs.items()}
    fields = [leaf for config_leaves in options.values() for leaf in config_leaves]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        # Not typing.get_type_hints: before Python 3.11 it wraps the hint of a parameter that defaults to None in
        # Optional[...], which hides an Annotated option from typer (`-o` would be unknown).
        hints = inspect.get_annotations(command, eval_str=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name not in configs
        ]
        parameters = [*own, *(cli_parameter(leaf) for leaf in fields), *COMMON]
        names = [p.name for p in parameters]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise TypeError(f"{command.__name__}: an option is declared twice: {twice}")

        def run(**values: Any) -> Any:
            with boundary():  # a refused setting, like any library error, is one line and an exit code
                built = {}
                for name, cls in configs.items():  # a loop, not a helper: a flag's value reaches its field sooner
                    given = {leaf.name: values[leaf.name] for leaf in options[name]}
                    given = {key: value for key, value in given.items() if value not in (None, [])}  # not given
                    try:
                        built[name] = build(cls, given)
                    except UsageError as error:
                        raise UsageError(name_options(str(error), fields, first_flag)) from None
                return command(**{p.name: values[p.name] for p in own}, **built)

        # typer reads the options from this signature (the only way its public API takes options made at run time).
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__name__, run.__doc__ = command.__name__, command.__doc__
        return run

    return decorate


def first_flag(leaf: Leaf) -> str:
    """How an error names an option: its first flag (`--temperature`, `-n` for select's num)."""
    return flags_of(leaf)[0].split("/")[0]
