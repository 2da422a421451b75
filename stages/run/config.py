"""The configuration of `bleuberi run`: the real stage configs, composed, plus one demo overlay.

    [generate]  GenerateConfig: the base model answers the pool (`bleuberi generate`)
    [score]     ScoreConfig: the answers scored against the references (`bleuberi score`)
    [select]    SelectConfig: the hardest kept (`bleuberi select`)
    [train]     TrainConfig (`bleuberi train`)
    [eval]      EvalConfig (`bleuberi eval`): base vs the trained adapter on the held-out set

Each table takes every option of its command by the name `--print-config` shows (`bleuberi eval`'s
`--bootstrap-resamples` is `eval.bootstrap_resamples`), with the command's own default, except where the
demo overlay below sets another: that is the only place a run's defaults differ from the stages'. What
every stage shares is set once, at the top level: the model options (model, device, dtype, threads,
trust_remote_code), the prompt options (system_prompt, max_prompt_length), seed and reasoning; and in
[engine], who samples. [data] names the pool and the held-out set.

Precedence: `--set key=value` > the config file > these defaults (stages/run/config_file.py reads
them). Every key, its type and its comment come from the option declared on the config field
(stages/core/declare.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from stages.core import declare, options
from stages.core.declare import Leaf, group, leaves, option
from stages.core.errors import BleuberiError, ConfigError, ModelError, UsageError
from stages.core.options import ModelOptions, PromptOptions
from stages.core.records import FieldOptions, read_records
from stages.engines.base import EngineOptions
from stages.eval.config import EvalConfig
from stages.generate import GenerateConfig
from stages.score import ScoreConfig
from stages.select import SelectConfig
from stages.train.config import TrainConfig

# The demo: where `bleuberi run`'s defaults differ from the stages' own, by config key. Sized for a 2-core
# CPU (about 7 minutes); `--print-config` marks these keys, docs/recipe.md lists them.
DEMO: dict[str, Any] = {
    "max_prompt_length": 256,
    "generate.max_new_tokens": 48,
    "generate.temperature": 0.0,  # the recipe ranks the base model's greedy answers
    "select.num": 64,
    "train.num_generations": 4,
    "train.per_device_train_batch_size": 16,
    "train.max_completion_length": 48,
    "train.max_steps": 30,
    # High for LoRA, on purpose: 30 steps must move a 135M model visibly. Use 1e-5 for real runs.
    "train.learning_rate": 3e-4,
    "train.save_steps": 10,
    "eval.max_new_tokens": 48,
}


def demo(table: str | None) -> dict[str, Any]:
    """The overlay's values for one table (None: the top level), by option name."""
    if table is None:
        return {key: value for key, value in DEMO.items() if "." not in key}
    return {key.partition(".")[2]: value for key, value in DEMO.items() if key.partition(".")[0] == table}


DEMO_DATA = Path(__file__).resolve().parent / "demo_data"  # package data: in every install, not only a clone


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
    fields: FieldOptions = group(FieldOptions)

    def __post_init__(self) -> None:
        for name, value in (("max_pool", self.max_pool), ("max_heldout", self.max_heldout)):
            if value < 0:
                raise UsageError(f"{name} must be >= 0, got {value}")


def data_path(name: str) -> Path:
    """`demo:pool` / `demo:heldout` -> the embedded demo files; anything else is a path (a file, or a
    `datasets` save_to_disk folder)."""
    if name.startswith("demo:"):
        path = DEMO_DATA / f"{name.removeprefix('demo:')}.jsonl"
        if not path.is_file():
            raise ConfigError(f"{name}: no such demo file (demo:pool and demo:heldout ship with bleuberi)")
        return path
    path = Path(name).expanduser()
    if not path.is_file() and not path.is_dir():
        raise ConfigError(f"{name}: no such data file")
    return path


def read_data(path: Path, fields: FieldOptions, limit: int = 0) -> list[dict[str, Any]]:
    """The records of a data file, in any input format, mapped by the [data] fields: the first `limit`
    (0: all)."""
    records = list(read_records(path, fields=fields.map))
    return records[:limit] if limit > 0 else records


def empty_input(data: DataSection) -> str | None:
    """Which data file has no records (a run needs a pool and a held-out set), or None."""
    for key, name in (("data.pool", data.pool), ("data.heldout", data.heldout)):
        if next(iter(read_records(data_path(name), fields=data.fields.map)), None) is None:
            return f"{key} ({name}) is empty"
    return None


@dataclass
class RunConfig:
    model: ModelOptions = group(ModelOptions)
    prompt: PromptOptions = group(PromptOptions, **demo(None))
    seed: int = options.seed_option()
    reasoning: bool = options.reasoning_option()
    engine: EngineOptions = group(EngineOptions, table=True)  # who samples, in every stage
    data: DataSection = group(DataSection, table=True)
    generate: GenerateConfig = group(GenerateConfig, table=True, **demo("generate"))
    score: ScoreConfig = group(ScoreConfig, table=True, **demo("score"))
    select: SelectConfig = group(SelectConfig, table=True, **demo("select"))
    train: TrainConfig = group(TrainConfig, table=True, **demo("train"))
    eval: EvalConfig = group(EvalConfig, table=True, **demo("eval"))

    def __post_init__(self) -> None:
        """Every stage gets the shared settings (so a stage config is the one that runs), then the run's
        own checks."""
        shared = {leaf.name: leaf.get(self) for leaf in leaves(RunConfig, _defaults=self) if _is_shared(leaf)}
        for table in STAGES:
            setattr(self, table, declare.update(getattr(self, table), shared))
        if self.generate.as_references:
            raise UsageError("generate.as_references cannot be used in a run: select ranks the base model's answers")


STAGES = ("generate", "score", "select", "train", "eval")
TABLES = ("engine", "data", *STAGES)


def _is_shared(leaf: Leaf) -> bool:
    """A top-level or [engine] key: set once, for every stage that has an option of that name."""
    return leaf.tables[:1] in ((), ("engine",))


SHARED = frozenset(leaf.name for leaf in leaves(RunConfig) if _is_shared(leaf))


def config_keys() -> dict[str, Leaf]:
    """Every key a config file may set ("seed", "engine.backend", "train.beta", ...) and its option."""
    return {
        leaf.key: leaf
        for leaf in leaves(RunConfig)
        if not (leaf.tables[:1] and leaf.tables[0] in STAGES and leaf.name in SHARED)
    }


KEYS = config_keys()
STAGE_CONFIGS: dict[str, type] = {
    "generate": GenerateConfig,
    "score": ScoreConfig,
    "select": SelectConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def stage_defaults(key: str) -> dict[str, Any]:
    """The defaults of the option behind a run key in the stages' own commands: {"train": 512, ...} (a
    top-level key: every stage that has it)."""
    table, _, name = key.rpartition(".")
    stages = [table] if table in STAGE_CONFIGS else [] if table else list(STAGE_CONFIGS)
    return {stage: leaf.default for stage in stages for leaf in leaves(STAGE_CONFIGS[stage]) if leaf.name == name}


def build(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from checked values (top-level names, and a dict per table). The shared settings are
    built first, then each table over the run's defaults for it with them, so a table's errors name it."""
    top = {key: value for key, value in values.items() if key not in TABLES}
    built: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for field in fields(RunConfig):
        table = field.name in TABLES
        if field.name in ("data", *STAGES):
            continue
        if declare.group_of(field) is None:
            built[field.name] = shared[field.name] = top.get(field.name, field.default)
            continue
        built[field.name] = _table(field.name, values.get(field.name, {}) if table else top)
        shared.update(declare.values_of(built[field.name]))
    for table in ("data", *STAGES):
        built[table] = _table(table, {**shared, **values.get(table, {})})
    try:
        return RunConfig(**built)
    except ModelError:
        raise
    except BleuberiError as error:  # a shared setting no stage can run with
        raise ConfigError(str(error)) from None


def _table(name: str, values: dict[str, Any]) -> Any:
    try:
        return declare.build_group(RunConfig, name, values)
    except ModelError:
        raise  # a model that is not there is bad input (exit 1), wherever it was named
    except BleuberiError as error:
        if name not in TABLES:
            raise ConfigError(str(error)) from None
        table_class = STAGE_CONFIGS.get(name)  # its checks name fields; a nesting may key one otherwise
        message = (
            declare.name_options(str(error), list(leaves(table_class)), lambda leaf: leaf.name)
            if table_class
            else str(error)
        )
        raise ConfigError(f"[{name}]: {message}") from None
