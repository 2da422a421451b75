"""Command-line options made from a config dataclass (see stages/core/options.py), so each option is
declared once, on its config field.

    @app.command()
    @with_config_options(TrainConfig)
    def train(output_dir: ..., config: TrainConfig) -> None: ...

typer reads a command's parameters from its signature. The decorator gives the command the signature
typer should see: the function's own parameters (minus `config`), then one option per config field
(nested groups flattened); when the command runs, it builds the config from those options and passes
it as `config`. A list option left empty, like any option left out, keeps the field's default.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from bleuberi_cli.common import boundary
from stages.core.declare import Leaf, build, leaves, name_options
from stages.core.errors import UsageError

CONFIG_PARAMETER = "config"


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


def with_config_options(
    config_class: type | None = None, **groups: type
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of `config_class` (it receives the built config as `config`) and
    of each class in `groups` (received under its keyword: `reading=ReadOptions` -> `reading`)."""
    if config_class is not None:
        groups = {CONFIG_PARAMETER: config_class, **groups}
    options = {name: cli_leaves(cls) for name, cls in groups.items()}
    names = {group: {leaf.name for leaf in group_leaves} for group, group_leaves in options.items()}
    fields = [leaf for group_leaves in options.values() for leaf in group_leaves]
    field_names = {leaf.name for leaf in fields}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        # Not typing.get_type_hints: before Python 3.11 it wraps the hint of a parameter that defaults to None
        # in Optional[...], which hides an Annotated option from typer (`-o` would be unknown).
        hints = inspect.get_annotations(command, eval_str=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name not in groups
        ]
        clash = {p.name for p in own} & field_names
        if clash or len(field_names) < len(fields):
            raise TypeError(f"{command.__name__}: an option is declared twice ({sorted(clash)} or in two groups)")

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            built = {}
            with boundary():  # a refused setting is the command's one-line usage error, naming its flag
                for group, cls in groups.items():
                    values = {k: v for k, v in kwargs.items() if k in names[group] and v is not None and v != []}
                    try:
                        built[group] = build(cls, values)
                    except UsageError as error:
                        raise UsageError(
                            name_options(str(error), fields, lambda leaf: flags_of(leaf)[0].split("/")[0])
                        ) from None
            rest = {k: v for k, v in kwargs.items() if k not in field_names}
            return command(**rest, **built)

        parameters = [*own, *(cli_parameter(leaf) for leaf in fields)]
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.config_options = frozenset(field_names)  # type: ignore[attr-defined]  # what --help may defer
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must read the signature above, not the function's own
        return run

    return decorate
