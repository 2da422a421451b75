"""`bleuberi eval --answers NAME=FILE`: systems whose answers were produced elsewhere."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from bleuberi_cli.app import app
from tests.conftest import read_jsonl_text, write_jsonl

HELDOUT = [
    {"id": "h1", "prompt": "Name the largest planet.", "references": ["Jupiter is the largest planet."]},
    {"id": "h2", "prompt": "What colour is the sky?", "references": ["The sky is blue.", "Blue."]},
    {"id": "h3", "prompt": "Capital of France?", "references": ["The capital of France is Paris."]},
]
OLD = {"h1": "Saturn is big.", "h2": "It is green.", "h3": "The capital of France is Paris."}
NEW = {"h1": "Jupiter is the largest planet.", "h2": "The sky is blue.", "h3": "Paris."}


@pytest.fixture
def files(tmp_path):
    held = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    old = write_jsonl(tmp_path / "old.jsonl", [{"id": k, "completion": v} for k, v in OLD.items()])
    new_rows = [  # bleuberi generate's shape: completions + generation (tokens, finish reasons)
        {"id": k, "completions": [v, "ignored"], "generation": {"completion_tokens": [7], "finish_reasons": ["stop"]}}
        for k, v in reversed(NEW.items())  # any order
    ]
    new = write_jsonl(tmp_path / "new.jsonl", new_rows)
    return held, old, new


@pytest.fixture
def no_model_loads(monkeypatch):
    from stages.engines.generator import Generator

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Generator, "load", refuse)


def test_answers_only_are_scored_and_compared_without_a_model(runner, files, tmp_path, no_model_loads) -> None:
    held, old, new = files
    report = tmp_path / "report.json"
    argv = ["eval", "-i", str(held), "--answers", f"old={old}", "--answers", f"new={new}", "--baseline", "old"]
    result = runner.invoke(app, [*argv, "--report", str(report), "-m", "bleu", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    summary = json.loads(report.read_text())
    assert summary["model"] is None and summary["baseline"] == "old"
    refs = {r["id"]: r["references"] for r in HELDOUT}
    for name, answers in (("old", OLD), ("new", NEW)):
        by_hand = [sacrebleu.sentence_bleu(answers[i], refs[i]).score / 100 for i in refs]
        assert summary["systems"][name]["metrics"]["bleu"]["mean"] == pytest.approx(sum(by_hand) / 3, abs=1e-12)
    # new beats old on h1 and h2 (old's h3 is the reference itself): 2 wins, 0 ties, 1 loss
    rates = summary["systems"]["new"]["vs_base"]["bleu"]
    assert [rates["win"], rates["tie"], rates["loss"]] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert "vs_base" not in summary["systems"]["old"]
    # lengths come from the answers' own generation fields where they have them
    assert summary["systems"]["new"]["length"]["tokens_mean"] == 7
    assert summary["systems"]["new"]["truncation_rate"] == 0.0
    assert summary["systems"]["old"]["length"]["tokens_mean"] is None
    assert summary["systems"]["old"]["truncation_rate"] is None
    rows = read_jsonl_text(result.stdout)
    assert [r["id"] for r in rows] == ["h1", "h2", "h3"]
    assert rows[0]["evaluation"]["new"]["completion"] == NEW["h1"]  # the first of `completions`


def test_default_baseline_is_base_else_the_first(runner, files, tmp_path, no_model_loads) -> None:
    held, old, new = files
    for specs, baseline in (([f"x={old}", f"base={new}"], "base"), ([f"x={old}", f"y={new}"], "x")):
        report = tmp_path / "r.json"
        argv = ["eval", "-i", str(held), "--report", str(report), "-m", "bleu", "-q"]
        for spec in specs:
            argv += ["--answers", spec]
        assert runner.invoke(app, argv).exit_code == 0
        assert json.loads(report.read_text())["baseline"] == baseline


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "h1", "completion": "a"}, {"id": "h2", "completion": "b"}], "1 held-out ids have no answer: h3"),
        (
            [{"id": i, "completion": "a"} for i in ("h1", "h2", "h3", "zz")],
            "1 ids are not in the held-out set: zz",
        ),
        ([{"id": "h1", "completion": "a"}, {"id": "h1", "completion": "b"}], "answers.jsonl:2: field 'id'"),
        ([{"id": "h1", "answer": "a"}], "answers.jsonl:1: field 'completion'"),
    ],
)
def test_missing_extra_twice_or_unreadable_answers_are_one_line_errors(runner, files, tmp_path, rows, message) -> None:
    held, _, _ = files
    answers = write_jsonl(tmp_path / "answers.jsonl", rows)
    result = runner.invoke(app, ["eval", "-i", str(held), "--answers", f"sys={answers}", "-q"])
    assert result.exit_code == 1
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert message in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--answers", "no-equals-sign"], "expected NAME=FILE"),
        (["--answers", "a={old}", "--baseline", "nope"], "--baseline 'nope' is not a system"),
        (["--answers", "a={old}", "--answers", "a={new}"], "two systems are named 'a'"),
    ],
)
def test_bad_answer_options_are_usage_errors(runner, files, extra, message) -> None:
    held, old, new = files
    argv = ["eval", "-i", str(held), *[e.format(old=old, new=new) for e in extra], "-q"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.stderr


def test_generated_and_given_systems_side_by_side(runner, files, tiny_model, tmp_path) -> None:
    held, old, _ = files
    report = tmp_path / "r.json"
    argv = ["eval", "-i", str(held), "--model", str(tiny_model), "--answers", f"old={old}", "--max-new-tokens", "2"]
    result = runner.invoke(app, [*argv, "--bootstrap-resamples", "10", "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert list(summary["systems"]) == ["base", "old", "base@len(old)"] and summary["baseline"] == "base"
    assert summary["model"] == str(tiny_model)
    assert summary["systems"]["base"]["length"]["tokens_mean"] <= 2  # generated here, counted by the tokenizer
    assert set(summary["systems"]["old"]["vs_base"]) == {"bleu", "bleu-paper", "chrf", "rouge-l"}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_answers_in_other_formats_score_as_the_jsonl_ones(runner, files, tmp_path, no_model_loads, suffix) -> None:
    """`--answers` reads what `-i` reads: the same answers as Parquet, CSV or a JSON array give the same report."""
    pytest.importorskip("pyarrow")
    from stages.core.formats import open_writer

    held, old, _ = files
    other = tmp_path / f"old{suffix}"
    rows = [{"id": k, "completion": v} for k, v in OLD.items()]
    if suffix == ".json":
        other.write_text(json.dumps(rows))
    elif suffix == ".csv":
        other.write_text("id,completion\n" + "".join(f'{r["id"]},"{r["completion"]}"\n' for r in rows))
    else:
        with open_writer(other) as writer:
            for row in rows:
                writer.write(row)
    summaries = []
    for path in (old, other):
        report = tmp_path / "r.json"
        argv = ["eval", "-i", str(held), "--answers", f"old={path}", "--report", str(report), "-m", "bleu", "-q"]
        assert runner.invoke(app, argv).exit_code == 0
        summaries.append(json.loads(report.read_text())["systems"]["old"]["metrics"])
    assert summaries[1] == summaries[0]
    refs = {r["id"]: r["references"] for r in HELDOUT}
    by_hand = [sacrebleu.sentence_bleu(OLD[i], refs[i]).score / 100 for i in refs]
    assert summaries[0]["bleu"]["mean"] == pytest.approx(sum(by_hand) / 3, abs=1e-12)  # the answers were read
