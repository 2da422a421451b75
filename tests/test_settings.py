"""Each setting declared once, parsed once at the edge (issue 25): a run's stages have their commands'
defaults except where the demo overlay says otherwise, every setting of a stage that runs joins its
hash, bad settings stop before anything loads, and the library's layers import downwards only."""

from __future__ import annotations

import ast
import time
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from bleuberi_cli.app import app
from stages.core.declare import META_KEY, Leaf, literal_values, values_of
from stages.core.errors import BleuberiError, UsageError
from stages.run.config import DEMO, KEYS, STAGE_CONFIGS, RunConfig, build
from stages.run.recipe import stage_digests
from tests.conftest import ROOT, write_jsonl
from tests.test_code_shape import imported, modules

# The only settings that say how a stage runs rather than what it computes: a run's stage hashes leave
# them out, so changing them redoes nothing (written by hand: a new one must be added here on purpose).
HOW_IT_RUNS = {"threads", "server_url", "api_key_env", "concurrency", "jobs", "judge_timeout", "judge_retries"}
HOW_IT_RUNS |= {"judge_cache"}

# What `bleuberi CMD` needs besides its options to build its config (where records come from and go).
ARGS = {
    "generate": ["-i", "IN"],
    "score": ["-i", "IN"],
    "select": ["-i", "IN", "-n", "64"],
    "train": ["-i", "IN", "-o", "OUT"],
    "eval": ["-i", "IN"],
}


def _built_by_the_command(stage: str, monkeypatch, runner, tmp_path) -> Any:
    """The config `bleuberi STAGE` builds when given no option: caught as it is built."""
    cls = STAGE_CONFIGS[stage]
    built: list[Any] = []
    original = cls.__post_init__

    def record(self) -> None:
        original(self)
        built.append(self)

    monkeypatch.setattr(cls, "__post_init__", record)
    args = [a.replace("IN", str(tmp_path / "none.jsonl")).replace("OUT", str(tmp_path / "out")) for a in ARGS[stage]]
    runner.invoke(app, [stage, *args])  # stops at the missing input, after the config was built
    monkeypatch.undo()
    return built[0]


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_a_run_stage_has_its_commands_defaults_but_where_the_demo_overlay_says(stage, monkeypatch, runner, tmp_path):
    own = values_of(_built_by_the_command(stage, monkeypatch, runner, tmp_path))
    in_the_run = values_of(getattr(RunConfig(), stage))
    assert own.keys() == in_the_run.keys()
    differ = {name for name in own if own[name] != in_the_run[name]}
    overlaid = {key.rpartition(".")[2] for key in DEMO if key.startswith(f"{stage}.") or "." not in key}
    assert differ <= overlaid, {name: (own[name], in_the_run[name]) for name in differ - overlaid}
    for name in differ:  # and what the overlay sets is what the run gets
        assert in_the_run[name] == DEMO.get(f"{stage}.{name}", DEMO.get(name))


def test_every_eval_option_is_a_run_key() -> None:
    """[eval] accepts every key `bleuberi eval` takes (the shared ones at the top level and in [engine])."""
    from tests.test_options import EVERY, OWN, command_options

    reading = {"input", "prompt_field", "reference_field", "id_field", "skip_invalid"}
    for stage in STAGE_CONFIGS:
        for name in command_options(stage) - OWN[stage] - EVERY - reading:
            assert f"{stage}.{name}" in KEYS or name in KEYS or f"engine.{name}" in KEYS, (stage, name)


def _another(leaf: Leaf, value: Any) -> list[Any]:
    """Other values the option could take, likeliest valid first."""
    return [candidate for candidate in _candidates(leaf, value) if candidate != value]


def _candidates(leaf: Leaf, value: Any) -> list[Any]:
    choices = [c for c in (leaf.choices or literal_values(leaf.hint)) if c != value]
    if choices:
        return choices
    args = [a for a in typing.get_args(leaf.hint) if a is not type(None)]
    kind = args[0] if args and typing.get_origin(leaf.hint) is not list else leaf.hint
    if typing.get_origin(leaf.hint) is list:
        item = typing.get_args(leaf.hint)[0]
        return [[*value, "chrf"], ["chrf"]] if item is str else [[*value, 2.0]]
    if kind is bool or value is True or value is False:
        return [not value] if value is not None else [True, False]
    if kind is int:
        return [1, 2, 4] if value is None else [value * 2, value + 1, value + 4, 1]
    if kind is float:
        return [1.5, 0.5, 0.1] if value is None else [value / 2 if value else 0.1, value + 0.05, 0.3]
    return ["x", "base"]


# Settings whose other values need a companion setting: (the value, the companion), both set on the base too.
COMPANIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "train.async_rollouts": (True, {"engine": {"backend": "vllm"}}),
    "eval.answers": (["given=answers.jsonl"], {}),
    "eval.served": (["big=http://127.0.0.1:9/v1"], {}),
}


def _set(values: dict[str, Any], leaf: Leaf, value: Any) -> dict[str, Any]:
    changed = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    (changed.setdefault(leaf.tables[0], {}) if leaf.tables else changed)[leaf.name] = value
    return changed


def _which(key: str) -> int:
    """The stage (0 select, 1 train, 2 eval) whose hash a key joins first."""
    table = key.partition(".")[0] if "." in key else ""
    return 2 if key == "data.max_heldout" else {"train": 1, "eval": 2}.get(table, 0)


def test_every_setting_of_a_stage_that_runs_changes_its_hash() -> None:
    base = stage_digests(RunConfig())
    untouched, fixed = [], []
    for key, leaf in KEYS.items():
        if key in ("data.pool", "data.heldout"):
            continue  # files join by their contents (below)
        current = leaf.get(RunConfig())
        value, companion = COMPANIONS.get(key, (None, {}))
        before = stage_digests(build(companion)) if companion else base
        for candidate in [value] if key in COMPANIONS else _another(leaf, current):
            try:
                config = build(_set(companion, leaf, candidate))
            except BleuberiError:  # not valid here: try the next value
                continue
            break
        else:
            fixed.append(key)
            continue
        digests = stage_digests(config)
        first = _which(key)
        if leaf.name in HOW_IT_RUNS:
            assert digests == before, key
            untouched.append(leaf.name)
        elif "." not in key or key.startswith("engine."):  # shared: reaches every stage that has it
            assert digests[2] != before[2], key
        else:
            assert digests[first] != before[first], key
            assert digests[:first] == before[:first], f"{key} changed an earlier stage's hash"
    assert set(untouched) == HOW_IT_RUNS
    # a run trains (training needs token ids) on the base model's completions: these are never on in a run
    assert fixed == ["engine.chat_only", "generate.as_references"]


def test_the_data_joins_the_hashes_by_its_contents_not_its_name(tmp_path) -> None:
    from stages.run.config import DEMO_DATA

    copy = tmp_path / "pool.jsonl"
    copy.write_bytes((DEMO_DATA / "pool.jsonl").read_bytes())
    same = build({"data": {"pool": str(copy)}})
    assert stage_digests(same) == stage_digests(RunConfig())
    copy.write_bytes(copy.read_bytes() + b'{"id": "new", "prompt": "Hi.", "references": ["Hello."]}\n')
    assert stage_digests(same)[0] != stage_digests(RunConfig())[0]


def test_sft_with_an_unknown_reward_stops_in_one_line_before_any_model_is_read(runner, monkeypatch, tmp_path):
    from stages.core import models

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was looked for")

    for name in ("resolve_model", "load_model", "load_tokenizer", "embedded_gguf"):
        monkeypatch.setattr(models, name, never)
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hi.", "references": ["Hello."]}])
    start = time.perf_counter()
    result = runner.invoke(app, ["train", "--algo", "sft", "--reward", "nope", "-i", str(data), "-o", str(tmp_path)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == [
        "bleuberi: error: unknown metric 'nope'; choose from: bleu, bleu-paper, chrf, rouge-l, bleu-rouge-f1, "
        "bertscore, emb, rm, rm-url, judge-url, format, py"
    ]
    print(f"refused in {seconds:.2f}s")  # the bound is 5 s; tests assert no times


def _upward(path: Path) -> set[str]:
    """The library modules above stages/core that a module imports (anywhere in it)."""
    return {name for name in imported(path, set(modules())) if not name.startswith("stages.core")}


def test_the_core_imports_nothing_from_the_stages_above_it() -> None:
    above = {}
    for path in (ROOT / "stages" / "core").rglob("*.py"):
        upward = _upward(path)
        if upward:
            above[path.name] = upward
    assert above == {}


def test_the_check_finds_an_upward_import(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from stages.metrics import get_metric\n")
    assert _upward(probe) == {"stages.metrics"}


def _declarations(name: str) -> list[str]:
    """Every dataclass field in the library named `name` (a setting's declaration), as module:Class."""
    found = []
    for path in (ROOT / "stages").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and getattr(item.target, "id", None) == name:
                        found.append(f"{path.relative_to(ROOT)}:{node.name}")
    return found


def test_max_new_tokens_is_declared_once() -> None:
    assert _declarations("max_new_tokens") == ["stages/engines/base.py:SamplingParams"]


def _declared_options(cls: type, seen: dict[str, set[str]]) -> None:
    """Option name -> each distinct declaration (its metadata: help, type, panel...), nested groups included,
    read from the dataclasses."""
    hints = typing.get_type_hints(cls)
    for field in fields(cls):
        if is_dataclass(hints[field.name]):
            _declared_options(hints[field.name], seen)
        else:
            info = field.metadata[META_KEY]
            seen.setdefault(info.key or field.name, set()).add(f"{hints[field.name]} {info!r}")


def test_a_setting_that_several_commands_take_is_one_declaration() -> None:
    """Every option that more than one command takes is one declaration: the same help, type and panel
    everywhere (only a nesting's default may differ). `metrics` is two settings that share a name: what
    `score` computes, and what `eval` reports."""
    seen: dict[str, set[str]] = {}
    for cls in STAGE_CONFIGS.values():
        _declared_options(cls, seen)
    several = {name for name, declarations in seen.items() if len(declarations) > 1}
    assert several == {"metrics"}


def test_keys_of_earlier_releases_still_work_and_say_their_new_names(runner, tmp_path) -> None:
    from stages.run.config_file import load_config

    path = tmp_path / "old.toml"
    path.write_text('[select]\nmetric = "chrf"\nmax_new_tokens = 12\n[train]\nmax_prompt_length = 100\n')
    notes: list[str] = []
    config = load_config(path, on_note=notes.append)
    assert config.score.metrics == ["chrf"] and config.generate.sampling.max_new_tokens == 12
    assert config.train.prompt.max_prompt_length == config.eval.prompt.max_prompt_length == 100
    assert notes == [
        f"{path}: select.metric is now score.metrics; read as score.metrics (rename it to keep this quiet)",
        f"{path}: select.max_new_tokens is now generate.max_new_tokens; read as generate.max_new_tokens "
        "(rename it to keep this quiet)",
        f"{path}: train.max_prompt_length is now max_prompt_length; read as max_prompt_length "
        "(rename it to keep this quiet)",
    ]
    result = runner.invoke(app, ["run", str(path), "--print-config"])
    assert result.exit_code == 0 and 'metrics = ["chrf"]' in result.stdout
    assert result.stderr.count("\n") == 3 and result.stderr.startswith("note: ")


def test_a_fraction_in_a_run_replaces_the_demos_count() -> None:
    from stages.run.config_file import load_config

    config = load_config(None, ["select.fraction=0.25"])
    assert (config.select.num, config.select.fraction) == (None, 0.25)
    assert load_config(None).select.num == DEMO["select.num"]
    with pytest.raises(UsageError, match="exactly one of"):
        load_config(None, ["select.fraction=0.25", "select.num=3"])


def test_a_run_configuration_is_built_once_and_a_mistake_is_blamed_on_its_source(monkeypatch, tmp_path) -> None:
    """A file and `--set` values make one RunConfig, built once; only a failed load builds the file's
    values alone, to tell a mistake in the file (ConfigError, exit 1) from one in `--set` (exit 2)."""
    from stages.core.errors import ConfigError
    from stages.run import config_file

    built: list[dict[str, Any]] = []

    def counted(values: dict[str, Any]) -> RunConfig:
        built.append(values)
        return build(values)

    monkeypatch.setattr(config_file, "build", counted)
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[train]\nbeta = 0.1\n")
    bad.write_text("[select]\nnum = 0\n")
    config = config_file.load_config(good, ["select.num=5", "train.max_steps=7"])
    assert (config.train.beta, config.select.num, config.train.max_steps) == (0.1, 5, 7)
    assert len(built) == 1
    built.clear()
    with pytest.raises(UsageError, match=r"^--set: \[select\]: -n/--num must be >= 1"):
        config_file.load_config(good, ["select.num=0"])  # the file alone is valid: the --set value is wrong
    assert len(built) == 2
    with pytest.raises(ConfigError, match=r"^\[select\]: -n/--num must be >= 1"):
        config_file.load_config(bad, ["select.num=0"])  # the file alone is wrong: its own error
    with pytest.raises(ConfigError, match="-n/--num must be >= 1"):
        config_file.load_config(bad, ["train.bta=1"])  # an unknown --set key, but the file is wrong first
