"""Each stage of `bleuberi run` is given only the inputs it declares, and each declared input joins its
hash: an input a stage reads cannot be missing from its hash (the hashes were once computed by hand,
apart from the code that read the inputs, and drifted)."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from stages.core.declare import Leaf, leaves
from stages.core.errors import BleuberiError
from stages.run.config import DEMO_DATA, RunConfig
from stages.run.ledger import inputs_digest
from stages.run.recipe import STAGES, EvalInputs, Hooks, SelectInputs, TrainInputs, planned, stage_digests

INPUTS = {"select": SelectInputs, "train": TrainInputs, "eval": EvalInputs}


def _plan() -> dict[str, tuple[Any, str]]:
    return {stage.name: (inputs, digest) for stage, inputs, digest in planned(RunConfig())}


def test_the_table_runs_select_train_eval_each_on_its_own_inputs() -> None:
    assert [stage.name for stage in STAGES] == ["select", "train", "eval"]
    plan = _plan()
    for name, inputs_class in INPUTS.items():
        assert type(plan[name][0]) is inputs_class
    # each hash covers the one before it: train's and eval's inputs name it
    assert plan["train"][0].after == plan["select"][1] and plan["eval"][0].after == plan["train"][1]
    assert stage_digests(RunConfig()) == tuple(digest for _inputs, digest in plan.values())


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_a_stage_is_given_only_its_declared_inputs(stage) -> None:
    """A stage's function takes its inputs, where to write, whether to resume and whom to tell: nothing of
    the run's configuration, so whatever it reads went through its declaration (and its hash)."""
    hints = typing.get_type_hints(stage.run)
    expected = {"inputs": INPUTS[stage.name], "run_dir": Path, "resume": bool, "hooks": Hooks}
    assert hints == {**expected, "return": type(None)}
    assert [f.name for f in dataclasses.fields(Hooks)] == ["say", "on_progress", "on_train_step"]  # callbacks only


def _another_value(leaf: Leaf, current: Any) -> list[Any]:
    """Other values a setting may take, by its type (what is valid is its config's to say)."""
    if choices := leaf.choices:
        return [choice for choice in choices if choice != current]
    kinds = [arg for arg in typing.get_args(leaf.hint) if arg is not type(None)] or [leaf.hint]
    kind = kinds[0]
    if kind is bool:
        return [not current]
    if kind is int:
        return [(current or 0) + 1, (current or 0) + 2]
    if kind is float:
        return [(current or 0.0) + 0.25, (current or 0.0) / 2]
    if kind is str:
        return ["x", "bleu"]
    return []


def _replace(config: Any, attrs: tuple[str, ...], value: Any) -> Any:
    inner = value if len(attrs) == 1 else _replace(getattr(config, attrs[0]), attrs[1:], value)
    return dataclasses.replace(config, **{attrs[0]: inner})


def _changed_settings(config: Any) -> Any:
    """`config` with one setting that says what its stage computes (not threads, a server's address) changed."""
    for leaf in leaves(type(config), _defaults=config):
        if not leaf.info.in_digest:
            continue
        for value in _another_value(leaf, leaf.get(config)):
            try:
                return _replace(config, leaf.attrs, value)
            except (BleuberiError, TypeError, ValueError):
                continue
    raise AssertionError(f"no setting of {type(config).__name__} could be changed")


def _changed(value: Any, tmp_path: Path) -> Any:
    """Another value of a declared input, of its kind."""
    if isinstance(value, Path):
        copy = tmp_path / value.name
        copy.write_bytes(value.read_bytes() + b'{"id": "one-more", "prompt": "Hi.", "references": ["Hello."]}\n')
        return copy
    if dataclasses.is_dataclass(value):
        return _changed_settings(value)
    if isinstance(value, tuple):
        return (*value, "py:another.py:f sha256=0")
    if isinstance(value, int):  # a record limit
        return value + 1
    if isinstance(value, str):  # the hash of the stage before
        return value + "0"
    raise AssertionError(f"an input of a kind this test cannot change: {type(value).__name__}")


@pytest.mark.parametrize("stage", list(INPUTS))
def test_every_declared_input_joins_its_stage_hash(stage, tmp_path) -> None:
    inputs, digest = _plan()[stage]
    names = [f.name for f in dataclasses.fields(inputs)]
    assert names, stage
    for name in names:
        changed = dataclasses.replace(inputs, **{name: _changed(getattr(inputs, name), tmp_path)})
        assert inputs_digest(stage, changed) != digest, f"{stage}: {name} is not in its hash"
        assert inputs_digest(stage, dataclasses.replace(inputs)) == digest  # and the same inputs, the same hash


@pytest.mark.parametrize(("stage", "name"), [("select", "pool"), ("eval", "heldout")])
def test_a_data_file_joins_its_hash_by_its_contents(stage, name, tmp_path) -> None:
    """A copy elsewhere hashes the same; the same file with one more record does not."""
    inputs, digest = _plan()[stage]
    copy = tmp_path / "data.jsonl"
    shutil.copyfile(getattr(inputs, name), copy)
    moved = dataclasses.replace(inputs, **{name: copy})
    assert inputs_digest(stage, moved) == digest
    copy.write_bytes(copy.read_bytes() + b'{"id": "one-more", "prompt": "Hi.", "references": ["Hello."]}\n')
    assert inputs_digest(stage, moved) != digest
    assert getattr(inputs, name).parent == DEMO_DATA  # the demo's: the run's default data


def test_a_moved_run_folder_keeps_eval_hash_and_eval_runs_on_the_adapter_in_it(tmp_path) -> None:
    """The hash names the trained adapter relative to the run folder; the eval that runs finds it inside."""
    inputs, _digest = _plan()["eval"]
    assert inputs.evaluation.adapters[0] == "train/adapter=trained"
    adapters = inputs.in_folder(tmp_path / "run").adapters
    assert adapters[0] == f"{tmp_path / 'run' / 'train' / 'adapter'}=trained"
    assert adapters[1:] == inputs.evaluation.adapters[1:]


def test_only_settings_that_say_how_a_stage_runs_stay_out() -> None:
    """Threads (how a stage runs, not what it computes) leave every hash as it was."""
    config = RunConfig()
    threaded = dataclasses.replace(config, model=dataclasses.replace(config.model, threads=3))
    assert stage_digests(threaded) == stage_digests(config)
