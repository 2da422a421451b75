"""`bleuberi score`: the library scorer and the command."""

from __future__ import annotations

import gzip

import orjson
import pytest
import sacrebleu

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.score import Scorer, score_records
from tests.conftest import EXAMPLES, read_jsonl_text, write_jsonl

SAMPLE = EXAMPLES / "sample.jsonl"


def test_scorer_rewards_are_sacrebleu_bleu() -> None:
    scorer = Scorer(["bleu"])
    refs = ["The cat sat on the mat.", "A cat was sitting on the mat."]
    completions = ["The cat sat on a mat.", "No idea.", ""]
    expected = [sacrebleu.sentence_bleu(c, refs).score / 100 for c in completions]
    assert scorer.rewards(completions, refs) == pytest.approx(expected, abs=1e-12)


def test_weighted_scorer_combines_metrics() -> None:
    scorer = Scorer.from_names(["bleu:1", "rouge-l:0.5"])
    scores = scorer.score(["the cat sat", "dog"], ["the cat sat on the mat"])
    assert set(scores) == {"bleu", "rouge-l", "combined"}
    for i in range(2):
        assert scores["combined"][i] == pytest.approx(scores["bleu"][i] + 0.5 * scores["rouge-l"][i])
    assert scorer.score_key == "combined"
    assert Scorer.from_names(["bleu", "chrf"], weights=[2, 1]).weights == [2, 1]


@pytest.mark.parametrize(
    ("specs", "weights", "message"),
    [
        (["bleu", "bleu"], None, "named twice"),
        (["bleu", "chrf"], [1.0], "1 weights for 2 metrics"),
        (["bleu:x"], None, "takes no argument.*a weight is NAME:NUMBER"),
        (["bleu:1"], [1.0], "not both"),
        (["nope"], None, "unknown metric"),
    ],
)
def test_scorer_usage_errors(specs, weights, message) -> None:
    with pytest.raises(UsageError, match=message):
        Scorer.from_names(specs, weights)


# A `py:` reward that says which process scored each completion.
SCORED_BY = """
import os

def pid(completions, **kwargs):
    return [os.getpid()] * len(completions)
"""


def test_parallel_scoring_spreads_chunks_over_processes_and_keeps_order_and_values(tmp_path, monkeypatch) -> None:
    """-j 3 on 7 chunks of 4 records (the last one short): chunks 2 and 5 (every third) are scored in this
    process, the other five by the two worker processes; the records come out in input order, with the
    scores a serial run gives."""
    import os

    import stages.score

    monkeypatch.setattr(stages.score, "CHUNK_RECORDS", 4)
    (tmp_path / "scored_by.py").write_text(SCORED_BY)
    base = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()]
    records = [dict(base[i % len(base)], id=str(i)) for i in range(6 * 4 + 3)]
    scorer = Scorer(["bleu", "chrf", f"py:{tmp_path / 'scored_by.py'}:pid"])
    serial = list(score_records([dict(r) for r in records], scorer, jobs=1))
    parallel = list(score_records([dict(r) for r in records], scorer, jobs=3))
    assert [r["id"] for r in parallel] == [r["id"] for r in records]
    spec = scorer.metric_names[2]
    assert [r["scores"]["bleu"] for r in parallel] == [r["scores"]["bleu"] for r in serial]
    assert [r["scores"]["chrf"] for r in parallel] == [r["scores"]["chrf"] for r in serial]
    assert {pid for r in serial for pid in r["scores"][spec]} == {os.getpid()}
    chunks = [{pid for r in parallel[start : start + 4] for pid in r["scores"][spec]} for start in range(0, 27, 4)]
    assert all(len(pids) == 1 for pids in chunks)  # a chunk is scored in one process
    by_chunk = [pids.pop() for pids in chunks]
    assert [i for i, pid in enumerate(by_chunk) if pid == os.getpid()] == [2, 5]
    assert 1 <= len(set(by_chunk) - {os.getpid()}) <= 2  # the others by workers (which ones: whoever was free)


def test_score_command_adds_fields_and_keeps_others(runner) -> None:
    result = runner.invoke(app, ["score", "-i", str(SAMPLE), "--metric", "bleu", "--metric", "bleu-paper", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rows = read_jsonl_text(result.stdout)
    originals = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()]
    assert len(rows) == len(originals)
    for row, original in zip(rows, originals):
        assert {k: row[k] for k in original} == original
        assert set(row["scores"]) == {"bleu", "bleu-paper"}
        assert len(row["scores"]["bleu"]) == len(original["completions"])
        expected = [sacrebleu.sentence_bleu(c, original["references"]).score / 100 for c in original["completions"]]
        assert row["scores"]["bleu"] == pytest.approx(expected, abs=1e-12)
        assert row["score"] == pytest.approx(sum(expected) / len(expected))
        assert row["scoring"]["score"] == "bleu"
        assert "tok:13a" in row["scoring"]["signatures"]["bleu"]


@pytest.mark.parametrize("aggregate", ["max", "min"])
def test_score_aggregate(runner, aggregate) -> None:
    result = runner.invoke(app, ["score", "-i", str(SAMPLE), "--aggregate", aggregate, "-q"])
    assert result.exit_code == 0, result.output
    rows = read_jsonl_text(result.stdout)
    originals = [orjson.loads(line) for line in SAMPLE.read_bytes().splitlines()]
    assert len(rows) == len(originals) == 20  # a failed or empty run must not pass vacuously
    fn = max if aggregate == "max" else min
    for row, original in zip(rows, originals):
        # the aggregate of sacrebleu's own sentence scores, not of the command's `scores` field
        expected = fn(sacrebleu.sentence_bleu(c, original["references"]).score / 100 for c in original["completions"])
        assert row["score"] == pytest.approx(expected, abs=1e-12)
        assert row["scoring"]["aggregate"] == aggregate


def test_score_weights_option(runner) -> None:
    result = runner.invoke(
        app, ["score", "-i", str(SAMPLE), "-m", "bleu", "-m", "rouge-l", "-w", "1", "-w", "0.5", "-q"]
    )
    assert result.exit_code == 0, result.output
    row = read_jsonl_text(result.stdout)[0]
    assert row["scoring"]["weights"] == {"bleu": 1.0, "rouge-l": 0.5}
    assert row["score"] == pytest.approx(sum(row["scores"]["combined"]) / len(row["scores"]["combined"]))


def test_rescoring_merges_earlier_scores(runner, tmp_path) -> None:
    first = runner.invoke(app, ["score", "-i", str(SAMPLE), "-m", "chrf", "-o", str(tmp_path / "a.jsonl"), "-q"])
    assert first.exit_code == 0
    second = runner.invoke(app, ["score", "-i", str(tmp_path / "a.jsonl"), "-m", "bleu", "-q"])
    assert second.exit_code == 0, second.output
    row = read_jsonl_text(second.stdout)[0]
    assert set(row["scores"]) == {"chrf", "bleu"}
    assert row["scoring"]["score"] == "bleu"


def test_score_summary_goes_to_stderr(runner) -> None:
    result = runner.invoke(app, ["score", "-i", str(SAMPLE)])
    assert result.exit_code == 0
    assert "scored 20 records (60 completions)" in result.stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines())


def test_score_bad_usage_exits_2(runner) -> None:
    result = runner.invoke(app, ["score", "-i", str(SAMPLE), "--metric", "meteor"])
    assert result.exit_code == 2
    assert "unknown metric 'meteor'" in result.stderr
    result = runner.invoke(app, ["score", "-i", str(SAMPLE), "--aggregate", "median"])
    assert result.exit_code == 2


def test_score_missing_completions_names_line_and_field(runner, tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"prompt": "p", "references": ["r"], "completions": ["c"]}, {"prompt": "p", "references": ["r"]}],
    )
    result = runner.invoke(app, ["score", "-i", str(path)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"bleuberi: error: {path}:2: field 'completions': missing (run `bleuberi generate` first)"
    )


def test_gzip_output_roundtrip(runner, tmp_path) -> None:
    out = tmp_path / "scored.jsonl.gz"
    result = runner.invoke(app, ["score", "-i", str(SAMPLE), "-o", str(out), "-q"])
    assert result.exit_code == 0 and result.stdout == ""
    with gzip.open(out, "rb") as f:
        assert len(f.read().splitlines()) == 20
