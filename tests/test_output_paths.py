"""A wrong output path costs a second, never finished work (issue 33, finding 1): every output is checked
before anything is read or computed, as one line with exit 2 (the wrong kind of path) or 1 (a place that
cannot be written); and when the last rename fails anyway, the journal of finished records stays, and the
error names a command that keeps them."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import orjson
import pytest

from bleuberi_cli.app import app
from stages.core import preflight
from stages.core.errors import WriteFailed
from stages.core.journal import journal_records
from stages.core.jsonl import JsonlWriter
from tests.conftest import train_args, write_jsonl

SCORED = [{"id": f"q{i}", "prompt": "p", "references": ["the cat sat"], "completions": ["the cat"]} for i in range(3)]


def commands(data: Path, model: Path) -> dict[str, list[str]]:
    """Each command that writes a record file or report, by name, without its output option."""
    tiny = ["--model", str(model), "--max-new-tokens", "2"]
    return {
        "generate": ["generate", "-i", str(data), *tiny],
        "score": ["score", "-i", str(data)],
        "select": ["select", "-i", str(data), "-n", "1"],
        "eval": ["eval", "-i", str(data), *tiny],
    }


def only_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr.strip()


@pytest.mark.parametrize("command", ["generate", "score", "select", "eval"])
def test_a_folder_as_the_output_file_is_refused_before_any_work(runner, tmp_path, tiny_model, command) -> None:
    data, folder = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "adir"
    folder.mkdir()
    result = runner.invoke(app, [*commands(data, tiny_model)[command], "-o", str(folder)])
    assert result.exit_code == 2, result.stderr
    line = only_line(result.stderr)
    assert (
        line
        == f"bleuberi: error: {folder}: -o takes a file name, and this is a folder (name a file: {folder}/out.jsonl)"
    )
    assert result.stdout == "" and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "in.jsonl"]  # no journal: nothing was done


@pytest.mark.parametrize(("flag", "example"), [("--report", "report.md"), ("--plot", "scores.png")])
def test_a_folder_as_a_report_or_plot_is_refused(runner, tmp_path, tiny_model, flag, example) -> None:
    data, folder = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "adir"
    folder.mkdir()
    command = commands(data, tiny_model)["eval" if flag == "--report" else "select"]
    result = runner.invoke(app, [*command, flag, str(folder)])
    assert result.exit_code == 2
    assert only_line(result.stderr).endswith(
        f"{flag} takes a file name, and this is a folder (name a file: {folder}/{example})"
    )


@pytest.mark.parametrize("command", ["generate", "score", "select", "eval"])
def test_a_path_under_a_file_is_refused(runner, tmp_path, tiny_model, command) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", SCORED)
    target = tmp_path / "in.jsonl" / "deeper" / "x.jsonl"
    result = runner.invoke(app, [*commands(data, tiny_model)[command], "-o", str(target)])
    assert result.exit_code == 2
    assert (
        only_line(result.stderr) == f"bleuberi: error: {target}: -o cannot be written: {data} is a file, not a folder"
    )


@pytest.mark.parametrize(
    ("place", "cause"), [("/proc", "files cannot be created there"), ("/sys", "permission denied")]
)
def test_a_place_files_cannot_be_made_is_one_line_exit_1(runner, tmp_path, place, cause) -> None:
    if not os.path.isdir(place):
        pytest.skip(f"no {place} here")
    data = write_jsonl(tmp_path / "in.jsonl", SCORED)
    result = runner.invoke(app, ["score", "-i", str(data), "-o", f"{place}/x.jsonl"])
    assert result.exit_code == 1
    assert only_line(result.stderr) == f"bleuberi: error: {place}/x.jsonl: cannot write: {cause} ({place})"


def test_a_read_only_folder_is_one_line_exit_1(runner, tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into a folder whatever its mode (the /proc and /sys tests cover root)")
    data, locked = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = runner.invoke(app, ["score", "-i", str(data), "-o", str(locked / "new" / "x.jsonl")])
    assert result.exit_code == 1
    assert only_line(result.stderr).endswith(f"cannot write: permission denied ({locked})")


def test_a_full_disk_is_refused_before_the_work(runner, tmp_path, monkeypatch) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", SCORED)
    real = os.statvfs

    def full(path):
        found = real(path)
        return os.statvfs_result((*found[:4], 0, *found[5:]))  # f_bavail: no block left for us

    monkeypatch.setattr(preflight.os, "statvfs", full)
    result = runner.invoke(app, ["score", "-i", str(data), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 1
    assert (
        only_line(result.stderr)
        == f"bleuberi: error: {tmp_path}/out.jsonl: cannot write: no space left on device ({tmp_path})"
    )


def test_train_and_run_refuse_a_file_as_their_folder(runner, tmp_path, tiny_model) -> None:
    data, afile = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "afile"
    afile.write_text("mine\n")
    trained = runner.invoke(app, train_args(data, afile, tiny_model))
    assert trained.exit_code == 2
    assert only_line(trained.stderr) == f"bleuberi: error: {afile}: -o takes a folder, and this is a file"
    merged = runner.invoke(app, [*train_args(data, tmp_path / "run", tiny_model), "--merge-to", str(afile)])
    assert merged.exit_code == 2 and only_line(merged.stderr).endswith("--merge-to takes a folder, and this is a file")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    ran = runner.invoke(app, ["run", "-o", str(afile), "--set", f"model={tiny_model}"])
    assert ran.exit_code == 2 and only_line(ran.stderr).endswith("-o takes a folder, and this is a file")
    assert afile.read_text() == "mine\n"


def written_then_blocked(target: Path, **writer_options) -> WriteFailed:
    """Write SCORED through a writer of `target`, and make `target` a folder before the final rename."""
    with pytest.raises(WriteFailed) as failed, JsonlWriter(target, **writer_options) as writer:
        for record in SCORED:
            writer.write(record)
        target.mkdir()
    return failed.value


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
@pytest.mark.parametrize("ordered", [False, True])
def test_a_failed_final_rename_keeps_the_journal_and_names_a_command_that_keeps_it(tmp_path, name, ordered) -> None:
    target = tmp_path / name
    order = [record["id"] for record in reversed(SCORED)] if ordered else None
    error = written_then_blocked(target, order=order)
    journals = sorted(tmp_path.glob(f".{name}.*.tmp"))
    assert len(journals) == 1, "the finished records must survive the failed rename"
    assert [r["id"] for r in journal_records(journals[0])] == ["q0", "q1", "q2"]
    message = str(error)
    assert "\n" not in message and message.startswith(f"{target}: cannot write: is a directory; its 3 finished records")
    command = message.split(": mv ", 1)[1].split(" keeps them")[0]
    done = subprocess.run(["mv", *shlex.split(command)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    kept = tmp_path / ("out.kept.jsonl.gz" if name.endswith(".gz") else "out.kept.jsonl")
    assert [r["id"] for r in journal_records(kept)] == ["q0", "q1", "q2"]


def test_a_failed_rename_with_nothing_written_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "out.jsonl"
    with pytest.raises(WriteFailed, match=r"is a directory$"), JsonlWriter(target):
        target.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_generate_into_a_path_that_became_a_folder_keeps_its_answers(runner, tmp_path, tiny_model, monkeypatch) -> None:
    """The folder appears while the command runs (the check before it passed): the answers survive and the
    error is one line."""
    from stages import generate as generate_stage

    data, target = write_jsonl(tmp_path / "in.jsonl", SCORED), tmp_path / "answers.jsonl"
    real = generate_stage.generate_records

    def then_a_folder(*args, **kwargs):
        yield from real(*args, **kwargs)
        target.mkdir()

    monkeypatch.setattr(generate_stage, "generate_records", then_a_folder)
    args = ["generate", "-i", str(data), "--model", str(tiny_model), "--max-new-tokens", "2", "-o", str(target)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    line = only_line(result.stderr.splitlines()[-1] + "\n")
    assert "its 3 finished records are kept in" in line
    journal = next(tmp_path.glob(".answers.jsonl.*.tmp"))
    assert sorted(orjson.loads(x)["id"] for x in journal.read_bytes().splitlines()) == ["q0", "q1", "q2"]
