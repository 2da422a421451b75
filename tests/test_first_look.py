"""What a new user reads first is right (issue 28): help that starts with what most runs set, empty
input that is an error where nothing can be done, one-line usage errors, and a run that ends with its
stage times. (The length-control labels and the progress estimates are tested in
tests/test_eval_significance.py and tests/test_first_hour_more.py.)"""

from __future__ import annotations

import pytest
import typer.main

from bleuberi_cli.app import app
from bleuberi_cli.help import SHORT_HELP
from tests.conftest import demo_records, train_args, write_jsonl

ESSENTIALS = {command: layout.essential for command, layout in SHORT_HELP.items()}


def _flags(command: str) -> dict[str, str]:
    """Each option of a command by name: its first flag (not --help-all: hidden, the short help names it)."""
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return {param.name: param.opts[0] for param in params if param.opts and not getattr(param, "hidden", False)}


def _option_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  -")]


@pytest.mark.parametrize("command", sorted(ESSENTIALS))
def test_help_starts_with_inputs_and_the_options_most_runs_set(runner, command) -> None:
    short = runner.invoke(app, [command, "--help"]).stdout
    full = runner.invoke(app, [command, "--help-all"]).stdout
    assert len(short.splitlines()) <= 80 < len(full.splitlines()) or command in ("generate", "score")
    options = _option_lines(short)
    assert options[0].startswith("-i, --input FILE")  # where the records come from, first
    flags = _flags(command)
    shown = [flag for flag in flags.values() if any(line.startswith(flag) or f", {flag}" in line for line in options)]
    for name in ESSENTIALS[command]:
        assert flags[name] in shown, name
    assert len(shown) < len(flags)  # the rest waits in --help-all...
    hidden = len(flags) - len(shown)
    assert f"{hidden} more options" in " ".join(short.split())  # ...and the short help says how many and where
    assert "--help-all" in short and "docs/options.md" in short
    everything = " ".join(full.split())
    assert all(flag in everything for flag in flags.values())  # --help-all lists every option
    assert "Inputs and outputs:" not in full and "Most used:" not in full


def test_a_short_command_keeps_its_whole_help(runner) -> None:
    text = runner.invoke(app, ["select", "--help"]).stdout
    assert "--help-all" not in text and "--mode" in text and "--fraction" in text


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["generate", "--temperature", "hot"], "--temperature: expected a number, got 'hot'"),
        (["train", "-o", "x", "--algo", "nope"], "--algo: expected one of 'grpo', 'sft', got 'nope'"),
        (["train", "-o", "x", "--max-steps", "1.5"], "--max-steps: expected an integer, got '1.5'"),
        (["train", "-o", "x", "--max-stepz", "3"], "no such option --max-stepz (did you mean --max-steps?)"),
        (["train"], "-o/--output-dir is needed"),
        (["eval", "-m"], "-m needs a value"),
        (["select", "-n", "0"], "-n/--num must be >= 1, got 0 (a selection of nothing trains nothing)"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_option_and_exit_2(runner, argv, line) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert result.stderr == f"bleuberi: error: {line}\n" and result.stdout == ""


def test_a_refused_train_prints_its_error_alone(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(data, out, tiny_model)).exit_code == 0
    again = runner.invoke(app, train_args(data, out, tiny_model))  # a run is there: refused
    assert again.exit_code == 2
    assert again.stderr.splitlines() == [
        f"bleuberi: error: {out} already holds a training run (checkpoints, adapter): continue it with --resume, "
        "or start over with --overwrite (removes it)"
    ]


def test_a_run_ends_with_its_stage_times() -> None:
    from pathlib import Path

    from bleuberi_cli.run_cmd import stage_times
    from stages.run.recipe import RunResult

    first = RunResult(Path("r"), {}, ["select", "train", "eval"], [], {"select": 58.2, "train": 321.0, "eval": 33.4})
    assert stage_times(first) == "stage times: select 58s, train 5m21s, eval 33s (total 6m53s)"
    again = RunResult(Path("r"), {}, ["eval"], ["select", "train"], {"eval": 31.0})
    assert stage_times(again) == "stage times: eval 31s, select up to date, train up to date"
