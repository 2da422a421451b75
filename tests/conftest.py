"""Shared fixtures. Unit tests build tiny models themselves; only tests marked `slow` load the real default."""

from __future__ import annotations

import socket
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else orjson.dumps(row))
            f.write(b"\n")
    return path


def read_jsonl_text(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (built once per session)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    from tests.tiny_model import make_lora_adapter

    return make_lora_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter")


def demo_records(name: str = "heldout", count: int | None = None) -> list[dict]:
    rows = [orjson.loads(line) for line in (EXAMPLES / "data" / f"{name}.jsonl").read_bytes().splitlines()]
    return rows[:count] if count else rows


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a stand-in or a real server started by a test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The sizes a tiny training run needs: fast on the tiny model, still a real GRPO step.
TINY_TRAIN = {"num-generations": 4, "per-device-train-batch-size": 4, "max-completion-length": 4, "max-steps": 1}


def train_args(data: Path, out: Path, model: Path | str, **options: object) -> list[str]:
    """`bleuberi train` argv on a tiny model: TINY_TRAIN's sizes, overridden or extended by `options`
    (max_steps=3 -> --max-steps 3; True -> a bare flag; None -> left out)."""
    settings = {**TINY_TRAIN, **{name.replace("_", "-"): value for name, value in options.items()}}
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(model)]
    for name, value in settings.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None and value is not False:
            args += [f"--{name}", str(value)]
    return args
