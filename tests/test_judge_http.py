"""The OpenAI-compatible HTTP judge against a real server on 127.0.0.1 (no monkeypatching of the client)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stages.eval.judges import HttpJudge, JudgeUnavailable, parse_verdict
from stages.eval.summary import http_judge_rates
from tests.conftest import serve_in_background


class FakeJudgeServer:
    """Prefers the answer that mentions Paris. `mode` switches it to misbehave: slow, garbled, 500, 401."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if outer.mode == "slow":
                    time.sleep(0.5)
                if outer.mode in ("500", "401"):
                    self.send_response(int(outer.mode))
                    self.end_headers()
                    return
                text = body["messages"][1]["content"]
                first, second = text.split("[Answer A]")[1].split("[Answer B]")
                verdict = "A" if "Paris" in first else "B" if "Paris" in second else "tie"
                if outer.mode == "garbled":
                    verdict = "Both answers have merit."
                reply = {"choices": [{"message": {"role": "assistant", "content": f"[[{verdict}]]"}}]}
                if outer.mode == "no-choices":
                    reply = {"error": "oops"}
                payload = json.dumps(reply).encode()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client timed out
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def server() -> Iterator[FakeJudgeServer]:
    fake = FakeJudgeServer()
    serve_in_background(fake.server)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def judge_for(server: FakeJudgeServer, tmp_path, **options) -> HttpJudge:
    return HttpJudge(server.url, cache_dir=tmp_path / "cache", backoff=0.01, timeout=5, **options)


RECORDS = [
    {"id": f"q{i}", "prompt": f"Question {i}: what is the capital of France?", "references": ["Paris."]}
    for i in range(8)
]


def test_verdicts_follow_the_answers_not_their_positions(server, tmp_path) -> None:
    judge = judge_for(server, tmp_path)
    wins = [judge.compare(r, "It is Paris.", "It is Lyon.") for r in RECORDS]
    losses = [judge.compare(r, "It is Lyon.", "It is Paris.") for r in RECORDS]
    ties = [judge.compare(r, "Lyon.", "Marseille.") for r in RECORDS[:2]]
    assert wins == ["win"] * 8 and losses == ["loss"] * 8 and ties == ["tie"] * 2
    # The order was randomised: the candidate stood first in some requests and second in others.
    firsts = [body["messages"][1]["content"].split("[Answer B]")[0] for body in server.requests[:8]]
    assert 0 < sum("It is Paris." in first for first in firsts) < 8
    assert server.requests[0]["model"] == "judge" and server.requests[0]["temperature"] == 0
    assert server.requests[0]["messages"][0]["role"] == "system"


def test_verdicts_are_cached_so_a_rerun_sends_nothing(server, tmp_path) -> None:
    first = [judge_for(server, tmp_path).compare(r, "Paris.", "Lyon.") for r in RECORDS]
    sent = len(server.requests)
    again = judge_for(server, tmp_path)
    assert [again.compare(r, "Paris.", "Lyon.") for r in RECORDS] == first
    assert len(server.requests) == sent == 8
    assert again.stats() == {"requests": 0, "cache_hits": 8, "invalid": 0}


def test_api_key_comes_from_the_named_environment_variable(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    judge_for(server, tmp_path, key_env="MY_JUDGE_KEY").compare(RECORDS[0], "Paris.", "Lyon.")
    assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(Exception, match="MY_JUDGE_KEY: that environment variable is not set"):
        judge_for(server, tmp_path, key_env="MY_JUDGE_KEY")


def test_a_timeout_is_retried_then_reported(server, tmp_path) -> None:
    server.mode = "slow"
    judge = HttpJudge(server.url, cache_dir=tmp_path / "c", timeout=0.1, retries=2, backoff=0.01)
    with pytest.raises(JudgeUnavailable, match=r"failed 3 times; last: .*timed out"):
        judge.compare(RECORDS[0], "Paris.", "Lyon.")
    assert len(server.requests) == 3


def test_a_server_error_is_retried_and_a_client_error_is_not(server, tmp_path) -> None:
    server.mode = "500"
    with pytest.raises(JudgeUnavailable, match="failed 2 times; last: HTTP 500"):
        judge_for(server, tmp_path, retries=1).compare(RECORDS[0], "Paris.", "Lyon.")
    assert len(server.requests) == 2
    server.mode = "401"
    with pytest.raises(JudgeUnavailable, match="refused the request: HTTP 401"):
        judge_for(server, tmp_path, retries=3).compare(RECORDS[0], "Paris.", "Lyon.")
    assert len(server.requests) == 3


@pytest.mark.parametrize("mode", ["garbled", "no-choices"])
def test_a_malformed_reply_is_retried_then_counted_invalid_and_not_cached(server, tmp_path, mode) -> None:
    server.mode = mode
    judge = judge_for(server, tmp_path, retries=2)
    assert judge.compare(RECORDS[0], "Paris.", "Lyon.") is None
    assert len(server.requests) == 3 and judge.stats()["invalid"] == 1
    server.mode = "ok"  # the server recovers: nothing bad was cached
    assert judge_for(server, tmp_path).compare(RECORDS[0], "Paris.", "Lyon.") == "win"
    assert http_judge_rates(["win", None, "loss", "win"]) == {
        "win": 2 / 3,
        "tie": 0.0,
        "loss": 1 / 3,
        "win_rate": 2 / 3,
        "sign_p": 1.0,  # 2 wins, 1 loss: 2 * P(X <= 1 | n=3) = 2 * 4/8
        "n": 3,
        "invalid": 1,
    }


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("A", "A"), ("b.", "B"), ("[[A]]", "A"), (" Tie ", "tie"), ("[[tie]]", "tie"), ("A or B", None), ("", None)],
)
def test_parse_verdict(reply, verdict) -> None:
    assert parse_verdict(reply) == verdict


def test_eval_command_with_the_http_judge(server, runner, tiny_model, tiny_adapter, tmp_path) -> None:
    from bleuberi_cli.app import app
    from tests.conftest import demo_records, read_jsonl_text, write_jsonl

    data = write_jsonl(tmp_path / "h.jsonl", demo_records(count=3))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", f"{tiny_adapter}=lora", "-m", "bleu"]
    args += ["--max-new-tokens", "3", "--judge-url", server.url, "--judge-cache", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    verdicts = [r["evaluation"]["lora"]["judge_verdict"] for r in read_jsonl_text(result.stdout)]
    assert verdicts == ["tie"] * 3  # neither tiny-model answer mentions Paris
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["systems"]["lora"]["judge_vs_base"]["tie"] == 1.0
    assert summary["judge_url"]["requests"] == 3
    server.mode = "slow"
    failed = runner.invoke(app, [*args, "--judge-timeout", "0.1", "--judge-retries", "0", "--judge-cache", "/nope"])
    assert failed.exit_code == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("bleuberi: error: judge endpoint http://127.0.0.1:")
