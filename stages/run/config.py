"""The configuration of `bleuberi run`: one typed object, read from TOML, overridden by `--set`.

Precedence: `--set key=value` > the config file > the defaults below (the demo: the embedded model
and data, sized for a 2-core CPU). Unknown keys and wrong types are errors that name the key.
`[train]` takes every option of `bleuberi train` by its TrainConfig name, except the ones shared by
all stages, which live at the top level (model, seed, device, dtype, system_prompt, trust_remote_code).
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from stages.core.errors import BleuberiError, ConfigError, UsageError
from stages.core.models import DEFAULT_MODEL
from stages.engines.base import SamplingParams
from stages.engines.generator import EngineOptions
from stages.metrics import DEFAULT_EVAL_METRICS, get_metric
from stages.train.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Set once at the top level for every stage (and copied into [train]).
SHARED = (
    "model",
    "seed",
    "device",
    "dtype",
    "system_prompt",
    "trust_remote_code",
    "backend",
    "server_url",
    "server_model",
    "api_key_env",
    "concurrency",
)

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
    pool: str = "demo:pool"
    heldout: str = "demo:heldout"
    max_pool: int = 0
    max_heldout: int = 0


@dataclass
class SelectSection:
    metric: str = "bleu"
    mode: Literal["hard", "easy", "medium", "random"] = "hard"
    num: int = 64
    max_new_tokens: int = 48
    temperature: float = 0.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        get_metric(self.metric)
        SamplingParams(self.max_new_tokens, self.temperature)  # checked now, not after hours of work
        _positive(num=self.num, batch_size=self.batch_size)


@dataclass
class EvalSection:
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_METRICS))
    max_new_tokens: int = 48
    temperature: float = 0.0
    batch_size: int = 16
    bootstrap_resamples: int = 1000

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
    model: str = DEFAULT_MODEL
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    system_prompt: str | None = None
    trust_remote_code: bool = False
    backend: Literal["transformers", "vllm", "server"] = "transformers"
    server_url: str | None = None
    server_model: str | None = None
    api_key_env: str | None = None
    concurrency: int = 8
    data: DataSection = field(default_factory=DataSection)
    select: SelectSection = field(default_factory=SelectSection)
    train: TrainConfig = field(default_factory=_demo_train)
    eval: EvalSection = field(default_factory=EvalSection)

    def train_config(self) -> TrainConfig:
        """[train] with the shared top-level settings filled in."""
        return TrainConfig(**{**self.train.to_dict(), **{k: getattr(self, k) for k in SHARED}})

    def engine_options(self) -> EngineOptions:
        """The engine every stage samples with (select, train rollouts, eval)."""
        return EngineOptions(self.backend, self.server_url, self.server_model, self.api_key_env, self.concurrency)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for name in SHARED:
            values["train"].pop(name)
        return values


SECTIONS: dict[str, type] = {"data": DataSection, "select": SelectSection, "train": TrainConfig, "eval": EvalSection}

HELP: dict[str, str] = {
    "model": "embedded name (smollm2-135m), local folder or hub id",
    "seed": "one seed for sampling, selection, training and bootstrap",
    "device": "auto | cpu | cuda | mps",
    "dtype": "auto (bf16 on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16",
    "system_prompt": "a system turn for every prompt",
    "trust_remote_code": "let the model repository run its own code",
    "backend": "who samples in every stage: transformers | vllm (in process) | server (OpenAI-compatible)",
    "server_url": "base URL of the server, ending in /v1 (backend server)",
    "server_model": "the served model's name (default: the one the server lists)",
    "api_key_env": "environment variable holding the server's API key (sent to that host only)",
    "concurrency": "requests in flight to the server",
    "data.pool": "training pool (JSONL); demo:pool is the embedded demo pool",
    "data.heldout": "held-out set for eval; demo:heldout is the embedded demo set",
    "data.max_pool": "use only the first N pool records (0 = all)",
    "data.max_heldout": "use only the first N held-out records (0 = all)",
    "select.metric": "metric that ranks the base model's answers",
    "select.mode": "hard (lowest scores, the paper) | easy | medium | random",
    "select.num": "how many records to train on",
    "select.max_new_tokens": "length of the base model's answers",
    "select.temperature": "0 = greedy",
    "select.batch_size": "prompts per generation batch",
    "eval.metrics": "metrics reported on the held-out set",
    "eval.max_new_tokens": "answer length limit",
    "eval.temperature": "0 = greedy",
    "eval.batch_size": "prompts per generation batch",
    "eval.bootstrap_resamples": "resamples for the 95% intervals",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def check_value(value: Any, hint: Any) -> str | None:
    """None when `value` fits the type hint, else what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        problems = [check_value(value, option) for option in options]
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


def _unknown(key: str, known: list[str], source: str) -> ConfigError:
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if "." not in key:  # a section's option given without its section: name the section
        owners = [f"{section}.{name}" for section, cls in SECTIONS.items() if name in {f.name for f in fields(cls)}]
        hint = f" (did you mean {owners[0]!r}?)" if owners else hint
    if name in SHARED:
        hint = f" ({name} is set at the top level, for every stage)"
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _set(target: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Check one dotted key and its value against the schema; store it in `target` (nested dicts)."""
    section, dot, name = key.partition(".")
    top = [f.name for f in fields(RunConfig) if f.name not in SECTIONS]
    if not dot:
        if section in SECTIONS:
            raise ConfigError(f"{source}: key {key!r}: expected a table ([{section}])")
        if section not in top:
            raise _unknown(key, top + list(SECTIONS), source)
        hint = _hints(RunConfig)[section]
    else:
        if section not in SECTIONS:
            raise _unknown(section, top + list(SECTIONS), source)
        known = [f.name for f in fields(SECTIONS[section]) if not (section == "train" and f.name in SHARED)]
        if name not in known:
            raise _unknown(key, known, source)
        hint = _hints(SECTIONS[section])[name]
    problem = check_value(value, hint)
    if problem:
        example = ""
        if typing.get_origin(hint) is list and not isinstance(value, list):  # show how a list is written
            items = f'"{value}"' if isinstance(value, str) else "..."
            example = f" (a TOML list: --set '{key}=[{items}]')" if source == "--set" else f" (a TOML list: [{items}])"
        raise ConfigError(f"{source}: key {key!r}: expected {problem}, got {_type_name(value)} {value!r}{example}")
    if dot:
        target.setdefault(section, {})[name] = value
    else:
        target[section] = value


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in table.items():
        if isinstance(value, dict) and not prefix:
            items += _flatten(value, f"{key}.")
        else:
            items.append((prefix + key, value))
    return items


def parse_override(spec: str) -> tuple[str, Any]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4). A value that is not TOML is a string."""
    key, sep, raw = spec.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {spec!r}: expected KEY=VALUE, e.g. train.max_steps=10")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the TOML file, then `--set` overrides; every key and type checked."""
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
    for spec in overrides:
        key, value = parse_override(spec)
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
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**{**asdict(getattr(defaults, name)), **values.get(name, {})})
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


def to_toml(config: RunConfig, train_help: dict[str, str]) -> str:
    """The whole configuration as commented TOML. Unset optional keys are shown commented out."""
    values = config.to_dict()
    lines = ["# bleuberi run configuration. Precedence: --set KEY=VALUE > this file > built-in defaults.", ""]

    def emit(key: str, value: Any, comment: str) -> None:
        name = key.rpartition(".")[2]
        if value is None:
            lines.append(f"# {name} =   # not set: {comment}")
        else:
            lines.append(f"{name} = {_toml_value(value)}  # {comment}")

    for key in (k for k in values if k not in SECTIONS):
        emit(key, values[key], HELP[key])
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in values[section].items():
            emit(key, value, train_help[key] if section == "train" else HELP[f"{section}.{key}"])
    return "\n".join(lines) + "\n"
