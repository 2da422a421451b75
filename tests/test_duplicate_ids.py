"""One id policy for every stage (issue 9, item 3): a second record with an id already seen is a bad
line, named with both line numbers; --skip-invalid skips and counts it."""

from __future__ import annotations

import pytest

from bleuberi_cli.app import app
from stages.core.errors import InputError
from stages.core.records import read_records
from tests.conftest import read_jsonl_text, write_jsonl

A = {"id": "q1", "prompt": "Capital of France?", "references": ["Paris."], "completions": ["Paris."]}
B = {"id": "q2", "prompt": "Largest planet?", "references": ["Jupiter."], "completions": ["Mars."]}
A_AGAIN = {**A, "prompt": "A different question with the same id"}


def test_a_repeated_id_is_refused_with_both_line_numbers(tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [A, B, A_AGAIN])
    with pytest.raises(InputError) as error:
        list(read_records(data))
    assert str(error.value) == f"{data}:3: field 'id': duplicate id 'q1', first on line 1"


def test_records_without_ids_and_the_same_prompt_are_duplicates_too(tmp_path) -> None:
    same = {"prompt": "Capital of France?", "references": ["Paris."]}
    data = write_jsonl(tmp_path / "d.jsonl", [same, {**same, "references": ["It is Paris."]}])
    with pytest.raises(InputError, match=r":2: field 'id': duplicate id '[0-9a-f]{16}', first on line 1 \(a missing"):
        list(read_records(data))


@pytest.mark.parametrize("command", [["score"], ["select", "--mode", "random", "-n", "1"]])
def test_every_stage_refuses_and_skip_invalid_skips(runner, tmp_path, command) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [A, B, A_AGAIN])
    refused = runner.invoke(app, [*command, "-i", str(data)])
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr == f"bleuberi: error: {data}:3: field 'id': duplicate id 'q1', first on line 1\n"
    skipped = runner.invoke(app, [*command, "-i", str(data), "--skip-invalid", "-q"])
    assert skipped.exit_code == 0 and "skipped 1 invalid record(s)" in skipped.stderr
    assert {r["id"] for r in read_jsonl_text(skipped.stdout)} <= {"q1", "q2"}


def test_run_refuses_a_pool_with_duplicate_ids_before_generating(runner, tiny_model, tmp_path) -> None:
    pool = write_jsonl(tmp_path / "pool.jsonl", [A, B, A_AGAIN])
    run = ["run", "-o", str(tmp_path / "r"), "--set", f"model={tiny_model}", "--set", f"data.pool={pool}"]
    result = runner.invoke(app, run)
    assert result.exit_code == 1 and f"{pool}:3: field 'id': duplicate id 'q1', first on line 1" in result.stderr
    assert not (tmp_path / "r" / "pool.generated.jsonl").exists()


def test_preference_pairs_on_one_prompt_are_not_duplicates(tmp_path) -> None:
    from stages.eval.agreement import read_pairs

    pair = {"prompt": "Capital of France?", "response_a": "Paris.", "response_b": "Lyon.", "winner": "a"}
    data = write_jsonl(
        tmp_path / "p.jsonl", [pair | {"references": ["Paris."]}, pair | {"references": ["It is Paris."]}]
    )
    assert len(list(read_pairs(data))) == 2  # one prompt, two judged pairs (as in Chatbot Arena)
