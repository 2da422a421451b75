"""The engines through the CLI, against the protocol-faithful stand-in server (tests/openai_standin.py):
generate, eval and train with `--backend server`, chat-only servers, `--as-references`, faults."""

from __future__ import annotations

import orjson
import pytest

from bleuberi_cli.app import app
from stages.engines.generator import Generator
from tests.conftest import demo_records, read_jsonl_text, write_jsonl
from tests.openai_standin import Standin


@pytest.fixture
def server():
    standin = Standin().start()
    standin.vocab_size = 300  # the tiny model's tokenizer decodes every id below this
    yield standin
    standin.stop()


def server_args(server: Standin, *extra: str) -> list[str]:
    return ["--backend", "server", "--server-url", server.url, *extra]


def test_generate_through_a_server_sends_our_prompt_ids_and_keeps_its_tokens(runner, tiny_model, server, tmp_path):
    records = demo_records(count=3)
    path = write_jsonl(tmp_path / "in.jsonl", records)
    argv = ["generate", "-i", str(path), "--model", str(tiny_model), "-n", "2", "--max-new-tokens", "6"]
    result = runner.invoke(app, [*argv, *server_args(server), "-q"])
    assert result.exit_code == 0, result.stderr
    out = read_jsonl_text(result.stdout)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    local = Generator.load(str(tiny_model))
    sent = [entry["body"] for entry in server.requests_to("/v1/completions")]
    assert len(sent) == 6  # one seeded request per sample
    assert sorted(map(tuple, (b["prompt"] for b in sent))) == sorted(
        tuple(local.encode(r)) for r in records for _ in "ab"
    )
    for record in out:
        assert record["generation"]["backend"] == "server" and len(record["completions"]) == 2
        for reason, count in zip(record["generation"]["finish_reasons"], record["generation"]["completion_tokens"]):
            assert reason in ("stop", "length") and 1 <= count <= 6
    # The same tokens the stand-in produced for that prompt and seed, decoded by our tokenizer.
    first = sent[0]
    ids, _logprobs, _reason = server.tokens(first["prompt"], first["seed"], "smol", 6, greedy=False)
    expected = local.decode(ids)
    assert expected in [c for r in out for c in r["completions"]]


def test_a_chat_only_server_gives_text_answers_said_in_the_records(runner, tiny_model, server, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    argv = ["generate", "-i", str(path), "--model", str(tiny_model), "--system-prompt", "Be brief."]
    result = runner.invoke(app, [*argv, *server_args(server, "--server-chat-only"), "-q"])
    assert result.exit_code == 0, result.stderr
    out = read_jsonl_text(result.stdout)
    [request, _] = [entry["body"] for entry in server.requests_to("/v1/chat/completions")]
    assert request["messages"][0] == {"role": "system", "content": "Be brief."}
    assert not server.requests_to("/v1/completions")
    for record in out:
        assert record["generation"]["text_only"] is True and record["generation"]["completion_tokens"] is None
        assert all(word.startswith("w") for word in record["completions"][0].split())


def test_as_references_builds_multi_reference_records(runner, tiny_model, server, tmp_path):
    prompts = [{"id": "p1", "prompt": "Name a planet."}, {"id": "p2", "prompt": "Say hi.", "references": ["Hi!"]}]
    path = write_jsonl(tmp_path / "in.jsonl", prompts)
    argv = ["generate", "-i", str(path), "--model", str(tiny_model), "-n", "3", "--temperature", "0", "--as-references"]
    result = runner.invoke(app, [*argv, *server_args(server, "--server-chat-only"), "-q"])
    assert result.exit_code == 0, result.stderr
    first, second = read_jsonl_text(result.stdout)
    # Greedy: the three answers are one text, so one reference is added (deduplicated).
    assert len(first["references"]) == 1 and first["reference_sources"][0]["backend"] == "server"
    assert second["references"][0] == "Hi!" and second["reference_sources"][0] == "input"
    assert len(second["references"]) == 2 and "completions" not in second
    # Without --as-references a record without references is answered too: generate never reads them (issue 33).
    result = runner.invoke(app, ["generate", "-i", str(path), "--model", str(tiny_model), *server_args(server), "-q"])
    assert result.exit_code == 0, result.stderr
    assert [len(r["completions"]) for r in read_jsonl_text(result.stdout)] == [1, 1]


def test_eval_compares_a_system_served_elsewhere(runner, tiny_model, server, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=3))
    argv = ["eval", "-i", str(path), "--model", str(tiny_model), "--max-new-tokens", "5", "--bootstrap-resamples", "20"]
    result = runner.invoke(app, [*argv, "--served", f"remote={server.url}", "--report", str(tmp_path / "r.json"), "-q"])
    assert result.exit_code == 0, result.stderr
    summary = orjson.loads((tmp_path / "r.json").read_bytes())
    assert list(summary["systems"]) == ["base", "remote", "base@len(remote)"]
    assert len(server.requests_to("/v1/completions")) == 3  # the base ran here, the remote system there
    records = read_jsonl_text(result.stdout)
    assert all(set(r["evaluation"]) == {"base", "remote", "base@len(remote)"} for r in records)


def test_eval_of_served_systems_alone_generates_nothing_here(runner, tiny_model, server, tmp_path, monkeypatch):
    from stages.engines.transformers_engine import TransformersEngine

    def refuse(*args, **kwargs):
        raise AssertionError("a local model was loaded to answer")

    monkeypatch.setattr(TransformersEngine, "__init__", refuse)
    monkeypatch.setattr("stages.eval.config.DEFAULT_MODEL", str(tiny_model))  # its tokenizer builds the prompts
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=3))
    argv = ["eval", "-i", str(path), "--max-new-tokens", "5", "--bootstrap-resamples", "20", "-q"]
    served = ["--served", f"a={server.url}", "--served", f"b={server.url}"]
    result = runner.invoke(app, [*argv, *served, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    summary = orjson.loads((tmp_path / "r.json").read_bytes())
    assert list(summary["systems"]) == ["a", "b", "a@len(b)"] and summary["baseline"] == "a"
    assert len(server.requests_to("/v1/completions")) == 6  # both systems answered there, none here


def test_a_dead_server_is_one_line_and_exit_1(runner, tiny_model, tmp_path):
    standin = Standin().start()
    url = standin.url
    standin.stop()
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=1))
    result = runner.invoke(
        app, ["generate", "-i", str(path), "--model", str(tiny_model), "--backend", "server", "--server-url", url]
    )
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("bleuberi: error: ") and url in line and "Traceback" not in result.stderr


def test_training_refuses_a_server_that_serves_another_model(runner, tiny_model, server, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records("pool", 4))
    argv = ["train", "-i", str(path), "-o", str(tmp_path / "run"), "--model", str(tiny_model), "--max-steps", "1"]
    argv += ["--num-generations", "2", "--per-device-train-batch-size", "2", "--max-completion-length", "4"]
    result = runner.invoke(app, [*argv, *server_args(server)])
    assert result.exit_code == 1
    assert "does not serve the trainer's base model" in result.stderr.strip().splitlines()[-1]
    assert not server.adapters  # nothing was loaded into a server of another model
