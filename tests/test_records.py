"""Record normalisation: every accepted shape, every rejected one, and pass-through of unknown fields."""

from __future__ import annotations

import gzip

import orjson
import pytest

from stages.core.errors import InputError
from stages.core.records import ReadStats, normalise, prompt_messages, read_records, stable_id
from tests.conftest import write_jsonl


def test_canonical_record_is_kept_and_unknown_fields_pass_through() -> None:
    record = {"id": "a", "prompt": "Hi?", "references": ["Hello."], "source": "demo", "extra": {"x": [1, 2]}}
    out = normalise(dict(record))
    assert out == record


def test_missing_id_gets_a_stable_hash_of_the_prompt() -> None:
    one = normalise({"prompt": "Say hi.", "references": ["Hi."]})
    two = normalise({"prompt": "Say hi.", "references": ["Hello!"], "other": 1})
    three = normalise({"prompt": "Say bye.", "references": ["Bye."]})
    assert one["id"] == two["id"] != three["id"]
    assert len(one["id"]) == 16


def test_integer_id_becomes_a_string() -> None:
    assert normalise({"id": 7, "prompt": "p", "references": ["r"]})["id"] == "7"


def test_tulu_messages_last_assistant_turn_is_the_reference() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
    out = normalise({"messages": messages})
    assert out["references"] == ["Lima."]
    assert out["messages"] == messages  # kept as it was
    assert prompt_messages(out) == messages[:2]
    assert out["id"] == stable_id(out)


def test_messages_ending_with_user_need_references() -> None:
    messages = [{"role": "user", "content": "Capital of Peru?"}]
    out = normalise({"messages": messages, "references": ["Lima."]})
    assert prompt_messages(out) == messages
    with pytest.raises(InputError, match="references"):
        normalise({"messages": messages})


def test_alpaca_instruction_input_output() -> None:
    out = normalise({"instruction": "Translate to German.", "input": "Good night", "output": "Gute Nacht"})
    assert out["prompt"] == "Translate to German.\n\nGood night"
    assert out["references"] == ["Gute Nacht"]
    bare = normalise({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert bare["prompt"] == "Say hi."


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("reference", "Yes.", ["Yes."]), ("ground_truth", "No.", ["No."]), ("ground_truth", ["A", "B"], ["A", "B"])],
)
def test_reference_and_ground_truth_become_references(field, value, expected) -> None:
    out = normalise({"prompt": "q", field: value})
    assert out["references"] == expected
    assert out[field] == value


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ([1, 2], None, "expected a JSON object, got list"),
        ("text", None, "expected a JSON object, got string"),
        ({"references": ["r"]}, "prompt", "missing"),
        ({"prompt": 3, "references": ["r"]}, "prompt", "expected a string, got int"),
        ({"prompt": "  ", "references": ["r"]}, "prompt", "is empty"),
        ({"prompt": "p"}, "references", "missing"),
        ({"prompt": "p", "references": "r"}, "references", "expected a non-empty list of strings, got string"),
        ({"prompt": "p", "references": []}, "references", "non-empty list"),
        ({"prompt": "p", "references": ["ok", 5]}, "references", "item 1 is int"),
        ({"prompt": "p", "references": ["r"], "id": 1.5}, "id", "expected a non-empty string, got float"),
        ({"prompt": "p", "references": ["r"], "id": ""}, "id", "non-empty string"),
        ({"messages": "hi"}, "messages", "list of chat turns"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "role 'robot'"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages", "content is int"),
        ({"messages": [{"role": "assistant", "content": "only an answer"}]}, "messages", "no user turn"),
        ({"instruction": "", "output": "o"}, "instruction", "non-empty string"),
        ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected a string"),
        ({"prompt": "p", "reference": 3}, "reference", "non-empty list of strings"),
    ],
)
def test_bad_records_name_the_field(obj, field, message) -> None:
    with pytest.raises(InputError) as info:
        normalise(obj, source="data.jsonl", line=7)
    error = info.value
    assert error.field == field and error.line == 7
    assert message in str(error)
    assert str(error).startswith("data.jsonl:7: ")


@pytest.mark.parametrize(
    ("extra", "require", "message"),
    [
        ({}, "completions", "missing"),
        ({"completions": "one"}, "completions", "got string"),
        ({"completions": []}, "completions", "non-empty list"),
        ({"completions": ["a", None]}, "completions", "item 1 is null"),
        ({}, "score", "missing"),
        ({"score": "0.5"}, "score", "finite number"),
        ({"score": float("nan")}, "score", "finite number"),
        ({"score": True}, "score", "finite number"),
    ],
)
def test_stage_requirements(extra, require, message) -> None:
    with pytest.raises(InputError, match=message) as info:
        normalise({"prompt": "p", "references": ["r"], **extra}, require=[require])
    assert info.value.field == require


def test_read_records_reports_line_numbers_and_skips_when_asked(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "a", "references": ["x"]},
            b"{not json",
            b"",
            {"prompt": "b"},
            {"prompt": "c", "references": ["z"]},
        ],
    )
    with pytest.raises(InputError, match=r"in\.jsonl:2: not valid JSON"):
        list(read_records(path))
    stats = ReadStats()
    kept = list(read_records(path, skip_invalid=True, stats=stats))
    assert [r["prompt"] for r in kept] == ["a", "c"]
    assert stats.records == 2 and stats.skipped == 2
    assert "in.jsonl:4: field 'references'" in stats.first_errors[1]


def test_gzip_input(tmp_path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(orjson.dumps({"prompt": "a", "references": ["x"]}) + b"\n")
    assert [r["prompt"] for r in read_records(path)] == ["a"]


def test_missing_file_is_an_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file"):
        list(read_records(tmp_path / "absent.jsonl"))
