"""One declaration per option: every config field is a command-line option and a `bleuberi run` key, and
every option of the commands built from a config is a field (or one of the command's own few)."""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

import pytest
import typer.main

from bleuberi_cli.app import app
from bleuberi_cli.help import SHORT_HELP
from stages.core.declare import GROUP_KEY, META_KEY
from stages.core.records import ReadOptions
from stages.eval.config import EvalConfig
from stages.generate import GenerateConfig
from stages.run.config import KEYS, SHARED
from stages.score import ScoreConfig
from stages.select import SelectConfig
from stages.split import SplitConfig
from stages.train.config import TrainConfig

# The options a command has besides its configs': where records go, and how it runs.
OWN = {
    "train": {"output_dir", "resume", "resume_from", "overwrite", "report_to", "merge_to", "quiet"},
    "generate": {"output", "resume", "quiet"},
    "eval": {"output", "report", "agreement", "resume", "quiet"},
    "score": {"output", "resume", "quiet"},
    "select": {"output", "plot", "quiet"},
    "split": {"pool", "heldout", "quiet"},
}
# The options every command takes after its name: -v/--verbose and --help-all.
EVERY = {"verbose", "help_all"}
# Every command that reads records takes ReadOptions (where they come from, how their fields map).
CONFIGS = {
    "train": (TrainConfig, ReadOptions),
    "generate": (GenerateConfig, ReadOptions),
    "eval": (EvalConfig, ReadOptions),
    "score": (ScoreConfig, ReadOptions),
    "select": (SelectConfig, ReadOptions),
    "split": (SplitConfig, ReadOptions),
}


def field_names(cls: type, rename: dict[str, str] | None = None) -> set[str]:
    """A config's options by name, nested groups flattened, read from the dataclass fields and what their
    declarations say (an option's own `key`, a nesting's `rename`), not from the code that builds options."""
    hints = typing.get_type_hints(cls)
    names: set[str] = set()
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            names |= field_names(hints[f.name], dict(f.metadata[GROUP_KEY].rename))
        else:
            own = f.metadata[META_KEY].key or f.name
            names.add((rename or {}).get(own, own))
    return names


def command_options(name: str) -> set[str]:
    group = typer.main.get_command(app)
    return {param.name for param in group.commands[name].params if param.name}  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_config_field_is_an_option_and_every_option_a_field(command) -> None:
    options = command_options(command)
    fields_ = set().union(*(field_names(cls) for cls in CONFIGS[command]))
    assert fields_ <= options, fields_ - options
    assert options - fields_ == OWN[command] | EVERY, options - fields_
    if command in SHORT_HELP:  # its short --help leaves these configs' options to --help-all
        assert SHORT_HELP[command].configs == CONFIGS[command]


@pytest.mark.parametrize(
    ("stage", "config_class"),
    [("generate", GenerateConfig), ("score", ScoreConfig), ("select", SelectConfig), ("train", TrainConfig),
     ("eval", EvalConfig)],
)  # fmt: skip
def test_every_stage_field_is_a_run_config_key_and_every_stage_key_a_field(stage, config_class) -> None:
    """A run's [stage] table takes every option of the stage's command; the shared ones are set at the top
    level or in [engine], once for every stage."""
    stage_keys = {key.removeprefix(f"{stage}.") for key in KEYS if key.startswith(f"{stage}.")}
    shared = {key.partition(".")[2] or key for key in KEYS if "." not in key or key.startswith("engine.")}
    assert shared == SHARED
    names = field_names(config_class)
    assert stage_keys | (shared & names) == names
    assert not stage_keys & shared  # each is set in one place only


def test_a_train_option_reaches_the_config(runner, monkeypatch, tmp_path) -> None:
    """The flags become the config the command runs with (nested engine settings included)."""
    seen: list[TrainConfig] = []
    monkeypatch.setattr("bleuberi_cli.train_cmd._run", lambda records, config, *rest: seen.append(config))
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": "a", "prompt": "Hi.", "references": ["Hello."]}\n')
    args = [
        "train",
        "-i",
        str(data),
        "-o",
        str(tmp_path / "r"),
        "--lr",
        "0.25",
        "--beta",
        "0",
        "--reward",
        "chrf",
        "--reward",
        "bleu:2",
        "--backend",
        "server",
        "--server-url",
        "http://127.0.0.1:9/v1",
        "--epsilon-high",
        "0.3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    [config] = seen
    assert (config.learning_rate, config.beta, config.reward, config.epsilon_high) == (
        0.25,
        0.0,
        ["chrf", "bleu:2"],
        0.3,
    )
    assert (config.engine.backend, config.engine.server_url) == ("server", ["http://127.0.0.1:9/v1"])
    untouched = TrainConfig()
    assert (config.num_generations, config.target_modules) == (untouched.num_generations, untouched.target_modules)


def test_a_refused_setting_is_one_line_and_exit_2(runner, tmp_path) -> None:
    result = runner.invoke(app, ["train", "-o", str(tmp_path / "r"), "--num-generations", "3"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "bleuberi: error: --per-device-train-batch-size (8) counts completions and must be a multiple of "
        "--num-generations (3)"  # the flags, as typed (issue 33): not the field names
    ]


def test_help_groups_options_under_their_panels(runner) -> None:
    text = runner.invoke(app, ["train", "--help-all"]).stdout
    for panel in ("LoRA:", "Sampling:", "GRPO loss:", "Generation engine:", "Run folder:"):
        assert f"\n{panel}\n" in text
    lora, sampling = text.index("\nLoRA:\n"), text.index("\nSampling:\n")
    assert lora < text.index("--lora-r R") < sampling  # an option sits under its own panel


def test_the_options_reference_is_made_from_the_declarations() -> None:
    """docs/options.md is what the declarations print (regenerate: python -m bleuberi_cli.options_doc)."""
    from bleuberi_cli.options_doc import options_markdown
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "options.md").read_text()
    assert text == options_markdown()
    for leaf in ("`--learning-rate` / `--lr`", "`--server-url`", "`--prompt-field`", "`--judge-url`"):
        assert leaf in text  # nested groups (engine, judges) and the reading options are in it
