"""`train --report-to`: the per-step record and the config reach the chosen trackers (issue 9, item 14).
TensorBoard is checked offline by reading its event file back."""

from __future__ import annotations

import importlib.util

import orjson
import pytest

from bleuberi_cli.app import app
from stages.train.telemetry import flatten_numbers
from tests.conftest import demo_records, train_args, write_jsonl


def test_flatten_numbers_keeps_numbers_only() -> None:
    record = {"step": 2, "kl": 0.5, "rewards": {"bleu": {"mean": 0.25}}, "reward_combine": "sum", "ok": True}
    assert flatten_numbers(record) == {"step": 2.0, "kl": 0.5, "rewards/bleu/mean": 0.25}


def test_tensorboard_gets_every_logged_step_and_the_config(runner, tiny_model, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    result = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, report_to="tensorboard"))
    assert result.exit_code == 0, result.stderr
    logged = [orjson.loads(line) for line in (out / "metrics.jsonl").read_bytes().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for name in ("reward_mean", "kl", "loss"):
        points = events.Scalars(name)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx([r[name] for r in logged], rel=1e-6)
    assert "rewards/bleu/mean" in events.Tags()["scalars"]
    assert any("config" in tag for tag in events.Tags()["tensors"])


def test_no_tracker_by_default(runner, tiny_model, tmp_path) -> None:
    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    assert runner.invoke(app, train_args(data, out, tiny_model, max_steps=2)).exit_code == 0
    assert not (out / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_tracker_stops_before_any_work(runner, tiny_model, tmp_path) -> None:
    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    result = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, report_to="tensorboard,wandb"))
    assert result.exit_code == 1
    assert result.stderr == "bleuberi: error: --report-to wandb needs the wandb package: pip install wandb\n"
    assert not (out / "config.json").exists()
    bad = runner.invoke(app, train_args(data, out, tiny_model, max_steps=2, report_to="comet"))
    assert bad.exit_code == 1 and "--report-to comet: expected none or any of tensorboard" in bad.stderr


def test_wandb_mlflow_and_trackio_get_the_config_each_step_and_the_end(tmp_path, monkeypatch) -> None:
    """Each tracker's own calls, on stand-in modules that record them (the packages need accounts or servers)."""
    import sys
    import types

    from stages.train.telemetry import Telemetry

    calls: list[tuple] = []

    def recorder(name: str):
        return lambda *args, **kwargs: calls.append((name, args, kwargs))

    run = types.SimpleNamespace(log=recorder("wandb.run.log"), finish=recorder("wandb.run.finish"))
    wandb = types.SimpleNamespace(init=lambda **kwargs: calls.append(("wandb.init", (), kwargs)) or run)
    mlflow = types.SimpleNamespace(
        **{f: recorder(f"mlflow.{f}") for f in ("start_run", "log_params", "log_metrics", "end_run")}
    )
    trackio = types.SimpleNamespace(**{f: recorder(f"trackio.{f}") for f in ("init", "log", "finish")})
    for name, module in (("wandb", wandb), ("mlflow", mlflow), ("trackio", trackio)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    out = tmp_path / "run-7"
    telemetry = Telemetry(["wandb", "mlflow", "trackio"], out, {"beta": 0.04, "model": "m" * 600})
    telemetry.log({"step": 3, "kl": 0.5, "rewards": {"bleu": {"mean": 0.25}}, "reward_combine": "sum"})
    telemetry.close()
    values = {"kl": 0.5, "rewards/bleu/mean": 0.25}  # flattened, numbers only, the step apart
    config = {"beta": 0.04, "model": "m" * 600}
    assert calls == [
        ("wandb.init", (), {"project": "bleuberi", "name": "run-7", "dir": str(out), "config": config}),
        ("mlflow.start_run", (), {"run_name": "run-7"}),
        ("mlflow.log_params", ({"beta": "0.04", "model": "m" * 500},), {}),  # mlflow caps values at 500
        ("trackio.init", (), {"project": "bleuberi", "name": "run-7", "config": config}),
        ("wandb.run.log", (values,), {"step": 3}),
        ("mlflow.log_metrics", (values,), {"step": 3}),
        ("trackio.log", (values,), {"step": 3}),
        ("wandb.run.finish", (), {}),
        ("mlflow.end_run", (), {}),
        ("trackio.finish", (), {}),
    ]
