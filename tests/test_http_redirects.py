"""No HTTP client of the project follows a redirect, so an API key never reaches another host
(issue 9, item 7): the judge, the rm-url reward and the server engine share stages/core/http.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from stages.core.http import JsonClient, ServerError
from stages.eval.judges import HttpJudge, JudgeUnavailable
from tests.conftest import reply, serve


class Recorder:
    """A server that answers every POST with `status` (a 302 to `location`, or a judge's 200)."""

    def __init__(self, status: int, location: str = "") -> None:
        self.headers: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.headers.append(dict(self.headers))
                payload = json.dumps({"choices": [{"message": {"content": "[[A]]"}}]}).encode()
                reply(self, status, payload, **({"Location": location} if location else {}))

            def log_message(self, *args: object) -> None:
                pass

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, Recorder]]:
    elsewhere = Recorder(200)  # "another host": it would give a verdict, and must never be asked
    redirecting = Recorder(302, location=elsewhere.url + "/chat/completions")
    yield redirecting, elsewhere
    for s in (redirecting, elsewhere):
        s.server.shutdown()
        s.server.server_close()


def test_the_judge_refuses_a_redirect_and_never_sends_its_key_elsewhere(servers, tmp_path, monkeypatch) -> None:
    redirecting, elsewhere = servers
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    judge = HttpJudge(redirecting.url, key_env="JUDGE_KEY", cache_dir=tmp_path, backoff=0.01, retries=2)
    record = {"id": "q1", "prompt": "Capital of France?", "references": ["Paris."]}
    with pytest.raises(JudgeUnavailable, match=rf"HTTP 302 redirect to {elsewhere.url}/chat/completions refused") as e:
        judge.compare(record, "Paris.", "Lyon.")
    assert "\n" not in str(e.value)
    assert elsewhere.headers == []  # the key (and the request) never left for the other host
    assert len(redirecting.headers) == 1  # not retried: a redirect is a configuration problem
    assert redirecting.headers[0]["Authorization"] == "Bearer sk-secret"


def test_the_shared_client_sends_its_key_to_the_configured_host_only(servers) -> None:
    redirecting, elsewhere = servers
    client = JsonClient(redirecting.url, api_key="sk-secret", retries=0)
    assert client.headers_for(redirecting.url + "/x") == {"Authorization": "Bearer sk-secret"}
    assert client.headers_for(elsewhere.url + "/x") == {}
    with pytest.raises(ServerError, match=r"redirect .* refused"):
        client.call("POST", "chat/completions", {"a": 1})
    assert elsewhere.headers == []
