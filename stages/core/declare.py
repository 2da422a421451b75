"""Settings declared once: a config dataclass's field carries its default, help, metavar and help panel.

    @dataclass
    class TrainConfig:
        beta: float = option(0.04, "KL weight towards the base model", metavar="B", panel="GRPO loss")
        sampling: SamplingParams = group(SamplingParams, temperature=0.9)

From the field alone the CLI builds `--beta B` (bleuberi_cli/config_options.py), `bleuberi run` checks
and documents the `train.beta` key (stages/run/config.py), and `--print-config` writes its comment.

A group (a dataclass of options) is nested with `group()` in every config that takes it. A nesting may
give the group's options defaults of its own (eval samples greedily: `group(SamplingParams,
temperature=0.0)`) and, for a name an ecosystem fixed, another name (`train` spells max_new_tokens as TRL
does, max_completion_length). A group's options appear flat on the command line (`--temperature`) and in
its config's table, unless the group is a table of its own (`[engine]`).

This module knows no stage and no CLI: the metadata is plain data, read by the CLI (bleuberi_cli/), by
`bleuberi run`'s config file (stages/run/) and by the configs themselves. The groups several stages
share are declared in stages/core/options.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from stages.core.errors import UsageError

META_KEY = "bleuberi"
GROUP_KEY = "bleuberi-group"


@dataclass(frozen=True)
class OptionInfo:
    """How one config field shows on the command line and in the config file."""

    help: str
    metavar: str | None = None
    panel: str | None = None
    flags: tuple[str, ...] = ()  # default: --name (bool: --name alone, or --x/--no-x when it may be on)
    choices: tuple[str, ...] = ()  # for a str field whose values come from a registry (Literal: from its type)
    envvar: str | None = None
    cli: bool = True  # False: a config key only (set by the library or a config file, not a flag)
    key: str | None = None  # the option's name, where it is not the field's (ModelOptions.name is `model`)
    # False for settings that say how a stage runs, not what it computes (threads, a server's address):
    # they do not join `bleuberi run`'s stage hashes, so changing them redoes nothing.
    in_digest: bool = True
    # Another option of the same group that this one excludes (one of the two is given): a value given for
    # either drops the other's default, so a run's default `select.num` yields to a given `select.fraction`.
    excludes: str | None = None


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    metavar: str | None = None,
    panel: str | None = None,
    flags: Sequence[str] = (),
    choices: Sequence[str] = (),
    envvar: str | None = None,
    cli: bool = True,
    key: str | None = None,
    in_digest: bool = True,
    excludes: str | None = None,
) -> Any:
    """A dataclass field with its option metadata (use `factory` for mutable defaults)."""
    info = OptionInfo(help, metavar, panel, tuple(flags), tuple(choices), envvar, cli, key, in_digest, excludes)
    metadata = {META_KEY: info}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def repeatable(help: str, *, metavar: str, panel: str | None = None, flag: str | None = None) -> Any:
    """A list option given once per value on the command line (`--adapter A --adapter B`), a list in the
    config file; empty by default. `flag`: the singular spelling, when the field's name is a plural."""
    return option(factory=list, help=help, metavar=metavar, panel=panel, flags=(flag,) if flag else ())


@dataclass(frozen=True)
class GroupInfo:
    """How a nested group sits in the config that nests it."""

    table: bool = False  # its options sit in a table of their own in a config file ([engine])
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option name in the group -> here
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # by the group's own option names


def group(cls: type, *, table: bool = False, rename: Mapping[str, str] | None = None, **defaults: Any) -> Any:
    """A dataclass field holding a group of options (`cls`), with this nesting's own defaults, by the
    group's option names."""
    info = GroupInfo(table, dict(rename or {}), defaults)
    return dataclasses.field(default_factory=lambda: build(cls, defaults), metadata={GROUP_KEY: info})


def info_of(field: dataclasses.Field[Any]) -> OptionInfo | None:
    return field.metadata.get(META_KEY)


def group_of(field: dataclasses.Field[Any]) -> GroupInfo | None:
    return field.metadata.get(GROUP_KEY)


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (they are strings under `from __future__`)."""
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


@dataclass(frozen=True)
class Leaf:
    """One option of a config class, with where it sits: `attrs` is its attribute path from the config
    (("sampling", "temperature")), `tables` the config-file tables it is in (("engine",), or ())."""

    name: str
    attrs: tuple[str, ...]
    tables: tuple[str, ...]
    hint: Any
    default: Any
    info: OptionInfo

    @property
    def key(self) -> str:
        """Its key in a config file: "beta", "engine.backend"."""
        return ".".join((*self.tables, self.name))

    @property
    def choices(self) -> tuple[Any, ...]:
        """The values it accepts, when they are a closed set (a Literal type, or a registry's names)."""
        return self.info.choices or literal_values(self.hint)

    def get(self, config: Any) -> Any:
        for attr in self.attrs:
            config = getattr(config, attr)
        return config


def literal_values(hint: Any) -> tuple[Any, ...]:
    """A Literal's values (also inside `X | None`); () for any other type."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(v for arg in typing.get_args(hint) for v in literal_values(arg))
    return ()


def _group_fields(cls: type) -> Iterator[tuple[dataclasses.Field[Any], Any, GroupInfo | None]]:
    hints = type_hints(cls)
    for field in dataclasses.fields(cls):
        yield field, hints[field.name], group_of(field)


def leaves(cls: type, *, _defaults: Any = None) -> Iterator[Leaf]:
    """Every option of `cls` (nested groups flattened), in declaration order, with this nesting's defaults."""
    yield from _leaves(cls, (), (), {}, _defaults)


def _leaves(
    cls: type, attrs: tuple[str, ...], tables: tuple[str, ...], rename: Mapping[str, str], instance: Any
) -> Iterator[Leaf]:
    for field, hint, nested in _group_fields(cls):
        if nested is not None:
            inner = getattr(instance, field.name) if instance is not None else field.default_factory()  # type: ignore[misc]
            yield from _leaves(
                hint, (*attrs, field.name), (*tables, field.name) if nested.table else tables, nested.rename, inner
            )
            continue
        info = info_of(field)
        if info is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no option() declaration")
        if instance is not None:
            default = getattr(instance, field.name)
        else:
            default = field.default_factory() if field.default_factory is not MISSING else field.default
        own = _own_name(field)
        yield Leaf(rename.get(own, own), (*attrs, field.name), tables, hint, default, info)


def name_options(message: str, config_leaves: Sequence[Leaf], spell: Callable[[Leaf], str]) -> str:
    """A config's error message with each option it names spelled as the user gave it (`spell(leaf)`: the
    command line's flag, a config file's key). Checks name options by field name, and a nesting may rename one
    (train's `max_new_tokens` is `--max-completion-length`): "temperature must be >= 0" becomes "--temperature
    must be >= 0". A name with an underscore is an option wherever it stands; a one-word name (temperature,
    beta) only where the message starts with it, so plain words stay plain."""
    names: dict[str, str] = {}
    for leaf in config_leaves:
        names.setdefault(leaf.attrs[-1], spell(leaf))
        names[leaf.name] = spell(leaf)

    def spelled(match: re.Match[str]) -> str:
        word = match.group(0)
        if word in names and ("_" in word or match.start() == 0):
            return names[word]
        return word

    return re.sub(r"(?<![\w.-])[a-z][a-z0-9_]*(?![\w-])", spelled, message)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """`cls` from option values by name (as the CLI and a config table give them): an option that is absent
    keeps its default (the nesting's), and a nested group is built from its own options' values, unless
    it is given whole (a run's built stage tables)."""
    kwargs: dict[str, Any] = {}
    for field, hint, nested in _group_fields(cls):
        if nested is None:
            name = _own_name(field)
            if name in values:
                kwargs[field.name] = values[name]
        elif isinstance(given := values.get(field.name), hint):
            kwargs[field.name] = given
        else:
            kwargs[field.name] = build(hint, _nested_values(hint, nested, _inward(values, nested)))
    return cls(**kwargs)


def build_group(owner: type, name: str, values: Mapping[str, Any]) -> Any:
    """The group in field `name` of `owner`, from its options' values over that nesting's defaults."""
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    nested = group_of(field)
    assert nested is not None, f"{owner.__name__}.{name} is not a group"
    cls = type_hints(owner)[name]
    return build(cls, _nested_values(cls, nested, values))


def _nested_values(cls: type, nested: GroupInfo, values: Mapping[str, Any]) -> dict[str, Any]:
    """A nested group's option values: the nesting's defaults, then the values given. Of two options that
    exclude each other (`option(excludes=...)`), the one given drops the other's default."""
    defaults = dict(nested.defaults)
    for field in dataclasses.fields(cls):
        info = info_of(field)
        if info is None or info.excludes is None:
            continue
        own = _own_name(field)
        for given, other in ((own, info.excludes), (info.excludes, own)):
            if given in values and other not in values:
                defaults[other] = None
    return {**defaults, **values}


def _own_name(field: dataclasses.Field[Any]) -> str:
    """An option's name in its own group: its declared key, else the field's name."""
    info = info_of(field)
    return (info.key if info else None) or field.name


def _inward(values: Mapping[str, Any], nested: GroupInfo) -> dict[str, Any]:
    """Values by the names a nested group's options have inside it (a renamed one by its own name)."""
    if not nested.rename:
        return dict(values)
    inward = {outer: inner for inner, outer in nested.rename.items()}
    return {inward.get(k, k): v for k, v in values.items() if k not in nested.rename}


def update(config: Any, values: Mapping[str, Any]) -> Any:
    """A copy of `config` with some options changed, by name (into nested groups); checked again."""
    changes: dict[str, Any] = {}
    for field, _hint, nested in _group_fields(type(config)):
        if nested is not None:
            changes[field.name] = update(getattr(config, field.name), _inward(values, nested))
            continue
        name = _own_name(field)
        if name in values:
            changes[field.name] = values[name]
    return dataclasses.replace(config, **changes)


def values_of(config: Any) -> dict[str, Any]:
    """Every option's value by name, nested groups flattened (what `build` takes back)."""
    return {leaf.name: leaf.get(config) for leaf in leaves(type(config), _defaults=config)}


class Options:
    """Base of the stage configs: `TrainConfig.of(beta=0.1, max_completion_length=64)` builds one from option
    names as the command line spells them (nested groups flattened); an unknown name is refused."""

    @classmethod
    def of(cls, **values: Any) -> Any:
        return checked(cls, values, cls.__name__)


def computed_values(config: Any) -> dict[str, Any]:
    """The options that say what a stage computes, by attribute path: all but those declared
    `in_digest=False` (how it runs: threads, a server's address). `bleuberi run` hashes these."""
    return {
        ".".join(leaf.attrs): leaf.get(config) for leaf in leaves(type(config), _defaults=config) if leaf.info.in_digest
    }


def names_of(cls: type) -> set[str]:
    return {leaf.name for leaf in leaves(cls)}


def checked(cls: type, values: Mapping[str, Any], source: str) -> Any:
    """`cls` from option values a library user or a config gave (a nested group may be given whole,
    `engine=EngineOptions(...)`): an unknown name is a usage error that suggests the closest known one."""
    known = names_of(cls)
    groups = {field.name: hint for field, hint, nested in _group_fields(cls) if nested is not None}
    for name, value in values.items():
        if name in groups and isinstance(value, groups[name]):
            continue  # a group given whole
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{source}: unknown option {name!r}{hint}")
    return build(cls, values)


def check_literals(config: Any) -> None:
    """Every Literal-typed option of `config` holds one of its values (library callers pass strings that
    nothing else checked; the CLI and config files check them too). A registry's names (engines) are the
    registry's to check: it may grow at run time."""
    for leaf in leaves(type(config), _defaults=config):
        value, allowed = leaf.get(config), literal_values(leaf.hint)
        if allowed and value is not None:
            check_choice(leaf.name, value, allowed)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """`value` is one of `allowed` (a Literal's `typing.get_args`), else a usage error naming the choices."""
    if value not in allowed:
        raise UsageError(f"unknown {name} {value!r}; choose from {', '.join(map(str, allowed))}")


# ---- values against their declared types (config files and `--set` give untyped values) ----------------


def type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def check_value(value: Any, hint: Any, choices: tuple[Any, ...] = ()) -> str | None:
    """None when `value` fits the type hint (and is one of `choices`, when given), else what was expected."""
    if choices and value is not None and value not in choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [check_value(value, alternative) for alternative in args if alternative is not type(None)]
        return None if None in problems else " or ".join(p for p in problems if p)
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        if not isinstance(value, list):
            return f"a list of {args[0].__name__}"
        return next((f"a list of {args[0].__name__}" for item in value if check_value(item, args[0])), None)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    raise TypeError(f"unsupported config type {hint!r}")  # pragma: no cover - a programming error
