"""What a user meets in the first hour (issue 9, item 13): --version, env, help text, where output
went, a prompt when stdin is a terminal, summaries that read, tables that are not cut, config hints,
a light --print-config and an adapter that says which model it belongs to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from bleuberi_cli.app import app
from tests.conftest import ROOT, demo_records, write_jsonl

SCORED = [
    {"id": "a", "prompt": "p", "references": ["the cat sat on the mat"], "completions": ["the cat sat", "a dog"]},
    {"id": "b", "prompt": "q", "references": ["jupiter is big"], "completions": ["jupiter is big"]},
]


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120, **kwargs)


def test_version_and_env(runner) -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout == "bleuberi 0.1.0\n"
    report = runner.invoke(app, ["env", "--json"])
    assert report.exit_code == 0, report.stderr
    fields = orjson.loads(report.stdout)
    assert {"bleuberi", "torch", "transformers", "peft", "vllm", "device", "python"} <= set(fields)
    assert fields["device"].startswith(("cpu", "cuda", "mps")) and fields["bleuberi"] == "0.1.0"
    assert "transformers " in runner.invoke(app, ["env"]).stdout


def test_generate_help_keeps_its_examples_verbatim(runner) -> None:
    text = runner.invoke(app, ["generate", "--help"], terminal_width=100).stdout
    assert "\\b" not in text and "\b" not in text
    assert "--server-chat-only \\\n        --server-url https://api.example.com/v1" in text  # a continuation, as typed


def test_score_and_select_say_where_the_output_went(runner, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", SCORED)
    scored = runner.invoke(app, ["score", "-i", str(data), "-o", str(tmp_path / "s.jsonl")])
    assert scored.exit_code == 0 and f"; written to {tmp_path / 's.jsonl'}" in scored.stderr
    assert "mean bleu = " in scored.stderr and "mean bleu mean" not in scored.stderr
    best = runner.invoke(app, ["score", "-i", str(data), "--aggregate", "max"])
    assert "mean bleu (max per record) = " in best.stderr
    chosen = runner.invoke(app, ["select", "-i", str(tmp_path / "s.jsonl"), "-n", "1", "-o", str(tmp_path / "c.jsonl")])
    assert chosen.exit_code == 0 and f"selected 1 of 2 records (mode hard); written to {tmp_path / 'c.jsonl'}" in (
        chosen.stderr
    )


def test_a_terminal_on_stdin_is_told_what_is_awaited() -> None:
    main, child = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bleuberi_cli", "score"],
        stdin=child,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    os.close(child)
    os.write(main, b"\x04")  # Ctrl-D: end of input
    out, err = proc.communicate(timeout=120)
    os.close(main)
    assert proc.returncode == 0 and out == b""
    assert err.startswith(b"reading records from stdin (end with Ctrl-D; -i FILE reads a file)\n")
    piped = subprocess.run([sys.executable, "-m", "bleuberi_cli", "score"], input=b"", capture_output=True, cwd=ROOT)
    assert b"reading records from stdin" not in piped.stderr  # a pipe is not waiting on a person


def test_tables_off_a_terminal_are_not_cut_to_80_columns() -> None:
    code = (
        "from rich.table import Table\nfrom bleuberi_cli.common import console\n"
        "t = Table(*[f'header-number-{i}' for i in range(9)])\nt.add_row(*['0.1234'] * 9)\nconsole.print(t)"
    )
    done = python(code, env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    text = done.stderr.decode()
    assert all(f"header-number-{i}" in text for i in range(9)), text
    assert max(map(len, text.splitlines())) > 80


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_steps=3", "unknown key 'max_steps' (did you mean 'train.max_steps'?)"),
        (
            "eval.metrics=bleu",
            "expected a list of str, got a string 'bleu' (a TOML list: --set 'eval.metrics=[\"bleu\"]')",
        ),
        ("select.num=0", "num must be >= 1, got 0"),
    ],
)
def test_config_mistakes_are_explained_before_any_work(runner, tmp_path, setting, message) -> None:
    result = runner.invoke(app, ["run", "-o", str(tmp_path / "r"), "--set", setting])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_print_config_imports_no_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom bleuberi_cli.app import app\n"
        "r = CliRunner().invoke(app, ['run', '--print-config'])\nassert r.exit_code == 0 and '[train]' in r.stdout\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"[]\n"


def test_the_adapter_records_the_model_as_the_user_named_it(runner, tiny_model, tmp_path) -> None:
    data, out = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4)), tmp_path / "run"
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(tiny_model), "--num-generations", "4",
            "--per-device-train-batch-size", "4", "--max-completion-length", "4", "--max-steps", "1"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    record = json.loads((out / "adapter" / "bleuberi_base_model.json").read_text())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert record == {
        "model": str(tiny_model),
        "loaded_from": config["base_model_name_or_path"],
        "base_dtype": "float32",
        "adapter_dtype": "float32",
    }
