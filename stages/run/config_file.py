"""A `bleuberi run` configuration read from TOML and `--set KEY=VALUE`, and written back as commented TOML.

Unknown keys and wrong types are errors that name the key (and suggest the closest one); a key a
release renamed still works and is reported once (`RENAMED`). A mistake on the command line is a usage
error (exit 2), the same mistake in a config file bad input (exit 1).
"""

from __future__ import annotations

import difflib
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core.declare import Leaf, check_value, type_name
from stages.core.errors import ConfigError, UsageError
from stages.run.config import DEMO, KEYS, TABLES, RunConfig, build, stage_defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _same(value: Any) -> Any:
    return value


# Keys of earlier releases -> (the key now, how the value changes). They keep working; the notes say so.
RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "select.metric": ("score.metrics", lambda value: [value]),
    "select.max_new_tokens": ("generate.max_new_tokens", _same),
    "select.temperature": ("generate.temperature", _same),
    "select.batch_size": ("generate.batch_size", _same),
    "train.max_prompt_length": ("max_prompt_length", _same),
    "train.reasoning": ("reasoning", _same),
    "train.drop_long": ("long_prompts", lambda drop: "skip" if drop else "cut-left"),
}


def _flag_names(leaf: Leaf) -> set[str]:
    """A field's command-line names as config keys would spell them: `--lr` -> "lr"."""
    names = set()
    for flag in leaf.info.flags:
        for part in flag.split("/"):
            if part.startswith("--") and not part.startswith("--no-"):
                names.add(part[2:].replace("-", "_"))
    return names - {leaf.name}


def unknown_key(key: str, source: str) -> ConfigError:
    """The error for a key no option has, with the likeliest key meant."""
    if "." in key and key.partition(".")[0] not in TABLES:
        key = key.partition(".")[0]  # an unknown table: name it, not its key
    table, _, name = key.rpartition(".")
    alias = [k for k, leaf in KEYS.items() if name in _flag_names(leaf)]
    if alias:  # a flag's other name (`--lr` for learning_rate): the key is the field's name
        where = next((k for k in alias if k.rpartition(".")[0] == table), alias[0])
        return ConfigError(
            f"{source}: unknown key {key!r} (did you mean {where!r}? --{name.replace('_', '-')} is its flag)"
        )
    same_place = [k.rpartition(".")[2] for k in KEYS if k.rpartition(".")[0] == table]
    same_place += list(TABLES) if not table else []
    close = difflib.get_close_matches(name, same_place, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = [k for k in KEYS if k.rpartition(".")[2] == name and k != key]
    if elsewhere:  # the option exists, in another place: name it
        where = next((k for k in elsewhere if "." not in k), elsewhere[0])
        hint = (
            f" ({name} is set at the top level, for every stage)" if "." not in where else f" (did you mean {where!r}?)"
        )
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def set_key(target: dict[str, Any], key: str, value: Any, source: str, notes: list[str]) -> None:
    """Check one dotted key and its value against the schema; store it in `target` (a dict per table)."""
    if key in RENAMED:
        new, convert = RENAMED[key]
        notes.append(f"{source}: {key} is now {new}; read as {new} (rename it to keep this quiet)")
        key, value = new, convert(value)
    if key in TABLES:
        raise ConfigError(f"{source}: key {key!r}: expected a table ([{key}])")
    leaf = KEYS.get(key)
    if leaf is None:
        raise unknown_key(key, source)
    problem = check_value(value, leaf.hint, leaf.choices)
    if problem:
        example = ""
        if typing.get_origin(leaf.hint) is list and not isinstance(value, list):  # show how a list is written
            items = f'"{value}"' if isinstance(value, str) else "..."
            example = f" (a TOML list: --set '{key}=[{items}]')" if source == "--set" else f" (a TOML list: [{items}])"
        raise ConfigError(f"{source}: key {key!r}: expected {problem}, got {type_name(value)} {value!r}{example}")
    if leaf.tables:
        target.setdefault(leaf.tables[0], {})[leaf.name] = value
    else:
        target[leaf.name] = value


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in table.items():
        if isinstance(value, dict) and not prefix:
            items += _flatten(value, f"{key}.")
        else:
            items.append((prefix + key, value))
    return items


def parse_override(spec: str, config_path: str | Path | None = None) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4). A value that is not TOML is a string.

    `--set KEY VALUE` (a space for '=') leaves VALUE as the config file argument: `config_path` names it,
    so the message can say what happened."""
    key, sep, raw = spec.partition("=")
    if not sep or not key.strip():
        hint = "e.g. train.max_steps=10"
        if config_path is not None and not Path(config_path).exists():
            hint = f"a space is not '=': --set {spec}={config_path}"
        raise UsageError(f"--set {spec!r}: expected KEY=VALUE ({hint})")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _read_file(path: str | Path, values: dict[str, Any], notes: list[str]) -> None:
    source = str(path)
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from None
    for key, value in _flatten(table):
        set_key(values, key, value, source, notes)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    on_note: Callable[[str], None] = lambda note: None,
) -> RunConfig:
    """Defaults, then the TOML file, then `--set` overrides; every key and type checked, and the whole
    configuration built once. A mistake in a `--set` is a usage error (exit 2), one in the file a
    ConfigError (exit 1). `on_note` hears of renamed keys that were read under their new names."""
    parsed = [parse_override(spec, path) for spec in overrides]  # first: `--set KEY VALUE` reads VALUE as the file
    values: dict[str, Any] = {}
    notes: list[str] = []
    if path is not None:
        _read_file(path, values, notes)
    from_file = {key: dict(value) if isinstance(value, dict) else value for key, value in values.items()}
    try:
        for key, value in parsed:
            set_key(values, key, value, "--set", notes)
    except ConfigError as error:
        _blame_the_file(from_file)
        raise UsageError(str(error)) from None
    try:
        config = build(values)
    except ConfigError as error:
        if not overrides:
            raise
        _blame_the_file(from_file)
        raise UsageError(f"--set: {error}") from None
    for note in notes:
        on_note(note)
    return config


def _blame_the_file(from_file: dict[str, Any]) -> None:
    """On a mistake with `--set` values: raise the file's own error when the file alone is wrong (exit 1,
    as without them); return when it is valid, so the mistake is the `--set` values'. Only a failed load
    builds this second configuration."""
    build(from_file)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _with_choices(leaf: Leaf) -> str:
    """The option's help, and its values when they are a closed set its help does not spell out."""
    values = [str(value) for value in leaf.choices]
    if not values or leaf.info.help.startswith(values[0]):
        return leaf.info.help
    return f"{leaf.info.help} ({' | '.join(values)})"


def _own_defaults(key: str) -> str:
    """What the stages default to where the demo sets `key`: "bleuberi train: 512" (unset: "none")."""
    text = {stage: "none" if value is None else _toml_value(value) for stage, value in stage_defaults(key).items()}
    return "; ".join(f"bleuberi {stage}: {value}" for stage, value in text.items())


def to_toml(config: RunConfig) -> str:
    """The whole configuration as commented TOML (comments: each option's help; a key the demo overlay sets
    says the stage's own default). Unset optional keys are shown commented out."""
    lines = [
        "# bleuberi run configuration. Precedence: --set KEY=VALUE > this file > built-in defaults.",
        "# Keys marked (demo) come from the demo overlay; every other key has its command's own default.",
        "",
    ]
    table = ""
    for key, leaf in KEYS.items():
        if leaf.tables and leaf.tables[0] != table:
            table = leaf.tables[0]
            lines += ["", f"[{table}]"]
        value = leaf.get(config)
        comment = _with_choices(leaf)
        if key in DEMO:
            comment = f"(demo; {_own_defaults(key)}) {comment}"
        if value is None:
            lines.append(f"# {leaf.name} =   # not set: {comment}")
        else:
            lines.append(f"{leaf.name} = {_toml_value(value)}  # {comment}")
    return "\n".join(lines) + "\n"


__all__ = ["RENAMED", "load_config", "parse_override", "to_toml", "unknown_key"]
