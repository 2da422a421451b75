"""A training folder that already holds a run: refused, resumed against the checkpoint's own record,
or overwritten (issue 9, item 1)."""

from __future__ import annotations

import json

import pytest

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.conftest import demo_records, small_train_config, train_args, write_jsonl


def small_config(model, **overrides) -> TrainConfig:
    return small_train_config(model, **{"max_completion_length": 4, "max_steps": 2, "learning_rate": 1e-5, **overrides})


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tiny_model, tmp_path) -> None:
    records, out = demo_records(count=4), tmp_path / "run"
    train(records, small_config(tiny_model, max_steps=4), out)
    with pytest.raises(UsageError, match=r"already holds a training run .*--resume.*--overwrite"):
        train(records, small_config(tiny_model, max_steps=2, seed=7), out)
    assert (out / "checkpoints" / "step-4").is_dir()  # the refused run touched nothing

    again = train(records, small_config(tiny_model, max_steps=2, seed=7), out, overwrite=True)
    assert [m["step"] for m in again.metrics] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # the old step-4 is gone
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 7


def test_the_cli_refuses_in_one_line(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    out = tmp_path / "run"
    args = train_args(data, out, tiny_model, per_device_train_batch_size=8)
    assert runner.invoke(app, args).exit_code == 0
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--overwrite" in refused.stderr, refused.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_resume_checks_the_checkpoints_own_settings(tiny_model, tmp_path) -> None:
    records, out = demo_records(count=4), tmp_path / "run"
    train(records, small_config(tiny_model, learning_rate=1e-2), out)
    # config.json rewritten by another run (as a fresh run into this folder used to do)
    saved = json.loads((out / "config.json").read_text())
    saved["config"]["learning_rate"] = 1e-3
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UsageError, match=r"learning_rate.*trainer_state.json"):
        train(records, small_config(tiny_model, learning_rate=1e-3, max_steps=4), out, resume="latest")
    more = train(records, small_config(tiny_model, learning_rate=1e-2, max_steps=4), out, resume="latest")
    assert [m["step"] for m in more.metrics] == [1, 2, 3, 4]
