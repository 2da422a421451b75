"""Prompts over --max-prompt-length (issue 33, finding 2): the default keeps the instruction (start) and the
question with the answer cue (end); every stage that cuts names the records it cut, in a line and in each
record; skip leaves them out and says which; error stops before any model is loaded."""

from __future__ import annotations

import orjson
import pytest

from bleuberi_cli.app import app
from stages.engines.generator import Generator
from stages.engines.prompts import CUT_MARK, PromptEncoder
from stages.run.config_file import load_config
from tests.conftest import read_jsonl_text, write_jsonl

INSTRUCTION = "Rewrite the sentence in the passive voice."
QUESTION = "What is the capital of France?"
CUE = "<|im_end|>\n<|im_start|>assistant\n"


def long_record(record_id: str, repeats: int = 30) -> dict:
    return {
        "id": record_id,
        "prompt": f"{INSTRUCTION} " + "The cat sat on the mat. " * repeats + QUESTION,
        "references": ["The capital of France is Paris."],
    }


SHORT = {"id": "short", "prompt": "Name a planet.", "references": ["Jupiter."]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Generator.load(str(tiny_model)).tokenizer


def full_length(tokenizer, record: dict) -> int:
    """The prompt's length with no limit (the same template, nothing cut)."""
    return len(PromptEncoder(tokenizer).encode(record))


def test_cut_middle_keeps_the_instruction_the_question_and_the_answer_cue(tokenizer) -> None:
    encoder = PromptEncoder(tokenizer, max_prompt_length=60)
    ids = encoder.encode(long_record("a"))
    text = tokenizer.decode(ids)
    assert len(ids) <= 60 and full_length(tokenizer, long_record("a")) > 60
    assert INSTRUCTION in text and text.endswith(QUESTION + CUE) and CUT_MARK in text
    assert encoder.cuts.cut == {"a": full_length(tokenizer, long_record("a"))}


def test_cut_right_keeps_the_start_and_still_ends_with_the_answer_cue(tokenizer) -> None:
    text = tokenizer.decode(
        PromptEncoder(tokenizer, max_prompt_length=40, long_prompts="cut-right").encode(long_record("a"))
    )
    assert INSTRUCTION in text and QUESTION not in text and text.endswith(CUT_MARK.strip() + CUE)


def test_cut_left_keeps_the_last_tokens_as_trl_does(tokenizer) -> None:
    whole = PromptEncoder(tokenizer).encode(long_record("a"))
    assert (
        PromptEncoder(tokenizer, max_prompt_length=40, long_prompts="cut-left").encode(long_record("a")) == whole[-40:]
    )


def generate(runner, data, model, *options: str):
    args = ["generate", "-i", str(data), "--model", str(model), "--max-new-tokens", "2", "--max-prompt-length", "30"]
    return runner.invoke(app, [*args, *options])


def test_generate_names_every_prompt_it_cuts(runner, tmp_path, tiny_model, tokenizer) -> None:
    records = [SHORT, *(long_record(f"long{i}", repeats=10 + i) for i in range(7))]
    result = generate(runner, write_jsonl(tmp_path / "in.jsonl", records), tiny_model)
    assert result.exit_code == 0, result.stderr
    lengths = {r["id"]: full_length(tokenizer, r) for r in records[1:]}
    named = ", ".join(f"long{i} ({lengths[f'long{i}']} tokens)" for i in range(5))
    expected = f"7 prompts over 30 tokens cut (start and end kept): {named} and 2 more (every one is named in"
    assert expected in result.stderr
    out = {r["id"]: r for r in read_jsonl_text(result.stdout)}
    assert "prompt_cut" not in out["short"]["generation"]
    for record_id, tokens in lengths.items():
        assert out[record_id]["generation"]["prompt_cut"] == {"tokens": tokens, "kept": 30, "how": "cut-middle"}


def test_generate_skips_and_names_long_prompts_when_asked(runner, tmp_path, tiny_model, tokenizer) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [long_record("long"), SHORT])
    result = generate(runner, data, tiny_model, "--long-prompts", "skip")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in read_jsonl_text(result.stdout)] == ["short"]
    tokens = full_length(tokenizer, long_record("long"))
    assert f"1 prompt over 30 tokens skipped (left out): long ({tokens} tokens)" in result.stderr


def test_generate_refuses_long_prompts_before_loading_the_model(runner, tmp_path, tiny_model, tokenizer) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [SHORT, long_record("a"), long_record("b", 40)])
    result = generate(runner, data, tiny_model, "--long-prompts", "error")
    assert result.exit_code == 1 and result.stdout == ""
    assert "loading" not in result.stderr
    tokens = full_length(tokenizer, long_record("a"))
    assert result.stderr.startswith(f"bleuberi: error: record 'a': its prompt is {tokens} tokens, over")
    assert "(2 prompts are over it: a (" in result.stderr and result.stderr.count("\n") == 1


def evaluate(runner, data, model, *options: str):
    args = ["eval", "-i", str(data), "--model", str(model), "--max-new-tokens", "2", "--max-prompt-length", "30"]
    return runner.invoke(app, [*args, "--metric", "bleu", "--bootstrap-resamples", "10", *options])


def test_eval_names_the_held_out_prompts_it_cuts(runner, tmp_path, tiny_model, tokenizer) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [SHORT, long_record("long")])
    result = evaluate(runner, data, tiny_model)
    assert result.exit_code == 0, result.stderr
    tokens = full_length(tokenizer, long_record("long"))
    assert f"1 held-out prompt over 30 tokens cut (start and end kept): long ({tokens} tokens)" in result.stderr
    out = {r["id"]: r for r in read_jsonl_text(result.stdout)}
    assert out["long"]["prompt_cut"] == {"tokens": tokens, "kept": 30, "how": "cut-middle"}
    assert "prompt_cut" not in out["short"]


def test_eval_skips_a_long_prompt_for_every_system(runner, tmp_path, tiny_model, tiny_adapter) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [SHORT, long_record("long"), {**SHORT, "id": "short2"}])
    result = evaluate(runner, data, tiny_model, "--adapter", str(tiny_adapter), "--long-prompts", "skip")
    assert result.exit_code == 0, result.stderr
    out = read_jsonl_text(result.stdout)
    assert [r["id"] for r in out] == ["short", "short2"]
    assert all({"base", "adapter0"} <= set(r["evaluation"]) for r in out)
    assert "1 held-out prompt over 30 tokens skipped (left out): long (" in result.stderr


def test_eval_with_every_prompt_skipped_is_an_error(runner, tmp_path, tiny_model) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", [long_record("long")])
    result = evaluate(runner, data, tiny_model, "--long-prompts", "skip")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].endswith(
        "no records left to evaluate: every prompt is over --max-prompt-length 30 (--long-prompts skip)"
    )


def test_an_old_drop_long_key_reads_as_skip(tmp_path) -> None:
    config = tmp_path / "old.toml"
    config.write_text("[train]\ndrop_long = true\n")
    notes: list[str] = []
    resolved = load_config(config, [], on_note=notes.append)
    assert resolved.train.prompt.long_prompts == "skip" and resolved.eval.prompt.long_prompts == "skip"
    assert notes == [
        f"{config}: train.drop_long is now long_prompts; read as long_prompts (rename it to keep this quiet)"
    ]
    assert orjson.loads(orjson.dumps(resolved.generate.prompt.long_prompts)) == "skip"
