"""The configuration of `bleuberi run`: one typed object, read from TOML, overridden by `--set`.

Precedence: `--set key=value` > the config file > the defaults below (the demo: the embedded model
and data, sized for a 2-core CPU). Unknown keys and wrong types are errors that name the key.
`[train]` takes every option of `bleuberi train` by its TrainConfig name, except the ones shared by
all stages: model, seed, device, dtype, threads, system_prompt and trust_remote_code at the top level, and the
generation engine in `[engine]`. Every key, its type and its comment come from the option declared on
the config field (stages/core/options.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from stages.core import options
from stages.core.errors import BleuberiError, ConfigError, ModelError, UsageError
from stages.core.options import Leaf, leaves, option
from stages.core.records import FieldMap
from stages.engines.base import EngineOptions, SamplingParams
from stages.metrics import DEFAULT_EVAL_METRICS, get_metric
from stages.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The demo's training settings; every other [train] key keeps bleuberi train's default.
DEMO_TRAIN = {
    "num_generations": 4,
    "per_device_train_batch_size": 16,
    "max_prompt_length": 256,
    "max_completion_length": 48,
    "max_steps": 30,
    # High for LoRA, on purpose: 30 steps must move a 135M model visibly. Use 1e-5 for real runs.
    "learning_rate": 3e-4,
    "save_steps": 10,
}


@dataclass
class DataSection:
    pool: str = option(
        "demo:pool",
        "training pool (.jsonl[.gz], .parquet, .csv, .tsv, .json or a save_to_disk folder); demo:pool is the embedded "
        "demo pool",
    )
    heldout: str = option("demo:heldout", "held-out set for eval, in any of those formats; demo:heldout: the demo set")
    max_pool: int = option(0, "use only the first N pool records (0 = all)")
    max_heldout: int = option(0, "use only the first N held-out records (0 = all)")
    prompt_field: str | None = option(None, "the field holding the prompt (dotted if nested; a chat list is messages)")
    reference_field: list[str] = option(
        factory=list, help='the fields holding the references, e.g. ["reward_model.ground_truth"] (verl)'
    )
    id_field: str | None = option(None, "the field holding the id")

    def field_map(self) -> FieldMap | None:
        """How pool and held-out records map onto prompt, references and id (None: read as they are)."""
        return FieldMap.of(self.prompt_field, self.reference_field, self.id_field)


@dataclass
class SelectSection:
    metric: str = option("bleu", "metric that ranks the base model's answers")
    mode: Literal["hard", "easy", "medium", "random"] = option(
        "hard", "hard (lowest scores, the paper) | easy | medium | random"
    )
    num: int = option(64, "how many records to train on")
    max_new_tokens: int = option(48, "length of the base model's answers")
    temperature: float = option(0.0, "0 = greedy")
    batch_size: int = option(16, "prompts per generation batch")

    def __post_init__(self) -> None:
        get_metric(self.metric)
        SamplingParams(self.max_new_tokens, self.temperature)  # checked now, not after hours of work
        _positive(num=self.num, batch_size=self.batch_size)


@dataclass
class EvalSection:
    metrics: list[str] = option(factory=lambda: list(DEFAULT_EVAL_METRICS), help="metrics reported on the held-out set")
    max_new_tokens: int = option(48, "answer length limit")
    temperature: float = option(0.0, "0 = greedy")
    batch_size: int = option(16, "prompts per generation batch")
    bootstrap_resamples: int = option(1000, "resamples for the 95% intervals")

    def __post_init__(self) -> None:
        for name in self.metrics:
            get_metric(name)
        SamplingParams(self.max_new_tokens, self.temperature)
        _positive(batch_size=self.batch_size, bootstrap_resamples=self.bootstrap_resamples)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def _demo_train() -> TrainConfig:
    return TrainConfig(**DEMO_TRAIN)


@dataclass
class RunConfig:
    model: str = options.model_option(help="embedded name (smollm2-135m), local folder or hub id")
    seed: int = option(42, "one seed for sampling, selection, training and bootstrap")
    device: str = options.device_option()
    dtype: str = options.dtype_option()
    threads: int | None = options.threads_option()
    system_prompt: str | None = options.system_prompt_option()
    trust_remote_code: bool = options.trust_remote_code_option()
    engine: EngineOptions = field(default_factory=EngineOptions)  # who samples, in every stage
    data: DataSection = field(default_factory=DataSection)
    select: SelectSection = field(default_factory=SelectSection)
    train: TrainConfig = field(default_factory=_demo_train)
    eval: EvalSection = field(default_factory=EvalSection)

    def train_config(self) -> TrainConfig:
        """[train] with the settings shared by every stage filled in."""
        return dataclasses.replace(self.train, **{name: getattr(self, name) for name in SHARED})

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for name in SHARED:
            values["train"].pop(name)
        return values


SECTIONS: dict[str, type] = {
    "engine": EngineOptions,
    "data": DataSection,
    "select": SelectSection,
    "train": TrainConfig,
    "eval": EvalSection,
}
TOP = [f.name for f in fields(RunConfig) if f.name not in SECTIONS]
# Set once for every stage (top-level keys and [engine]); [train] takes them from there.
SHARED = [*TOP, "engine"]


def config_keys() -> dict[str, Leaf]:
    """Every key a config file may set ("seed", "engine.backend", "train.beta", ...) and its option."""
    keys = {}
    for leaf in leaves(RunConfig):
        if leaf.path[:1] == ("train",) and (leaf.path[1:2] or (leaf.name,))[0] in SHARED:
            continue  # set at the top level or in [engine], for every stage
        keys[leaf.key] = leaf
    return keys


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def check_value(value: Any, hint: Any, choices: tuple[str, ...] = ()) -> str | None:
    """None when `value` fits the type hint (and is one of `choices`, when given), else what was expected."""
    if choices and value is not None and value not in choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        alternatives = [a for a in args if a is not type(None)]
        problems = [check_value(value, alternative) for alternative in alternatives]
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


def _flag_names(leaf: Leaf) -> set[str]:
    """A field's command-line names as config keys would spell them: `--lr` -> "lr"."""
    names = set()
    for flag in leaf.info.flags:
        for part in flag.split("/"):
            if part.startswith("--") and not part.startswith("--no-"):
                names.add(part[2:].replace("-", "_"))
    return names - {leaf.name}


def _unknown(key: str, source: str) -> ConfigError:
    if "." in key and key.partition(".")[0] not in SECTIONS:
        key = key.partition(".")[0]  # an unknown table: name it, not its key
    section, _, name = key.rpartition(".")
    alias = [k for k, leaf in KEYS.items() if name in _flag_names(leaf)]
    if alias:  # a flag's other name (`--lr` for learning_rate): the key is the field's name
        where = next((k for k in alias if k.rpartition(".")[0] == section), alias[0])
        return ConfigError(
            f"{source}: unknown key {key!r} (did you mean {where!r}? --{name.replace('_', '-')} is its flag)"
        )
    same_place = [k.rpartition(".")[2] for k in KEYS if k.rpartition(".")[0] == section]
    same_place += list(SECTIONS) if not section else []
    close = difflib.get_close_matches(name, same_place, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = [k for k in KEYS if k.rpartition(".")[2] == name and k != key]
    if elsewhere:  # the option exists, in another place: name it
        where = elsewhere[0]
        hint = (
            f" ({name} is set at the top level, for every stage)" if "." not in where else f" (did you mean {where!r}?)"
        )
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _set(target: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Check one dotted key and its value against the schema; store it in `target` (nested dicts)."""
    if key in SECTIONS:
        raise ConfigError(f"{source}: key {key!r}: expected a table ([{key}])")
    leaf = KEYS.get(key)
    if leaf is None:
        raise _unknown(key, source)
    problem = check_value(value, leaf.hint, leaf.info.choices)
    if problem:
        example = ""
        if typing.get_origin(leaf.hint) is list and not isinstance(value, list):  # show how a list is written
            items = f'"{value}"' if isinstance(value, str) else "..."
            example = f" (a TOML list: --set '{key}=[{items}]')" if source == "--set" else f" (a TOML list: [{items}])"
        raise ConfigError(f"{source}: key {key!r}: expected {problem}, got {_type_name(value)} {value!r}{example}")
    if leaf.path:
        target.setdefault(leaf.path[0], {})[leaf.name] = value
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the TOML file, then `--set` overrides; every key and type checked. A mistake in a
    `--set` is a usage error (exit 2), one in the file a ConfigError (exit 1)."""
    parsed = [parse_override(spec, path) for spec in overrides]  # first: `--set KEY VALUE` reads VALUE as the file
    values: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        try:
            table = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{source}: not valid TOML ({error})") from None
        for key, value in _flatten(table):
            _set(values, key, value, source)
    if not overrides:
        return build(values)
    build(values)  # the file alone must be valid: its errors are the file's (exit 1)
    for key, value in parsed:
        try:
            _set(values, key, value, "--set")
        except ConfigError as error:
            raise UsageError(str(error)) from None
    try:
        return build(values)
    except ConfigError as error:  # then it is the --set values that broke it: a usage error (exit 2)
        raise UsageError(f"--set: {error}") from None


def build(values: dict[str, Any]) -> RunConfig:
    defaults = RunConfig()
    sections = {}
    for name in SECTIONS:
        try:
            sections[name] = dataclasses.replace(getattr(defaults, name), **values.get(name, {}))
        except ModelError:
            raise  # a model that is not there is bad input (exit 1), wherever it was named
        except BleuberiError as error:
            raise ConfigError(f"[{name}]: {error}") from None
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    config = RunConfig(**top, **sections)
    try:
        config.train_config()  # the shared settings must make a valid training config too
    except BleuberiError as error:
        raise ConfigError(str(error)) from None
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: RunConfig) -> str:
    """The whole configuration as commented TOML (comments: each option's help). Unset optional keys are
    shown commented out."""
    values = config.to_dict()
    lines = ["# bleuberi run configuration. Precedence: --set KEY=VALUE > this file > built-in defaults.", ""]
    section = ""
    for leaf in KEYS.values():
        if leaf.path and leaf.path[0] != section:
            section = leaf.path[0]
            lines += ["", f"[{section}]"]
        value = values[section][leaf.name] if leaf.path else values[leaf.name]
        if value is None:
            lines.append(f"# {leaf.name} =   # not set: {leaf.info.help}")
        else:
            lines.append(f"{leaf.name} = {_toml_value(value)}  # {leaf.info.help}")
    return "\n".join(lines) + "\n"


KEYS = config_keys()
