"""Training telemetry where TRL and accelerate users look: `--report-to tensorboard,wandb,mlflow,trackio`.

Each logged step's record (the one metrics.jsonl gets) goes to every chosen tracker, flattened to
numbers (`rewards/bleu/mean`); the run's configuration goes once at the start. Every tracker is an
optional package imported only when asked for; a missing one stops the run before training, with the
pip command that installs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from stages.core.errors import ConfigError

REPORTERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class Reporter(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def flatten_numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"rewards": {"bleu": {"mean": 0.2}}, "step": 3}` -> `{"rewards/bleu/mean": 0.2, "step": 3.0}`."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def parse_report_to(values: Sequence[str]) -> list[str]:
    """`["tensorboard,wandb"]`, `["none"]` or `[]` -> the trackers, checked."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if names == ["none"] or not names:
        return []
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"--report-to {name}: expected none or any of {', '.join(REPORTERS)}")
    return list(dict.fromkeys(names))


class _TensorBoard:
    def __init__(self, output_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Calls:
    """A tracker driven by two of its package's functions: one logs a step's values (`log(values,
    step=step)`, as wandb, mlflow and trackio take them), the other ends the run."""

    def __init__(self, log: Callable[..., Any], finish: Callable[[], Any]) -> None:
        self._log, self._finish = log, finish

    def log(self, step: int, values: dict[str, float]) -> None:
        self._log(values, step=step)

    def close(self) -> None:
        self._finish()


def _wandb(output_dir: Path, config: dict[str, Any]) -> Reporter:
    import wandb

    project = os.environ.get("WANDB_PROJECT", "bleuberi")
    run = wandb.init(project=project, name=output_dir.name, dir=str(output_dir), config=config)
    return _Calls(run.log, run.finish)


def _mlflow(output_dir: Path, config: dict[str, Any]) -> Reporter:
    import mlflow

    mlflow.start_run(run_name=output_dir.name)
    mlflow.log_params({k: str(v)[:500] for k, v in config.items()})  # mlflow caps parameter values
    return _Calls(mlflow.log_metrics, mlflow.end_run)


def _trackio(output_dir: Path, config: dict[str, Any]) -> Reporter:
    import trackio

    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "bleuberi"), name=output_dir.name, config=config)
    return _Calls(trackio.log, trackio.finish)


_MAKERS: dict[str, Callable[[Path, dict[str, Any]], Reporter]] = {
    "tensorboard": _TensorBoard,
    "wandb": _wandb,
    "mlflow": _mlflow,
    "trackio": _trackio,
}


def check_installed(names: Sequence[str]) -> None:
    """Fail before any work (loading a model takes minutes) when a chosen tracker is not installed."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")


class Telemetry:
    """Every chosen tracker; `log` sends one step record to all of them."""

    def __init__(self, names: Sequence[str], output_dir: Path, config: dict[str, Any]) -> None:
        self.reporters: list[Reporter] = []
        for name in names:
            try:
                self.reporters.append(_MAKERS[name](output_dir, config))
            except ImportError:
                self.close()
                raise ConfigError(
                    f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}"
                ) from None

    def log(self, record: dict[str, Any]) -> None:
        values = flatten_numbers(record)
        step = int(values.pop("step", 0))
        for reporter in self.reporters:
            reporter.log(step, values)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []
