"""One declaration per option: a config field carries its default, help, metavar and help panel.

    @dataclass
    class TrainConfig:
        beta: float = option(0.04, "KL weight towards the base model", metavar="B", panel="GRPO loss")

From the field alone the CLI builds `--beta B` (bleuberi_cli/config_options.py), `bleuberi run` checks
and documents the `train.beta` key (stages/run/config.py), and `--print-config` writes its comment.
A dataclass field whose type is itself such a dataclass (`engine: EngineOptions`) is a nested group:
its options appear flat on the command line (`--backend`) and as a table in the config file
(`[engine]`).

The metadata is plain data, so the library stays free of CLI imports.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

from stages.core.models import DEFAULT_MODEL, DEVICES, DTYPES

META_KEY = "bleuberi"


@dataclass(frozen=True)
class OptionInfo:
    """How one config field shows on the command line and in the config file."""

    help: str
    metavar: str | None = None
    panel: str | None = None
    flags: tuple[str, ...] = ()  # default: --field-name (bool: --field-name alone, or --x/--no-x when None)
    choices: tuple[str, ...] = ()  # for a str field whose values come from a registry
    envvar: str | None = None
    cli: bool = True  # False: a config key only (set by the library or a config file, not a flag)


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
) -> Any:
    """A dataclass field with its option metadata (use `factory` for mutable defaults)."""
    info = OptionInfo(help, metavar, panel, tuple(flags), tuple(choices), envvar, cli)
    metadata = {META_KEY: info}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def repeatable(help: str, *, metavar: str, panel: str | None = None, flag: str | None = None) -> Any:
    """A list option given once per value on the command line (`--adapter A --adapter B`), a list in the
    config file; empty by default. `flag`: the singular spelling, when the field's name is a plural."""
    return option(factory=list, help=help, metavar=metavar, panel=panel, flags=(flag,) if flag else ())


def info_of(field: dataclasses.Field[Any]) -> OptionInfo | None:
    return field.metadata.get(META_KEY)


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (they are strings under `from __future__`)."""
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def is_group(hint: Any) -> bool:
    """A nested option group: a dataclass whose fields are options themselves."""
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@dataclass(frozen=True)
class Leaf:
    """One option of a config class, with where it sits: `path` is () for a top-level field, or the
    names of the groups it is nested in."""

    name: str
    path: tuple[str, ...]
    hint: Any
    default: Any
    info: OptionInfo

    @property
    def key(self) -> str:
        return ".".join((*self.path, self.name))


def leaves(cls: type, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every option of `cls` (nested groups flattened), in declaration order."""
    hints = type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if is_group(hint):
            yield from leaves(hint, (*path, field.name))
            continue
        info = info_of(field)
        if info is None:
            raise TypeError(f"{cls.__name__}.{field.name} has no option() declaration")
        default = field.default_factory() if field.default_factory is not MISSING else field.default
        yield Leaf(field.name, path, hint, default, info)


def build(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from flat option values (as the CLI passes them): nested groups are built from their own
    fields' values; a value that is absent keeps the field's default."""
    hints = type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if is_group(hints[field.name]):
            kwargs[field.name] = build(hints[field.name], values)
        elif field.name in values:
            kwargs[field.name] = values[field.name]
    return cls(**kwargs)


# Options that several configs share, declared once here and used by each of them.


def model_option(default: str | None = DEFAULT_MODEL, help: str | None = None) -> Any:
    return option(
        default,
        help or f"causal LM: '{DEFAULT_MODEL}' (embedded, offline), a local folder, or a Hugging Face hub id",
        metavar="NAME|PATH|HUB-ID",
        envvar="BLEUBERI_MODEL",
        panel="Model",
    )


def device_option() -> Any:
    return option("auto", "where to run: auto picks cuda, then mps, then cpu", choices=DEVICES, panel="Model")


def dtype_option() -> Any:
    return option("auto", "weight dtype; auto = bfloat16 on CUDA, float32 elsewhere", choices=DTYPES, panel="Model")


def trust_remote_code_option() -> Any:
    return option(
        False, "let the model repository run its own Python code (off unless you trust the source)", panel="Model"
    )


def system_prompt_option() -> Any:
    return option(None, "a system turn put before prompts that have none", metavar="TEXT", panel="Model")


def seed_option() -> Any:
    return option(42, "random seed: same seed, same result", metavar="N")


def threads_option() -> Any:
    return option(
        None,
        "torch intra-op threads for this process (default: a budget from the cores it may use, shared with "
        "torchrun's local ranks, a local engine and busy neighbours; see README 'Threads on the CPU')",
        metavar="N",
        envvar="BLEUBERI_THREADS",
        panel="Model",
    )
