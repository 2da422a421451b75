"""More checks for the streaming stages: errors on stdin, --skip-invalid, atomic output, a real pipe.

The contract shared by every command (empty input, a bad line, --help, -q, a closed stdout) is in
test_cli_contract.py.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing

import orjson
import pytest
import typer

from bleuberi_cli.app import app
from bleuberi_cli.common import OutputOpt
from bleuberi_cli.config_options import cli_command
from tests.conftest import EXAMPLES, ROOT, write_jsonl

SAMPLE = EXAMPLES / "sample.jsonl"

# Each stage with the extra arguments it needs to run on a valid record set ({model}: the tiny model).
STAGES: dict[str, list[str]] = {
    "generate": ["--model", "{model}", "--max-new-tokens", "2"],
    "score": [],
    "select": ["-n", "1"],
    "eval": ["--model", "{model}", "--max-new-tokens", "2", "--bootstrap-resamples", "10"],
}


@pytest.fixture
def stage_args(tiny_model):
    def args(stage: str) -> list[str]:
        return [a.replace("{model}", str(tiny_model)) for a in STAGES[stage]]

    return args


VALID = {"id": "a", "prompt": "p", "references": ["r"], "completions": ["c"], "score": 0.5}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stdin_errors_name_stdin(runner, stage, stage_args) -> None:
    result = runner.invoke(app, [stage, *stage_args(stage)], input=orjson.dumps(VALID) + b"\nnope\n")
    assert result.exit_code == 1
    assert "bleuberi: error: <stdin>:2: not valid JSON" in result.stderr


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_skip_invalid_counts_what_it_skipped(runner, stage, stage_args, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [VALID, b"{oops", VALID | {"id": "b"}])
    result = runner.invoke(app, [stage, "-i", str(path), "--skip-invalid", *stage_args(stage)])
    assert result.exit_code == 0
    assert "skipped 1 invalid record(s); first: " in result.stderr and f"{path}:2" in result.stderr


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_failed_run_leaves_existing_output_untouched(runner, stage, stage_args, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"previous": true}\n')
    path = write_jsonl(tmp_path / "in.jsonl", [VALID] * 3 + [b"{broken"])
    result = runner.invoke(app, [stage, "-i", str(path), "-o", str(out), *stage_args(stage)])
    assert result.exit_code == 1
    assert out.read_bytes() == b'{"previous": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def _bleuberi(*args: str) -> list[str]:
    return [sys.executable, "-m", "bleuberi_cli", *args]


def test_real_pipe_score_into_select(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    score = subprocess.Popen(
        _bleuberi("score", "-i", str(SAMPLE), "-m", "bleu", "-m", "bleu-paper"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    select = subprocess.run(
        _bleuberi("select", "--mode", "hard", "-n", "10", "-q"),
        stdin=score.stdout,
        capture_output=True,
        env=env,
        timeout=120,
    )
    score.stdout.close()
    assert score.wait(timeout=60) == 0
    assert select.returncode == 0, select.stderr
    rows = [orjson.loads(line) for line in select.stdout.splitlines()]
    assert len(rows) == 10
    assert all(r["selection"]["mode"] == "hard" for r in rows)
    assert b"scored 20 records" in score.stderr.read()


def test_an_option_that_defaults_to_none_keeps_its_flags_on_every_python() -> None:
    """Before Python 3.11, typing.get_type_hints wraps the hint of a parameter that defaults to None in
    Optional[...], which hid the Annotated option from typer: on 3.10, `-o` was an unknown option of every
    streaming command (found by CI's floors environment)."""

    def command(output: OutputOpt = None) -> None: ...  # as in every streaming command

    decorated = cli_command()(command)
    hint = inspect.signature(decorated).parameters["output"].annotation  # what typer reads
    assert typing.get_origin(hint) is typing.Annotated and isinstance(typing.get_args(hint)[1], typer.models.OptionInfo)
